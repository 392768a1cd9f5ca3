"""Auto* entry points: dispatch on model_type == "qwen2" like transformers' Auto classes, refuse the rest, and
resolve the embedded default model (GGUF) when the hub cannot serve its id."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from qwen2 import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForQuestionAnswering,
                   AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer,
                   GenerationConfig, Qwen2Config)
from qwen2.loading.default_model import DEFAULT_MODEL_ID
from qwen2.loading.hub import resolve_model_dir

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
INPUT_IDS = torch.tensor([[5, 17, 3, 88, 41, 9, 60]])


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY)).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("ours, theirs", [
    (AutoModel, transformers.AutoModel),
    (AutoModelForCausalLM, transformers.AutoModelForCausalLM),
    (AutoModelForSequenceClassification, transformers.AutoModelForSequenceClassification),
    (AutoModelForTokenClassification, transformers.AutoModelForTokenClassification),
    (AutoModelForQuestionAnswering, transformers.AutoModelForQuestionAnswering),
])
def test_auto_models_pick_the_same_class_and_weights(hf_dir, ours, theirs):
    model = ours.from_pretrained(hf_dir)
    reference = theirs.from_pretrained(hf_dir)
    assert type(model).__name__ == type(reference).__name__
    reference_state = reference.state_dict()
    loaded = [name for name in model.state_dict() if name in reference_state]
    assert loaded, "no shared tensor names"
    for name in loaded:
        if "score" in name or "classifier" in name or "qa_outputs" in name:
            continue  # freshly initialised heads are random in both libraries
        if type(model).__name__ == "Qwen2ForQuestionAnswering":
            continue  # transformers maps nothing onto QA's "transformer." prefix either: all random
        torch.testing.assert_close(model.state_dict()[name], reference_state[name], msg=name)


def test_auto_causal_lm_logits_match(hf_dir):
    ours = AutoModelForCausalLM.from_pretrained(hf_dir, device_map="auto", dtype="auto")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, device_map="auto", dtype="auto")
    with torch.no_grad():
        torch.testing.assert_close(ours(INPUT_IDS).logits, theirs(INPUT_IDS).logits, rtol=0, atol=1e-5)


def test_auto_config(hf_dir):
    config = AutoConfig.from_pretrained(hf_dir, num_labels=4)
    assert isinstance(config, Qwen2Config) and config.num_labels == 4
    theirs = transformers.AutoConfig.from_pretrained(hf_dir, num_labels=4)
    assert config.layer_types == theirs.layer_types and config.id2label == theirs.id2label
    assert AutoConfig.for_model("qwen2", hidden_size=64, num_attention_heads=4, num_key_value_heads=4).head_dim == 16


def test_from_config_builds_random_models():
    config = Qwen2Config(**TINY)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.dtype == torch.bfloat16
    assert torch.get_default_dtype() == torch.float32  # restored
    assert not any(p.is_meta for p in model.parameters())
    assert type(AutoModelForSequenceClassification.from_config(config)).__name__ == "Qwen2ForSequenceClassification"
    from_theirs = AutoModelForCausalLM.from_config(transformers.Qwen2Config(**TINY))
    assert isinstance(from_theirs.config, Qwen2Config) and from_theirs.config.to_dict()["vocab_size"] == 96
    with pytest.raises(ValueError, match="'llama'"):
        AutoModelForCausalLM.from_config(transformers.LlamaConfig())


@pytest.mark.parametrize("auto", [AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification])
def test_other_model_types_are_refused_before_loading(tmp_path, auto):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ValueError) as info:  # no weights in the directory: the type check comes first
        auto.from_pretrained(tmp_path)
    assert "'llama'" in str(info.value) and "qwen2" in str(info.value)
    with pytest.raises(ValueError, match="'llama'"):
        AutoConfig.for_model("llama")


def test_auto_classes_are_not_instantiable():
    for auto in (AutoConfig, AutoModelForCausalLM, AutoTokenizer):
        with pytest.raises(OSError, match="from_pretrained"):
            auto()


@pytest.mark.slow
def test_default_model_id_falls_back_to_the_embedded_gguf(default_gguf, hf_gguf_model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = AutoConfig.from_pretrained(DEFAULT_MODEL_ID)
    reference = hf_gguf_model.config
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(config, field) == getattr(reference, field), field
    assert config.rope_theta == reference.rope_parameters["rope_theta"]


@pytest.mark.slow
def test_default_model_id_samples_as_the_hub_model_and_its_gguf_decodes_greedily(default_gguf, hf_gguf_model,
                                                                                  monkeypatch):
    """Standing in for the hub id, the embedded model carries the hub model's published generation_config.json
    (https://huggingface.co/Qwen/Qwen2.5-Coder-0.5B-Instruct/blob/main/generation_config.json), read here by
    transformers; the .gguf path has none, as transformers' own GGUF load has none (greedy)."""
    import transformers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    directory = resolve_model_dir(DEFAULT_MODEL_ID)
    assert directory != resolve_model_dir(default_gguf)
    published = transformers.GenerationConfig.from_pretrained(directory)
    assert (published.do_sample, published.temperature, published.top_p, published.top_k,
            published.repetition_penalty) == (True, 0.7, 0.8, 20, 1.05)
    assert (published.bos_token_id, published.pad_token_id, published.eos_token_id) == (151643, 151643,
                                                                                        [151645, 151643])
    ours = GenerationConfig.from_pretrained(directory)
    for field in ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "bos_token_id",
                  "pad_token_id", "eos_token_id", "min_p", "max_new_tokens"):
        assert getattr(ours, field) == getattr(published, field), field

    gguf_config = GenerationConfig.from_pretrained(resolve_model_dir(default_gguf))
    assert not gguf_config.do_sample and not hf_gguf_model.generation_config.do_sample
    assert gguf_config.temperature is None and gguf_config.repetition_penalty is None


@pytest.mark.slow
def test_auto_tokenizer_delegates_to_the_qwen2_tokenizer(default_gguf, hf_gguf_tokenizer):
    text = "def add(a, b):\n    return a + b  # ÄÖ 你好 <|im_end|>"
    for use_fast in (True, False):
        tokenizer = AutoTokenizer.from_pretrained(default_gguf, use_fast=use_fast)
        assert tokenizer(text)["input_ids"] == hf_gguf_tokenizer(text)["input_ids"]
