"""A few LoRA SFT steps on the real default model: before any step (LoRA's B is zero) the loss over the
assistant's tokens equals transformers' loss on the same tokens and labels; then it falls."""

from __future__ import annotations

import pytest
import torch
from finetune_harness import write_jsonl

from qwen2.training import Trainer, TrainingConfig, encode_dataset, prepare_model, read_dataset

CHAT = {"messages": [{"role": "user", "content": "Write a Python function that adds two numbers."},
                     {"role": "assistant", "content": "def add(a, b):\n    return a + b"}]}


@pytest.mark.slow
def test_lora_sft_steps_on_the_default_model(our_gguf_model, hf_gguf_model, both, tmp_path):
    tok = both[1]
    examples = encode_dataset(tok, read_dataset(write_jsonl(tmp_path / "chat.jsonl", [CHAT]), "sft"), 256)
    ids = torch.tensor([examples[0].input_ids])
    learned = torch.tensor([[False] + [t != -100 for t in examples[0].targets[:-1]]])
    with torch.no_grad():
        expected = float(hf_gguf_model(input_ids=ids, labels=ids.masked_fill(~learned, -100)).loss)

    flags = {name: p.requires_grad for name, p in our_gguf_model.named_parameters()}
    model = prepare_model(our_gguf_model, "sft", lora_r=8, lora_alpha=16, lora_dropout=0.0)
    try:
        trainer = Trainer(model, TrainingConfig(task="sft", learning_rate=1e-3, batch_size=1, max_steps=3,
                                                progress=False), examples, pad_id=tok.pad_token_id)
        assert trainer.evaluate(examples)["loss"] == pytest.approx(expected, rel=1e-4)
        losses = [h["loss"] for h in trainer.train().history]
        assert losses[0] == pytest.approx(expected, rel=1e-4)
        assert losses[-1] < losses[0] - 0.05
    finally:  # the session's shared model, as it was
        model.unload()
        for name, parameter in our_gguf_model.named_parameters():
            parameter.requires_grad_(flags[name])
        our_gguf_model.eval()
    assert not any("lora" in name for name, _ in our_gguf_model.named_modules())
