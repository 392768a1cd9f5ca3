"""Tensor parallelism applied to a model as it loads: `from_pretrained(..., tp_plan="auto")` under torchrun.

Explicit sharding plus all-reduce, gpt-fast's tp.py way, rather than DTensor's `parallelize_module`: the
model's own modules stay plain `nn.Linear`s (or the quantised modules that replace them) holding this rank's
slice, so every path that calls them (generate(), the serving engine's runner, int8 kernels, oneDNN
linears) runs unchanged, and the only additions are forward hooks: a sum over the ranks after o_proj and
down_proj, a gather of the vocabulary slices after lm_head, and a masked lookup plus sum in the embedding.
DTensor would wrap every weight in a tensor subclass whose dispatch the quantised modules and the CPU fast
paths do not know, and costs per-op overhead that matters at one token per step on the CPU (benchmarks/).

The meta-built model is cut down to this rank's shapes before any weight is read; each checkpoint tensor
is then read through a `ShardSource` that reads only this rank's rows (a byte range of the file) or
columns (safetensors' `get_slice`), so no rank ever holds the whole model. Quantisation (`quantization=`)
quantises the slice as it is read: per output channel, the column-wise and vocabulary slices quantise
exactly as the whole weight would; row-wise slices get scales of their own half rows.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from qwen2.distributed.group import all_gather_last, all_reduce, device_for_rank, init_process_group
from qwen2.distributed.plan import ROW_WISE, Shard, TensorParallelPlan, make_plan
from qwen2.model import Qwen2Attention, Qwen2MLP

logger = logging.getLogger(__name__)

_CHUNK_ELEMENTS = 1 << 22


class VocabParallelEmbedding(nn.Embedding):
    """This rank's rows [vocab_start, vocab_start + rows) of the embedding: ids elsewhere look up zeros, and
    the sum over the ranks gives every id its row. `num_embeddings` is the whole vocabulary (what ids are
    checked against)."""

    def __init__(self, rows: int, dim: int, vocab_start: int, vocab_size: int, **factory: Any) -> None:
        super().__init__(rows, dim, **factory)
        self.vocab_start = vocab_start
        self.num_embeddings = vocab_size

    def forward(self, input_ids: Tensor) -> Tensor:
        local = input_ids - self.vocab_start
        inside = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)  # (..., hidden)
        return all_reduce(out.masked_fill_(~inside[..., None], 0))

    def extra_repr(self) -> str:
        return f"rows {self.vocab_start}..{self.vocab_start + self.weight.shape[0]} of {self.num_embeddings}, " \
               f"{self.embedding_dim}"


class ShardSource:
    """A checkpoint tensor (a `loading.safetensors.TensorSource`) seen as this rank's slice of it."""

    def __init__(self, source: Any, shard: Shard, columns: Any = None) -> None:
        self.source, self.shard, self.columns = source, shard, columns
        self.dtype = source.dtype
        shape = list(source.shape)
        shape[shard.dim] = shard.padded
        self.shape = tuple(shape)

    def read_into(self, out: Tensor, start: int = 0) -> None:
        shard = self.shard
        if shard.dim == 0:
            real = max(0, min(len(out), shard.length - start))
            if real:
                self.source.read_into(out[:real], shard.start + start)
            out[real:].zero_()  # the vocabulary's padding rows
            return
        cols = slice(shard.start, shard.start + shard.length)
        if self.columns is not None:  # safetensors reads just these columns of these rows
            out.copy_(self.columns[start:start + len(out), cols])
            return
        width = self.source.shape[1]  # other formats: whole rows a few MB at a time, the columns kept
        step = max(1, _CHUNK_ELEMENTS // width)
        buffer = torch.empty(min(step, len(out)), width, dtype=out.dtype)
        for lo in range(0, len(out), step):
            part = buffer[:min(step, len(out) - lo)]
            self.source.read_into(part, start + lo)
            out[lo:lo + len(part)] = part[:, cols]


class TensorParallelLoader:
    """Created by `from_pretrained` on the meta-built model: shrinks it to this rank's shapes, then slices each
    checkpoint tensor as it is read (`__call__`), then adds the collectives (`finish`)."""

    def __init__(self, model: nn.Module, tp_plan: Any, tp_size: int | None) -> None:
        if tp_plan != "auto":
            raise ValueError(f"tp_plan={tp_plan!r} is not supported; use tp_plan='auto' (the Qwen2 plan: q/k/v and "
                             f"gate/up column-wise, o/down row-wise, embeddings and lm_head by vocabulary)")
        if getattr(model.config, "quantization_config", None):
            raise ValueError("A checkpoint saved quantised cannot be split with tp_plan='auto'; load the float "
                             "checkpoint with quantization='int8' instead (each rank quantises its slice)")
        init_process_group()
        world, rank = dist.get_world_size(), dist.get_rank()
        if tp_size is not None and tp_size != world:
            raise ValueError(f"tp_size={tp_size} differs from the {world} processes of the group; qwen2 splits a "
                             f"model over every rank (launch with torchrun --nproc-per-node {tp_size})")
        self.plan: TensorParallelPlan = make_plan(model.config, rank, world)
        self.config = model.config
        self.device = device_for_rank()
        self._files: dict[Path, Any] = {}
        _shrink(model, self.plan)

    def __call__(self, name: str, raw_name: str, source: Any, path: Path) -> Any:
        shard = self.plan.shard(name, self.config)
        if shard is None:
            return source
        columns = None
        if shard.dim == 1 and path.suffix == ".safetensors":
            if path not in self._files:
                from safetensors import safe_open

                self._files[path] = safe_open(str(path), framework="pt")
            columns = self._files[path].get_slice(raw_name)
        return ShardSource(source, shard, columns)

    def finish(self, model: nn.Module) -> None:
        """Add the collectives once the weights are in. For inference only (the parameters do not require
        grad); generate() decodes eagerly (compiling a step with collectives in it is not supported here)."""
        self._files.clear()
        for name, module in model.named_modules():
            leaf = name.rpartition(".")[2]
            if leaf in ROW_WISE:
                module.register_forward_hook(_sum_over_ranks)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None:
            vocab = self.plan.vocab_size
            head.register_forward_hook(lambda module, inputs, output: all_gather_last(output)[..., :vocab])
        model.tp_size = self.plan.world_size  # save_pretrained refuses a split model
        model.tp_plan = "auto"
        model.requires_grad_(False)  # inference only: the collectives here carry no gradients
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None and getattr(generation_config, "disable_compile", None) is None:
            generation_config.disable_compile = True
        logger.info("Rank %d of %d holds %d query / %d key-value heads, %d MLP units, vocabulary rows %d..%d.",
                    self.plan.rank, self.plan.world_size, self.plan.num_heads, self.plan.num_kv_heads,
                    self.plan.intermediate, self.plan.vocab_start, self.plan.vocab_start + self.plan.vocab_per_rank)


def _sum_over_ranks(module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
    return all_reduce(output)


def _shrink(model: nn.Module, plan: TensorParallelPlan) -> None:
    """Replace the split modules of the meta-built model by empty ones of this rank's shapes."""
    head_dim = model.config.head_dim
    for module in list(model.modules()):
        if isinstance(module, Qwen2Attention):
            features = {"q_proj": plan.num_heads * head_dim, "k_proj": plan.num_kv_heads * head_dim,
                        "v_proj": plan.num_kv_heads * head_dim, "o_proj": plan.num_heads * head_dim}
            module.num_heads, module.num_key_value_heads = plan.num_heads, plan.num_kv_heads
            module.num_key_value_groups = plan.num_heads // plan.num_kv_heads
        elif isinstance(module, Qwen2MLP):
            features = dict.fromkeys(("gate_proj", "up_proj", "down_proj"), plan.intermediate)
        else:
            continue
        for child, size in features.items():
            old = getattr(module, child)
            if child in ROW_WISE and old.bias is not None:
                raise ValueError(f"{child} has a bias, which a row-wise split would add once per rank")
            in_features, out_features = (size, old.out_features) if child in ROW_WISE else (old.in_features, size)
            setattr(module, child, nn.Linear(in_features, out_features, bias=old.bias is not None, device="meta",
                                             dtype=old.weight.dtype))
    embedding = model.get_input_embeddings()
    if embedding is not None:
        parallel = VocabParallelEmbedding(plan.vocab_per_rank, embedding.embedding_dim, plan.vocab_start,
                                          plan.vocab_size, device="meta", dtype=embedding.weight.dtype)
        model.set_input_embeddings(parallel)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        model.set_output_embeddings(nn.Linear(head.in_features, plan.vocab_per_rank, bias=False, device="meta",
                                              dtype=head.weight.dtype))
    model.tie_weights()
