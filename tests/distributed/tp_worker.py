"""One rank of the tensor-parallel tests, started once per rank by tp_harness.run_ranks (as torchrun would).

    python tp_worker.py TASK CHECKPOINTS_DIR OUT_DIR

Each rank writes what it computed to OUT_DIR/rank{N}.pt; the test process compares it with the
single-process model on the same checkpoints.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

torch.set_num_threads(1)

from qwen2.distributed import TensorParallelError  # noqa: E402
from qwen2.heads import Qwen2ForSequenceClassification, Qwen2ForTokenClassification  # noqa: E402
from qwen2.model import Qwen2ForCausalLM  # noqa: E402
from qwen2.quantization import Int8WeightOnlyLinear  # noqa: E402

IDS = torch.tensor([[0, 0, 7, 3, 99, 12, 45, 101], [5, 9, 100, 129, 3, 17, 64, 2]])
MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
TIMEOUT = 20.0  # the group's collective timeout in these tests


def forward_logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(IDS, attention_mask=MASK).logits.float()


def gguf_logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(IDS % model.config.vocab_size).logits.float()


def check(root: Path) -> tuple[dict, torch.nn.Module]:
    lm = Qwen2ForCausalLM.from_pretrained(root / "lm", tp_plan="auto", dtype=torch.float32)
    result = {"lm": forward_logits(lm),
              "greedy": lm.generate(IDS, attention_mask=MASK, max_new_tokens=12, do_sample=False, pad_token_id=0),
              "params": sum(p.numel() for p in lm.parameters()),
              "q_proj": tuple(lm.model.layers[0].self_attn.q_proj.weight.shape),
              "k_proj": tuple(lm.model.layers[0].self_attn.k_proj.weight.shape)}
    try:
        lm.save_pretrained(root / f"saved{dist.get_rank()}")
    except ValueError as err:
        result["save_refused"] = str(err)
    del lm
    tied = Qwen2ForCausalLM.from_pretrained(root / "tied", tp_plan="auto")
    result["tied"] = forward_logits(tied)
    if dist.get_world_size() > 2:  # the other heads, dtypes and int8 split as over 2 ranks: checked there
        return result, tied
    result["gguf"] = gguf_logits(Qwen2ForCausalLM.from_pretrained(root / "tiny.gguf", tp_plan="auto"))
    for name, cls in (("seq", Qwen2ForSequenceClassification), ("tok", Qwen2ForTokenClassification)):
        result[name] = forward_logits(cls.from_pretrained(root / name, tp_plan="auto", dtype=torch.float32))
    bf16 = Qwen2ForCausalLM.from_pretrained(root / "lm", tp_plan="auto", dtype=torch.bfloat16)
    result["bf16"] = forward_logits(bf16)
    result["bf16_dtype"] = bf16.model.layers[0].mlp.down_proj.weight.dtype
    del bf16
    int8 = Qwen2ForCausalLM.from_pretrained(root / "lm", tp_plan="auto", dtype=torch.float32, quantization="int8")
    result["int8"] = forward_logits(int8)
    result["int8_modules"] = sum(isinstance(m, Int8WeightOnlyLinear) for m in int8.modules())
    return result, int8


def after_death(model, result: dict, out: Path) -> None:
    """The last rank saves and exits; the others then run a forward pass and record what it raised."""
    torch.save(result, out / f"rank{dist.get_rank()}.pt")
    dist.barrier()
    if dist.get_rank() == dist.get_world_size() - 1:
        os._exit(3)
    time.sleep(0.5)
    start = time.monotonic()
    try:
        forward_logits(model)
        result["after_death"] = None
    except TensorParallelError as err:
        result["after_death"] = str(err)
    result["seconds_to_fail"] = time.monotonic() - start
    torch.save(result, out / f"rank{dist.get_rank()}.pt")
    os._exit(0)  # no teardown of a group with a dead peer: gloo may abort it ("terminate called")


def main() -> None:
    task, root, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=TIMEOUT))
    if task == "check":
        result, model = check(root)
        after_death(model, result, out)


if __name__ == "__main__":
    main()
