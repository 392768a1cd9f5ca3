"""peft on our models, against peft on transformers' (the oracle), with identical base weights.

For each task type (CAUSAL_LM, none, SEQ_CLS, TOKEN_CLS) a LoRA adapter trained a few steps on one side is saved
with peft's `save_pretrained`, loaded on the other side with `PeftModel.from_pretrained`, and must give the same
logits (float32, <= 1e-4); merge_and_unload() and generate() through the PeftModel are compared too.
No generate() is called on a model before it is wrapped or trained (see issue 13 section 1).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model

import qwen2
from qwen2.heads import Qwen2ForSequenceClassification, Qwen2ForTokenClassification

ATOL = 1e-4
TINY = dict(
    vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    rope_theta=10000.0, num_labels=3,
)
CLASSES = {
    "CAUSAL_LM": (qwen2.Qwen2ForCausalLM, transformers.Qwen2ForCausalLM),
    None: (qwen2.Qwen2ForCausalLM, transformers.Qwen2ForCausalLM),
    "SEQ_CLS": (Qwen2ForSequenceClassification, transformers.Qwen2ForSequenceClassification),
    "TOKEN_CLS": (Qwen2ForTokenClassification, transformers.Qwen2ForTokenClassification),
}


def _pair(task_type):
    ours_cls, hf_cls = CLASSES[task_type]
    torch.manual_seed(0)
    hf = hf_cls(transformers.Qwen2Config(**TINY))
    ours = ours_cls(qwen2.Qwen2Config(**TINY))
    ours.load_state_dict(hf.state_dict(), strict=True)
    return ours, hf


def _batch(task_type):
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, TINY["vocab_size"], (2, 7), generator=generator)
    if task_type == "SEQ_CLS":
        labels = torch.tensor([0, 2])
    elif task_type == "TOKEN_CLS":
        labels = torch.randint(0, 3, ids.shape, generator=generator)
    else:
        labels = ids
    return ids, labels


def _lora(task_type, **extra):
    return LoraConfig(task_type=task_type, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                      lora_dropout=0.0, **extra)


def _train(peft_model, task_type, steps=3):
    """A few AdamW steps, so the adapter (and any modules_to_save head) is far from its initialisation."""
    ids, labels = _batch(task_type)
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = peft_model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    peft_model.eval()
    return losses


def _logits(model, task_type):
    ids, _ = _batch(task_type)
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("task_type", list(CLASSES), ids=lambda t: str(t))
@pytest.mark.parametrize("trained_on", ["ours", "transformers"])
def test_adapter_trained_on_one_side_gives_the_same_logits_on_the_other(task_type, trained_on, tmp_path):
    ours, hf = _pair(task_type)
    source, target = (ours, hf) if trained_on == "ours" else (hf, ours)
    peft_source = get_peft_model(source, _lora(task_type))
    trainable = {n for n, p in peft_source.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and not any("embed_tokens" in n for n in trainable)
    if task_type in ("SEQ_CLS", "TOKEN_CLS"):
        assert any("score" in n for n in trainable)  # peft's modules_to_save for the classification head
    losses = _train(peft_source, task_type)
    assert losses[-1] < losses[0]
    peft_source.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()

    peft_target = PeftModel.from_pretrained(target, tmp_path).eval()
    expected = _logits(peft_source, task_type)
    torch.testing.assert_close(_logits(peft_target, task_type), expected, atol=ATOL, rtol=0)
    base = _pair(task_type)[0]
    assert (_logits(base, task_type) - expected).abs().max() > 1e-2  # the adapter changed the outputs

    merged_source, merged_target = peft_source.merge_and_unload(), peft_target.merge_and_unload()
    assert not any("lora" in n for n in merged_target.state_dict())
    torch.testing.assert_close(_logits(merged_target, task_type), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(_logits(merged_source, task_type), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("task_type", ["CAUSAL_LM", None])
def test_generate_through_the_peft_model_matches_transformers(task_type, tmp_path):
    ours, hf = _pair(task_type)
    peft_ours = get_peft_model(ours, _lora(task_type))
    _train(peft_ours, task_type)
    peft_ours.save_pretrained(tmp_path)
    peft_hf = PeftModel.from_pretrained(hf, tmp_path).eval()
    ids, _ = _batch(task_type)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = peft_hf.generate(input_ids=ids, **kwargs)
    torch.testing.assert_close(peft_ours.generate(input_ids=ids, **kwargs), expected, atol=0, rtol=0)


def test_default_target_modules_and_input_require_grads_with_checkpointing():
    """No target_modules: peft picks Qwen2's defaults from config.model_type. With gradient checkpointing,
    enable_input_require_grads lets gradients reach LoRA through the checkpointed layers, as in transformers."""
    peft_models = []
    for model in _pair("CAUSAL_LM"):
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
        peft_models.append(get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False)))
    ours, theirs = peft_models
    theirs.load_state_dict(ours.state_dict(), strict=True)  # the same (random, non-zero) LoRA weights
    grads = []
    for peft_model in peft_models:
        assert sorted({n.split(".")[-4] for n, p in peft_model.named_parameters() if p.requires_grad}) == \
            ["q_proj", "v_proj"]
        peft_model.train()
        ids, labels = _batch("CAUSAL_LM")
        peft_model(input_ids=ids, labels=labels).loss.backward()
        grads.append({n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad})
    assert set(grads[0]) == set(grads[1])
    for name in grads[0]:
        assert grads[0][name] is not None, name
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=ATOL, rtol=0)
    ours.base_model.model.disable_input_require_grads()
    assert not ours.base_model.model._require_grads_hooks


def test_prompt_tuning_forward_matches_and_its_generate_is_refused():
    """Prompt tuning prepends virtual token embeddings: forward and loss equal transformers + peft; generation
    needs peft's prepare_inputs_for_generation, which our loop does not call, so it is refused, not ignored."""
    from peft import PromptTuningConfig

    ours, hf = (get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
                for model in _pair("CAUSAL_LM"))
    hf.load_state_dict(ours.state_dict(), strict=True)
    ids, labels = _batch("CAUSAL_LM")
    mine, reference = ours(input_ids=ids, labels=labels), hf(input_ids=ids, labels=labels)
    torch.testing.assert_close(mine.logits, reference.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(mine.loss, reference.loss, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="PROMPT_TUNING"):
        ours.generate(input_ids=ids, max_new_tokens=2)
