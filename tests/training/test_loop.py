"""The training loop on tiny random models with the real tokenizer: the loss falls on a learnable task, the
classifier and the tagger reach a stated score on held-out data the test generates, gradient accumulation and
packing change nothing but speed, and a run stopped by SIGTERM resumes step for step."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from finetune_harness import arithmetic_chats, number_tag_rows, sentiment_rows, tiny_model, write_jsonl
from finetune_harness import one_thread  # noqa: F401 (an autouse fixture)

import qwen2
from qwen2.training import Trainer, TrainingConfig, encode_dataset, prepare_model, read_dataset
from qwen2.training.collate import pack, packed_batch, pad_batch


@pytest.fixture(scope="module")
def tok(both):
    return both[1]



def _examples(tok, tmp_path, name, rows, task, labels=None):
    data = read_dataset(write_jsonl(tmp_path / name, rows), task, labels)
    return encode_dataset(tok, data, max_length=128, labels=labels), data.labels


def _sft_trainer(tok, tmp_path, seed=0, init=0.02, checkpointing=False, **config):
    tmp_path.mkdir(parents=True, exist_ok=True)
    train, _ = _examples(tok, tmp_path, "train.jsonl", arithmetic_chats(16), "sft")
    model = prepare_model(tiny_model(qwen2.Qwen2ForCausalLM, tok, seed=seed, initializer_range=init), "sft",
                          lora_r=4, lora_alpha=8, lora_dropout=config.pop("lora_dropout", 0.0),
                          gradient_checkpointing=checkpointing)
    settings = dict(task="sft", learning_rate=1e-2, batch_size=4, max_steps=6, progress=False, seed=seed)
    return Trainer(model, TrainingConfig(**{**settings, **config}), train, pad_id=tok.pad_token_id,
                   output_dir=tmp_path / "out")


def test_sft_loss_falls_and_only_assistant_tokens_count(tok, tmp_path):
    # weights larger than the default init: LoRA on near-zero weights barely moves the logits
    trainer = _sft_trainer(tok, tmp_path, init=0.2, max_steps=8, warmup_steps=2, learning_rate=3e-2)
    before = trainer.evaluate(trainer.units)["loss"]
    result = trainer.train()
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.5
    assert trainer.evaluate(trainer.units)["loss"] < before - 0.5
    lrs = [h["lr"] for h in result.history]
    assert lrs[0] == 0 and lrs[2] == pytest.approx(3e-2) and lrs[-1] < lrs[2]  # warmup, then cosine decay
    # The logged loss is the mean over assistant tokens only: recompute it from the model for a fresh batch.
    batch = trainer._batch(0, 0)
    trainer.model.eval()
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        keep = batch["targets"] != -100
        expected = torch.nn.functional.cross_entropy(logits[keep].float(), batch["targets"][keep])
        assert trainer.evaluate([trainer.units[i] for i in trainer._permutations[0][:4]])["loss"] == \
            pytest.approx(float(expected), rel=1e-5)


def test_accumulation_and_checkpointing_change_nothing_but_speed(tok, tmp_path):
    reference = [h["loss"] for h in _sft_trainer(tok, tmp_path / "a", max_steps=3).train().history]
    accumulated = _sft_trainer(tok, tmp_path / "b", max_steps=3, batch_size=2, grad_accum=2,
                               checkpointing=True).train().history
    torch.testing.assert_close([h["loss"] for h in accumulated], reference, rtol=1e-5, atol=1e-6)


def test_packing_gives_the_unpacked_loss_and_gradients(tok, tmp_path):
    trainer = _sft_trainer(tok, tmp_path, init=0.5)  # large weights: attention far from uniform
    examples = trainer.units[:6]
    rows = pack(examples, max_length=128)
    assert len(rows) < len(examples)  # several conversations share a row
    trainer.model.eval()
    results = []
    for batch in (pad_batch(examples, tok.pad_token_id), packed_batch(rows, tok.pad_token_id)):
        trainer.model.zero_grad()
        inputs = {k: v for k, v in batch.items() if k != "tokens"}
        loss, _ = trainer._forward(trainer.model, inputs)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for _, p in trainer.trainable]))
    (padded, padded_grads), (packed, packed_grads) = results
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_grads, padded_grads, rtol=1e-3, atol=1e-4)
    # Without the position restarts the sequences would see each other: the loss differs.
    batch = packed_batch(rows, tok.pad_token_id)
    with torch.no_grad():
        crossed, _ = trainer._forward(trainer.model, {"input_ids": batch["input_ids"], "targets": batch["targets"]})
    assert abs(float(crossed) - float(padded)) > 1e-3 * float(padded)


def test_stopped_by_sigterm_then_resumed_equals_uninterrupted(tok, tmp_path):
    config = dict(max_steps=6, lora_dropout=0.1, save_steps=2)  # dropout: the RNG states must be restored too
    uninterrupted = _sft_trainer(tok, tmp_path / "whole", **config)
    expected = uninterrupted.train().history

    def stop_at_three(trainer, record):
        if record["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    stopped = _sft_trainer(tok, tmp_path / "split", **config)
    stopped.callbacks.append(stop_at_three)
    handler_before = signal.getsignal(signal.SIGTERM)
    result = stopped.train()
    assert result.stopped and result.step == 3 and result.checkpoint.name == "checkpoint-3"
    assert sorted(p.name for p in (tmp_path / "split/out/checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-3"]
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the handler is put back

    resumed = _sft_trainer(tok, tmp_path / "split", **config)  # a new process: fresh model, same command
    history = resumed.train(resume_from=tmp_path / "split" / "out").history
    assert [h["step"] for h in history] == list(range(1, 7))
    for got, want in zip(history, expected):
        assert (got["loss"], got["lr"]) == pytest.approx((want["loss"], want["lr"]), rel=1e-6, abs=1e-7)
    for (name, parameter), (_, reference) in zip(resumed.trainable, uninterrupted.trainable):
        torch.testing.assert_close(parameter, reference, rtol=1e-5, atol=1e-6, msg=name)


def test_classifier_reaches_accuracy_on_held_out_sentences(tok, tmp_path):
    train, labels = _examples(tok, tmp_path, "train.jsonl",
                              sentiment_rows(["film", "meal", "trip", "book", "song", "game"]), "classify")
    held_out, _ = _examples(tok, tmp_path, "test.jsonl", sentiment_rows(["hotel", "party"]), "classify", labels)
    model = prepare_model(tiny_model(qwen2.Qwen2ForSequenceClassification, tok, num_labels=2), "classify",
                          lora_r=4, lora_alpha=8, lora_dropout=0.0)
    assert any("score" in n and "modules_to_save" in n for n, p in model.named_parameters() if p.requires_grad)
    trainer = Trainer(model, TrainingConfig(task="classify", learning_rate=2e-2, batch_size=8, max_steps=25,
                                            progress=False), train, held_out, pad_id=tok.pad_token_id,
                      label_names=labels)
    with pytest.raises(ValueError, match="differs from the model's config.pad_token_id"):
        Trainer(model, TrainingConfig(task="classify"), train, pad_id=tok.pad_token_id + 1)
    assert trainer.evaluate()["accuracy"] <= 0.75
    trainer.train()
    metrics = trainer.evaluate()
    assert metrics["accuracy"] >= 0.9 and metrics["f1"] >= 0.9  # held-out subjects never seen in training


def test_tagger_reaches_entity_f1_on_held_out_sentences(tok, tmp_path):
    train, labels = _examples(tok, tmp_path, "train.jsonl", number_tag_rows(48, seed=1), "tag")
    held_out, _ = _examples(tok, tmp_path, "test.jsonl", number_tag_rows(16, seed=2), "tag", labels)
    model = prepare_model(tiny_model(qwen2.Qwen2ForTokenClassification, tok, num_labels=len(labels)), "tag",
                          method="full")
    trainer = Trainer(model, TrainingConfig(task="tag", learning_rate=1e-2, batch_size=8, max_steps=25, pack=True,
                                            progress=False), train, held_out, pad_id=tok.pad_token_id,
                      label_names=labels)
    trainer.train()
    assert trainer.evaluate()["entity_f1"] >= 0.9
