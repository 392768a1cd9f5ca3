"""What a fine-tuning run writes: the peft adapter loads in transformers + peft with the same logits (float32,
<= 1e-4), and the merged directory loads in both qwen2 and transformers, id2label included."""

from __future__ import annotations

import pytest
import torch
import transformers
from finetune_harness import sentiment_rows, tiny_model, write_jsonl
from finetune_harness import one_thread  # noqa: F401 (an autouse fixture)
from peft import PeftModel

import qwen2
from qwen2.training import Trainer, TrainingConfig, encode_dataset, prepare_model, read_dataset, save_model

ATOL = 1e-4



def test_classifier_adapter_and_merged_model_load_in_transformers(both, tmp_path):
    tok = both[1]
    data = read_dataset(write_jsonl(tmp_path / "train.jsonl", sentiment_rows(["film", "meal"])), "classify")
    labels = data.labels
    extra = dict(num_labels=2, id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    base = tiny_model(qwen2.Qwen2ForSequenceClassification, tok, **extra)
    base_weights = {k: v.clone() for k, v in base.state_dict().items()}
    model = prepare_model(base, "classify", lora_r=4, lora_alpha=8, lora_dropout=0.0)
    trainer = Trainer(model, TrainingConfig(task="classify", learning_rate=1e-2, batch_size=4, max_steps=4,
                                            progress=False), encode_dataset(tok, data, 64), pad_id=tok.pad_token_id)
    trainer.train()
    model.eval()
    ids = tok(["The hotel was great", "The party was dull"], padding=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits

    merged_dir = save_model(model, tmp_path / "out", tok, merge=True)
    assert (tmp_path / "out/adapter_model.safetensors").is_file() and merged_dir == tmp_path / "out/merged"

    hf_base = transformers.Qwen2ForSequenceClassification(
        transformers.Qwen2Config(**{**base.config.to_dict(), "num_labels": 2}))
    hf_base.load_state_dict(base_weights, strict=True)
    hf_peft = PeftModel.from_pretrained(hf_base, tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_peft(input_ids=ids).logits, expected, atol=ATOL, rtol=0)
        hf_merged = transformers.AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
        assert hf_merged.config.id2label == {0: labels[0], 1: labels[1]}
        torch.testing.assert_close(hf_merged(input_ids=ids).logits, expected, atol=ATOL, rtol=0)
        ours = qwen2.AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
        assert ours.config.label2id == {labels[0]: 0, labels[1]: 1}
        torch.testing.assert_close(ours(input_ids=ids).logits, expected, atol=ATOL, rtol=0)
    assert transformers.AutoTokenizer.from_pretrained(merged_dir)("The hotel")["input_ids"] == \
        tok("The hotel")["input_ids"]
