"""Parity with transformers (the oracle) on tiny random configs, weights copied both ways with strict=True.

Covers GQA ratios 1/2/7, a head_dim override, tied and untied embeddings, sliding window on some and on all
layers (window 3), every rope type, left and right padding; compares logits, loss, every hidden state and every
head's attention probabilities (eager reference) at float32 max abs diff <= 1e-4, and bfloat16 within
transformers' own bf16 tolerance.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from qwen2.config import Qwen2Config
from qwen2.model import Qwen2ForCausalLM, Qwen2Model
from qwen2.heads import Qwen2ForQuestionAnswering, Qwen2ForSequenceClassification, Qwen2ForTokenClassification

ATOL = 1e-4
BF16_TOL = {"atol": 1e-2, "rtol": 1e-2}  # transformers' eager/sdpa bf16 tolerance on CPU

BASE = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

CONFIGS = {
    "gqa2_untied": {},
    "gqa1_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "gqa7": dict(hidden_size=56, num_attention_heads=7, num_key_value_heads=1),
    "head_dim_override": dict(head_dim=12, num_key_value_heads=2),
    "sliding_middle": dict(num_hidden_layers=4, use_sliding_window=True, sliding_window=3, max_window_layers=2),
    "sliding_all": dict(use_sliding_window=True, sliding_window=3, max_window_layers=0, tie_word_embeddings=True),
    "rope_linear": dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    "rope_dynamic": dict(
        max_position_embeddings=8, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    ),
    "rope_yarn": dict(
        rope_parameters={
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0
        }
    ),
    "rope_yarn_mscale": dict(
        rope_parameters={
            "rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32, "rope_theta": 500.0,
            "mscale": 1.0, "mscale_all_dim": 0.5, "beta_fast": 16, "beta_slow": 2, "truncate": False,
        }
    ),
    "rope_longrope": dict(
        rope_parameters={
            "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 8,
            "short_factor": [1.0, 1.1, 1.3, 1.6], "long_factor": [1.0, 2.0, 4.0, 8.0],
        }
    ),
    "rope_llama3": dict(
        rope_parameters={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16, "rope_theta": 10000.0,
        }
    ),
    "gelu_act": dict(hidden_act="gelu_pytorch_tanh", num_key_value_heads=1),
}


def _pair(overrides: dict, hf_cls=transformers.Qwen2ForCausalLM, our_cls=Qwen2ForCausalLM, **extra):
    kwargs = {**BASE, **copy.deepcopy(overrides), **extra}
    hf = hf_cls(transformers.Qwen2Config(**copy.deepcopy(kwargs), attn_implementation="eager")).eval()
    ours = our_cls(Qwen2Config(**copy.deepcopy(kwargs), attn_implementation="eager")).eval()
    assert set(ours.state_dict()) == set(hf.state_dict())
    hf.load_state_dict(ours.state_dict(), strict=True)  # ours -> theirs: names and shapes line up
    with torch.no_grad():  # fresh random weights on both sides, then theirs -> ours
        for param in hf.parameters():
            param.normal_(0, 0.2)
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def _batch(seq_len: int, vocab: int, padding: str):
    ids = torch.randint(3, vocab, (2, seq_len))
    mask = torch.ones(2, seq_len, dtype=torch.long)
    if padding == "left":
        mask[0, :4] = 0
    elif padding == "right":
        mask[0, -4:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("padding", ["left", "right"])
def test_causal_lm_matches_transformers_eager(name, padding):
    hf, ours = _pair(CONFIGS[name])
    seq_len = 12 if name != "rope_longrope" else 11
    ids, mask, labels = _batch(seq_len, BASE["vocab_size"], padding)
    kwargs = dict(attention_mask=mask, labels=labels, output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        theirs, mine = hf(ids, **kwargs), ours(ids, **kwargs)
    assert mine.logits.dtype == theirs.logits.dtype
    assert _max_diff(mine.logits, theirs.logits) <= ATOL
    assert _max_diff(mine.loss, theirs.loss) <= ATOL
    assert len(mine.hidden_states) == len(theirs.hidden_states) == hf.config.num_hidden_layers + 1
    for a, b in zip(mine.hidden_states, theirs.hidden_states):
        assert _max_diff(a, b) <= ATOL
    assert len(mine.attentions) == hf.config.num_hidden_layers
    for a, b in zip(mine.attentions, theirs.attentions):
        assert a.shape == b.shape
        assert _max_diff(a, b) <= ATOL


@pytest.mark.parametrize("name", ["gqa2_untied", "gqa7", "sliding_middle", "rope_yarn", "rope_dynamic"])
def test_sdpa_path_matches_transformers_sdpa(name):
    hf, ours = _pair(CONFIGS[name])
    hf.set_attn_implementation("sdpa")
    ours.set_attn_implementation("sdpa")
    for padding in ("none", "left"):
        ids, mask, _ = _batch(12, BASE["vocab_size"], padding)
        with torch.no_grad():
            theirs = hf(ids, attention_mask=mask if padding != "none" else None).logits
            mine = ours(ids, attention_mask=mask if padding != "none" else None).logits
        assert _max_diff(mine, theirs) <= ATOL


def test_num_items_in_batch_and_shift_labels_match():
    hf, ours = _pair(CONFIGS["gqa2_untied"])
    ids, mask, labels = _batch(10, BASE["vocab_size"], "right")
    for extra in ({"num_items_in_batch": torch.tensor(7)}, {"shift_labels": labels.roll(-1, 1)}):
        with torch.no_grad():
            theirs = hf(ids, attention_mask=mask, labels=labels, **extra).loss
            mine = ours(ids, attention_mask=mask, labels=labels, **extra).loss
        assert _max_diff(mine, theirs) <= ATOL


@pytest.mark.parametrize("name", ["gqa2_untied", "sliding_middle", "rope_yarn"])
def test_bfloat16_within_reference_tolerance(name):
    hf, ours = _pair(CONFIGS[name])
    hf, ours = hf.to(torch.bfloat16), ours.to(torch.bfloat16)
    ids, mask, labels = _batch(12, BASE["vocab_size"], "left")
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, labels=labels, output_attentions=True)
        mine = ours(ids, attention_mask=mask, labels=labels, output_attentions=True)
    assert mine.logits.dtype == theirs.logits.dtype == torch.bfloat16
    torch.testing.assert_close(mine.logits, theirs.logits, **BF16_TOL)
    torch.testing.assert_close(mine.loss, theirs.loss, **BF16_TOL)
    for a, b in zip(mine.attentions, theirs.attentions):
        torch.testing.assert_close(a, b, **BF16_TOL)


def test_base_model_and_inputs_embeds_match():
    hf, ours = _pair(CONFIGS["head_dim_override"], transformers.Qwen2Model, Qwen2Model)
    ids, mask, _ = _batch(9, BASE["vocab_size"], "left")
    embeds = ours.embed_tokens(ids).detach()
    with torch.no_grad():
        theirs = hf(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
        mine = ours(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
    assert _max_diff(mine.last_hidden_state, theirs.last_hidden_state) <= ATOL
    assert list(mine.keys()) == list(theirs.keys())


def test_packed_sequences_and_explicit_positions_match():
    hf, ours = _pair(CONFIGS["sliding_middle"])
    ids = torch.randint(3, BASE["vocab_size"], (1, 10))
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]])
    with torch.no_grad():
        theirs = hf(ids, position_ids=position_ids, use_cache=False, output_attentions=True)
        mine = ours(ids, position_ids=position_ids, use_cache=False, output_attentions=True)
    assert _max_diff(mine.logits, theirs.logits) <= ATOL
    for a, b in zip(mine.attentions, theirs.attentions):
        assert _max_diff(a, b) <= ATOL


def test_incremental_decoding_matches_transformers_full_forward():
    hf, ours = _pair(CONFIGS["sliding_middle"])
    ids, mask, _ = _batch(10, BASE["vocab_size"], "left")
    with torch.no_grad():
        reference = hf(ids, attention_mask=mask).logits
        out = ours(ids[:, :5], attention_mask=mask[:, :5])
        steps = [out.logits]
        for t in range(5, 10):
            out = ours(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=out.past_key_values)
            steps.append(out.logits)
    valid = mask.bool()
    assert _max_diff(torch.cat(steps, 1)[valid], reference[valid]) <= ATOL


@pytest.mark.parametrize("padding", ["left", "right"])
def test_sequence_classification_matches(padding):
    hf, ours = _pair(
        CONFIGS["gqa2_untied"], transformers.Qwen2ForSequenceClassification, Qwen2ForSequenceClassification,
        num_labels=3,
    )
    ids, mask, _ = _batch(9, BASE["vocab_size"], padding)
    for labels in (torch.tensor([0, 2]), torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])):
        hf.config.problem_type = ours.config.problem_type = None
        with torch.no_grad():
            theirs = hf(ids, attention_mask=mask, labels=labels, output_attentions=True)
            mine = ours(ids, attention_mask=mask, labels=labels, output_attentions=True)
        assert ours.config.problem_type == hf.config.problem_type
        assert _max_diff(mine.logits, theirs.logits) <= ATOL
        assert _max_diff(mine.loss, theirs.loss) <= ATOL


def test_sequence_regression_matches():
    hf, ours = _pair(
        CONFIGS["gqa7"], transformers.Qwen2ForSequenceClassification, Qwen2ForSequenceClassification, num_labels=1
    )
    ids, mask, _ = _batch(7, BASE["vocab_size"], "right")
    labels = torch.tensor([0.5, -1.0])
    with torch.no_grad():
        theirs, mine = hf(ids, attention_mask=mask, labels=labels), ours(ids, attention_mask=mask, labels=labels)
    assert ours.config.problem_type == hf.config.problem_type == "regression"
    assert _max_diff(mine.loss, theirs.loss) <= ATOL


def test_token_classification_matches():
    hf, ours = _pair(
        CONFIGS["sliding_all"], transformers.Qwen2ForTokenClassification, Qwen2ForTokenClassification, num_labels=5
    )
    ids, mask, _ = _batch(8, BASE["vocab_size"], "left")
    labels = torch.randint(0, 5, (2, 8)).masked_fill(mask == 0, -100)
    with torch.no_grad():
        theirs, mine = hf(ids, attention_mask=mask, labels=labels), ours(ids, attention_mask=mask, labels=labels)
    assert _max_diff(mine.logits, theirs.logits) <= ATOL
    assert _max_diff(mine.loss, theirs.loss) <= ATOL


def test_question_answering_matches():
    hf, ours = _pair(CONFIGS["gqa1_tied"], transformers.Qwen2ForQuestionAnswering, Qwen2ForQuestionAnswering)
    assert any(key.startswith("transformer.") for key in ours.state_dict())
    assert {"qa_outputs.weight", "qa_outputs.bias"} <= set(ours.state_dict())
    ids, mask, _ = _batch(8, BASE["vocab_size"], "right")
    start, end = torch.tensor([1, 3]), torch.tensor([[2], [30]])  # 30 is out of range: clamped and ignored
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, start_positions=start, end_positions=end)
        mine = ours(ids, attention_mask=mask, start_positions=start, end_positions=end)
    assert _max_diff(mine.start_logits, theirs.start_logits) <= ATOL
    assert _max_diff(mine.end_logits, theirs.end_logits) <= ATOL
    assert _max_diff(mine.loss, theirs.loss) <= ATOL


@pytest.mark.slow
@torch.no_grad()
def test_real_default_model_matches_transformers(our_gguf_model, hf_gguf_model, hf_gguf_tokenizer):
    """The embedded Qwen2.5-Coder-0.5B: a left-padded batch, then decoding with a StaticCache."""
    tokenizer = copy.copy(hf_gguf_tokenizer)
    tokenizer.padding_side = "left"
    prompts = ["Give me a short introduction to large language model.", "def fib(n):"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    theirs = hf_gguf_model(ids, attention_mask=mask, output_hidden_states=True)
    mine = our_gguf_model(ids, attention_mask=mask, output_hidden_states=True)
    valid = mask.bool()
    assert _max_diff(mine.logits[valid], theirs.logits[valid]) <= 1e-3
    for a, b in zip(mine.hidden_states, theirs.hidden_states):
        assert _max_diff(a[valid], b[valid]) <= 1e-3

    from qwen2.cache import StaticCache

    steps = 4
    cache = StaticCache(our_gguf_model.config, max_batch_size=2, max_cache_len=ids.shape[1] + steps)
    logits = our_gguf_model(ids, attention_mask=mask, past_key_values=cache).logits[:, -1]
    generated = ids
    for _ in range(steps):
        generated = torch.cat([generated, logits.argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        logits = our_gguf_model(generated[:, -1:], attention_mask=mask, past_key_values=cache).logits[:, -1]
    reference = hf_gguf_model(generated, attention_mask=mask).logits[:, -1]
    assert _max_diff(logits, reference) <= 1e-3


@pytest.mark.parametrize("name", ["rope_dynamic", "rope_longrope", "sliding_middle", "gqa7"])
def test_step_by_step_decoding_matches_transformers_own_cache(name):
    """Stateful rope types (dynamic, longrope) change frequencies as decoding crosses their thresholds; each
    step must match transformers decoding with its own cache."""
    hf, ours = _pair(CONFIGS[name])
    ids, mask, _ = _batch(14, BASE["vocab_size"], "left")
    with torch.no_grad():
        theirs = hf(ids[:, :5], attention_mask=mask[:, :5])
        mine = ours(ids[:, :5], attention_mask=mask[:, :5])
        assert _max_diff(mine.logits, theirs.logits) <= ATOL
        for t in range(5, 14):
            kwargs = dict(attention_mask=mask[:, : t + 1])
            theirs = hf(ids[:, t : t + 1], cache=theirs.cache, **kwargs)
            mine = ours(ids[:, t : t + 1], past_key_values=mine.past_key_values, **kwargs)
            assert _max_diff(mine.logits, theirs.logits) <= ATOL, t


def test_short_two_d_mask_counts_missing_keys_as_padding():
    hf, ours = _pair(CONFIGS["gqa2_untied"])
    ids, _, _ = _batch(8, BASE["vocab_size"], "none")
    short = torch.ones(2, 6, dtype=torch.long)  # covers 6 of the 8 tokens
    with torch.no_grad():
        theirs = hf(ids, attention_mask=short, output_attentions=True)
        mine = ours(ids, attention_mask=short, output_attentions=True)
    assert _max_diff(mine.logits, theirs.logits) <= ATOL
    assert mine.attentions[0][:, :, 7, 6:].abs().max() == 0
