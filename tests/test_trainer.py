"""transformers.Trainer on our model, beside Trainer on transformers' model with the same weights and data.

Trainer saves a full model directory only for transformers' own `PreTrainedModel` (an isinstance check, so no
duck typing reaches it); for any other module `save_model` writes the weights alone. The documented call that
makes a Trainer-trained qwen2 model reloadable is `model.save_pretrained(directory)`; a checkpoint directory
loads with `from_pretrained(checkpoint, config=...)` and resumes training; the weights-only directory is refused
with an error that says both.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import qwen2

ATOL = 1e-4
TINY = dict(
    vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, rope_theta=10000.0,
)


def _train(model, output_dir, resume=None, **extra):
    ids = torch.randint(3, TINY["vocab_size"], (16, 8), generator=torch.Generator().manual_seed(9))
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2, save_steps=2,
        logging_steps=1, report_to=[], use_cpu=True, seed=0, disable_tqdm=True, **extra,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_trainer_trains_like_transformers_and_the_model_reloads(tmp_path):
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY))
    ours = qwen2.Qwen2ForCausalLM(qwen2.Qwen2Config(**TINY))
    ours.load_state_dict(hf.state_dict(), strict=True)
    _, hf_losses = _train(hf, tmp_path / "hf")
    trainer, losses = _train(ours, tmp_path / "ours")
    assert len(losses) == 4
    assert losses == pytest.approx(hf_losses, abs=1e-3)  # Trainer rounds the logged losses to 4 digits

    trainer.save_model(tmp_path / "weights_only")
    with pytest.raises(OSError, match="model.save_pretrained"):
        qwen2.Qwen2ForCausalLM.from_pretrained(tmp_path / "weights_only")

    ours.save_pretrained(tmp_path / "final")  # the one call
    ids = torch.randint(3, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))
    ours.eval()
    with torch.no_grad():
        expected = ours(ids).logits
        hf_trained = hf.eval()(ids).logits
        reloaded = qwen2.Qwen2ForCausalLM.from_pretrained(tmp_path / "final").eval()
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=0, rtol=0)
        in_transformers = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "final").eval()
        torch.testing.assert_close(in_transformers(ids).logits, expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(expected, hf_trained, atol=1e-3, rtol=0)  # both Trainers trained alike
        from_weights = qwen2.Qwen2ForCausalLM.from_pretrained(tmp_path / "weights_only", config=tmp_path / "final")
        torch.testing.assert_close(from_weights.eval()(ids).logits, expected, atol=0, rtol=0)
        checkpoint = qwen2.Qwen2ForCausalLM.from_pretrained(tmp_path / "ours" / "checkpoint-2",
                                                            config=tmp_path / "final").eval()
        assert (checkpoint(ids).logits - expected).abs().max() > 1e-3  # an earlier state of the training

    resumed = qwen2.Qwen2ForCausalLM(qwen2.Qwen2Config(**TINY))  # fresh weights, replaced by the checkpoint's
    _train(resumed, tmp_path / "ours", resume=tmp_path / "ours" / "checkpoint-2")
    for (name, mine), reference in zip(resumed.state_dict().items(), ours.state_dict().values()):
        torch.testing.assert_close(mine, reference, atol=0, rtol=0, msg=name)


def test_trainer_with_activation_checkpointing_trains_like_transformers(tmp_path):
    """Trainer's activation checkpointing (every second layer here) calls activation_checkpointing_enable on the
    model; the losses and the trained weights equal transformers' model's under the same Trainer."""
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{**TINY, "num_hidden_layers": 3}))
    ours = qwen2.Qwen2ForCausalLM(qwen2.Qwen2Config(**{**TINY, "num_hidden_layers": 3}))
    ours.load_state_dict(hf.state_dict(), strict=True)
    extra = dict(activation_checkpointing=True, activation_checkpointing_kwargs={"every_n_layers": 2})
    _, hf_losses = _train(hf, tmp_path / "hf", **extra)
    _, losses = _train(ours, tmp_path / "ours", **extra)
    assert ours.is_gradient_checkpointing and [m._checkpoint_every for m in ours.modules()
                                                if isinstance(m, qwen2.Qwen2Model)] == [2]
    assert losses == pytest.approx(hf_losses, abs=1e-3)
    for (name, mine), reference in zip(ours.state_dict().items(), hf.state_dict().values()):
        torch.testing.assert_close(mine, reference, atol=1e-4, rtol=0, msg=name)
