"""Qwen2Config against transformers' Qwen2Config: same fields, defaults, derivations and config.json files."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
import transformers

from qwen2.config import SUPPORTED_ACTIVATIONS, Qwen2Config

# Real config.json contents as published on the Hub (4.x spelling: rope_theta at top level, torch_dtype).
QWEN2_0_5B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
    "intermediate_size": 4864, "max_position_embeddings": 131072, "max_window_layers": 24, "model_type": "qwen2",
    "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.40.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}
QWEN2_5_CODER_0_5B_INSTRUCT = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
    "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 21, "model_type": "qwen2",
    "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.44.0", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936,
}
QWEN2_5_72B_INSTRUCT = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 8192, "initializer_range": 0.02,
    "intermediate_size": 29568, "max_position_embeddings": 32768, "max_window_layers": 70, "model_type": "qwen2",
    "num_attention_heads": 64, "num_hidden_layers": 80, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
}
# Qwen2.5-7B-Instruct with the YaRN block its model card tells users to add for 128K context.
QWEN2_5_7B_YARN = {
    "architectures": ["Qwen2ForCausalLM"], "bos_token_id": 151643, "eos_token_id": 151645, "hidden_size": 3584,
    "intermediate_size": 18944, "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen2",
    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rope_theta": 1000000.0,
    "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"},
    "sliding_window": 131072, "torch_dtype": "bfloat16", "use_sliding_window": False, "vocab_size": 152064,
}
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2)

CONFIGS = {
    "defaults": {},
    "qwen2-0.5b": QWEN2_0_5B,
    "qwen2.5-coder-0.5b-instruct": QWEN2_5_CODER_0_5B_INSTRUCT,
    "qwen2.5-72b-instruct": QWEN2_5_72B_INSTRUCT,
    "qwen2.5-7b-yarn": QWEN2_5_7B_YARN,
    "sliding-middle": {**TINY, "use_sliding_window": True, "sliding_window": 3, "max_window_layers": 2},
    "sliding-all": {**TINY, "use_sliding_window": True, "sliding_window": 5, "max_window_layers": 0},
    "rope-5x-linear": {**TINY, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}},
    "rope-dynamic": {**TINY, "rope_scaling": {"rope_type": "dynamic", "factor": 3.0}},
    "rope-llama3": {**TINY, "max_position_embeddings": 8192, "rope_parameters": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 2048, "rope_theta": 5e5}},
    "rope-longrope": {**TINY, "rope_parameters": {"rope_type": "longrope", "short_factor": [1.0] * 8,
                                                  "long_factor": [2.0] * 8, "factor": 4.0}},
    "classifier": {**TINY, "num_labels": 5, "problem_type": "multi_label_classification", "pad_token_id": 0,
                   "eos_token_id": [1, 2], "head_dim": 32, "output_hidden_states": True, "foo": {"bar": 1}},
    "explicit-layer-types": {**TINY, "layer_types": ["sliding_attention", "full_attention"] * 2,
                             "use_sliding_window": True, "sliding_window": 7},
}


def _json_roundtrip(d: dict) -> dict:
    return json.loads(json.dumps(d))


def _comparable(d: dict) -> dict:
    """A to_dict() as it would be written to JSON, minus the version stamp and the path it was read from."""
    return _json_roundtrip({k: v for k, v in d.items() if k not in ("transformers_version", "_name_or_path")})


@pytest.mark.parametrize("name", CONFIGS)
def test_to_dict_matches_transformers(name):
    kwargs = CONFIGS[name]
    ours = Qwen2Config(**copy.deepcopy(kwargs))
    theirs = transformers.Qwen2Config(**copy.deepcopy(kwargs))
    assert _comparable(ours.to_dict()) == _comparable(theirs.to_dict())
    # What save_pretrained writes (the diff against the common defaults) matches too.
    ours_json = json.loads(ours.to_json_string())
    theirs_json = json.loads(theirs.to_json_string())
    theirs_json.pop("transformers_version")
    ours_json.pop("transformers_version", None)
    assert ours_json == theirs_json
    assert ours.layer_types == theirs.layer_types
    assert ours.sliding_window == theirs.sliding_window
    assert ours.num_labels == theirs.num_labels
    assert ours.head_dim == getattr(theirs, "head_dim", theirs.hidden_size // theirs.num_attention_heads)


def test_attributes_the_model_relies_on():
    config = Qwen2Config.from_dict(QWEN2_5_CODER_0_5B_INSTRUCT)
    assert config.num_key_value_heads == 2 and config.head_dim == 64
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 1e6}
    assert config.rope_theta == 1e6
    assert config.sliding_window is None  # use_sliding_window is false, as in the reference
    assert config.layer_types == ["full_attention"] * 24
    assert config.dtype == torch.bfloat16 and config.torch_dtype == torch.bfloat16
    assert config.tie_word_embeddings is True
    assert config.use_return_dict is True and config.output_attentions is False
    assert config.classifier_dropout is None and config.problem_type is None
    assert config.model_type == "qwen2" and config.architectures == ["Qwen2ForCausalLM"]
    assert config.get_text_config() is config
    assert Qwen2Config(num_attention_heads=8, num_key_value_heads=None).num_key_value_heads == 8


def test_rope_spellings_agree():
    old = Qwen2Config(**TINY, rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0})
    new = Qwen2Config(**TINY, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5})
    assert old.rope_parameters["rope_type"] == new.rope_parameters["rope_type"] == "linear"
    assert old.rope_theta == new.rope_theta == 5e5
    assert old.rope_scaling["factor"] == 2.0  # readable the 4.x way
    # A theta in the dict beats a top-level one (transformers' precedence).
    assert Qwen2Config(rope_theta=1.0, rope_parameters={"rope_type": "default", "rope_theta": 7.0}).rope_theta == 7.0
    # YaRN without original_max_position_embeddings takes max_position_embeddings, as in transformers.
    yarn = Qwen2Config(max_position_embeddings=4096, rope_scaling={"type": "yarn", "factor": 2.0})
    assert yarn.rope_parameters["original_max_position_embeddings"] == 4096
    # 5.x files written by transformers load unchanged.
    theirs = transformers.Qwen2Config(**QWEN2_5_7B_YARN)
    assert Qwen2Config.from_dict(_json_roundtrip(theirs.to_dict())).rope_parameters == theirs.rope_parameters


@pytest.mark.parametrize("changes", [
    dict(num_hidden_layers=6), dict(max_window_layers=1), dict(use_sliding_window=True, sliding_window=9),
])
def test_overrides_rederive_layer_types(changes):
    base = {**TINY, "use_sliding_window": True, "sliding_window": 3, "max_window_layers": 2}
    saved = _json_roundtrip(transformers.Qwen2Config(**base).to_dict())  # 5.x file: layer_types written out
    ours = Qwen2Config.from_dict(saved, **changes)
    assert ours.layer_types == transformers.Qwen2Config(**{**base, **changes}).layer_types
    for key, value in changes.items():
        assert getattr(ours, key) == value


def test_from_dict_overrides_and_unused_kwargs():
    config, unused = Qwen2Config.from_dict(QWEN2_0_5B, num_labels=3, rope_theta=2.0, torch_dtype="float16",
                                           not_a_field=1, return_unused_kwargs=True)
    assert unused == {"not_a_field": 1}
    assert config.num_labels == 3 and config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    assert config.rope_theta == 2.0 and config.dtype == torch.float16


def test_json_roundtrip_with_transformers(tmp_path):
    kwargs = {**TINY, "num_labels": 3, "id2label": {0: "neg", 1: "neu", 2: "pos"},
              "label2id": {"neg": 0, "neu": 1, "pos": 2}, "custom_key": [1, 2], "eos_token_id": [5, 6],
              "rope_scaling": {"type": "yarn", "factor": 2.0}, "use_sliding_window": True, "max_window_layers": 1}
    ours = Qwen2Config(**kwargs)
    ours.save_pretrained(tmp_path / "ours")
    theirs = transformers.Qwen2Config.from_pretrained(tmp_path / "ours")
    assert _comparable(theirs.to_dict()) == _comparable(ours.to_dict())
    assert theirs.custom_key == [1, 2] and theirs.id2label == {0: "neg", 1: "neu", 2: "pos"}

    theirs.save_pretrained(tmp_path / "theirs")
    back = Qwen2Config.from_pretrained(tmp_path / "theirs")
    assert back.id2label == {0: "neg", 1: "neu", 2: "pos"}  # int keys again after JSON
    assert back.custom_key == [1, 2]
    assert _comparable(back.to_dict()) == _comparable(ours.to_dict())
    assert back.transformers_version == transformers.__version__  # unknown-to-us keys survive
    assert _comparable(Qwen2Config.from_json_file(tmp_path / "theirs" / "config.json").to_dict()) == \
        _comparable(back.to_dict())
    assert back.name_or_path == str(tmp_path / "theirs")
    assert Qwen2Config.from_pretrained(tmp_path / "theirs" / "config.json", vocab_size=99).vocab_size == 99


def test_equality_and_repr():
    a, b = Qwen2Config(**TINY), Qwen2Config(**TINY)
    assert a == b and a != Qwen2Config(**{**TINY, "vocab_size": 256})
    assert repr(a).startswith("Qwen2Config {") and '"vocab_size": 128' in repr(a)


def test_num_labels_setter_and_problem_type():
    config = Qwen2Config(**TINY)
    assert config.num_labels == 2
    config.num_labels = 4
    assert config.label2id == {f"LABEL_{i}": i for i in range(4)}


# ------------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("kwargs, words", [
    (dict(hidden_size=100, num_attention_heads=3), ["hidden_size=100", "num_attention_heads=3"]),
    (dict(num_attention_heads=32, num_key_value_heads=5), ["num_attention_heads=32", "num_key_value_heads=5"]),
    (dict(rope_parameters={"rope_type": "spiral"}), ["rope_type", "spiral"]),
    (dict(rope_scaling={"type": "linear"}), ["linear", "factor"]),
    (dict(rope_scaling={"type": "dynamic"}), ["dynamic", "factor"]),
    (dict(rope_scaling={"type": "yarn"}), ["yarn", "factor"]),
    (dict(rope_scaling={"type": "longrope", "short_factor": [1.0] * 64}), ["longrope", "long_factor"]),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), ["llama3", "high_freq_factor", "low_freq_factor"]),
    (dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 3}),
     ["short_factor", "64"]),
    (dict(hidden_act="swiglu"), ["hidden_act", "swiglu"]),
    (dict(num_hidden_layers=3, layer_types=["full_attention"] * 2), ["layer_types", "2", "num_hidden_layers=3"]),
    (dict(num_hidden_layers=2, layer_types=["full_attention", "chunked_attention"]),
     ["layer_types[1]", "chunked_attention"]),
    (dict(use_sliding_window=True, sliding_window=0), ["sliding_window=0"]),
    (dict(use_sliding_window=True, sliding_window=-4), ["sliding_window=-4"]),
    (dict(model_type="llama"), ["llama"]),
    (dict(num_labels=1, problem_type="single_label_classification"), ["num_labels"]),
    (dict(hidden_size=64.0), ["hidden_size=64.0"]),
    (dict(torch_dtype="float99"), ["float99"]),
    (dict(rope_parameters=[1.0]), ["rope_parameters=[1.0]"]),
])
def test_invalid_configs_name_the_field(kwargs, words):
    with pytest.raises(ValueError) as info:
        Qwen2Config(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_sliding_window_only_checked_when_used():
    # Real checkpoints carry a window with sliding switched off; the reference then drops it.
    assert Qwen2Config(use_sliding_window=False, sliding_window=-1).sliding_window is None


def test_non_qwen2_model_type_refused(tmp_path):
    with pytest.raises(ValueError, match="'llama'"):
        Qwen2Config.from_dict({"model_type": "llama", "hidden_size": 64})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(ValueError, match="'mistral'"):
        Qwen2Config.from_pretrained(tmp_path)


def test_broken_config_file_named(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(OSError, match="config.json"):
        Qwen2Config.from_pretrained(tmp_path)


def test_supported_activations_exist_in_transformers():
    from transformers.activations import ACT2FN

    assert set(SUPPORTED_ACTIVATIONS) <= set(ACT2FN)


def test_importable_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "from qwen2.config import Qwen2Config\n"
            "c = Qwen2Config(torch_dtype='bfloat16', num_hidden_layers=2)\n"
            "assert c.dtype == 'bfloat16' and c.to_dict()['dtype'] == 'bfloat16'\n"
            "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- types and ranges (issue 20): transformers' strict config is the oracle for types -------------------------
REFUSED_BY_BOTH = [
    dict(rms_norm_eps="tiny"), dict(rms_norm_eps=1), dict(tie_word_embeddings="no"), dict(tie_word_embeddings=0),
    dict(vocab_size=1.5), dict(vocab_size=True), dict(hidden_size="8"), dict(use_cache=1),
    dict(initializer_range=1), dict(attention_dropout="x"), dict(eos_token_id=[1, "a"]), dict(bos_token_id="1"),
    dict(pad_token_id=2.0), dict(use_sliding_window=True, sliding_window=1.5), dict(hidden_act=3),
    dict(num_hidden_layers=2, layer_types=["x", "full_attention"]), dict(id2label=[1]), dict(use_sliding_window="yes"),
]


def _refused_by_transformers(kwargs: dict) -> bool:
    try:
        transformers.Qwen2Config(**kwargs)
    except Exception:  # StrictDataclassFieldValidationError and friends
        return True
    return False


@pytest.mark.parametrize("kwargs", REFUSED_BY_BOTH, ids=lambda k: "-".join(f"{a}={b!r}" for a, b in k.items()))
def test_wrong_field_types_are_refused_as_transformers_refuses_them(kwargs):
    assert _refused_by_transformers(kwargs)
    with pytest.raises(ValueError) as info:
        Qwen2Config(**kwargs)
    assert list(kwargs)[-1] in str(info.value) or "layer_types" in str(info.value)


# Accepted by transformers' config, but they make the model's numbers meaningless (NaN, no rotation, ...).
REFUSED_BEYOND = [
    (dict(rms_norm_eps=float("nan")), "rms_norm_eps"), (dict(rms_norm_eps=-1e-6), "rms_norm_eps"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps"), (dict(rms_norm_eps=float("inf")), "rms_norm_eps"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 0.0}), "rope_theta"),
    (dict(rope_theta=-10000.0), "rope_theta"), (dict(rope_theta=float("nan")), "rope_theta"),
    (dict(rope_parameters={"rope_type": "linear", "factor": -2.0}), "factor"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 0.0}), "factor"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 0}),
     "original_max_position_embeddings"),
    (dict(dtype="int8"), "floating-point"), (dict(torch_dtype="bool"), "floating-point"),
    (dict(attention_dropout=1.5), "attention_dropout"), (dict(initializer_range=-0.02), "initializer_range"),
    (dict(num_hidden_layers=10**7), "num_hidden_layers"),
]


@pytest.mark.parametrize("kwargs,field", REFUSED_BEYOND, ids=lambda v: str(v)[:40])
def test_values_that_make_numbers_meaningless_are_refused(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Qwen2Config(**kwargs)


@pytest.mark.parametrize("pad", [128, 10**9, -129])
def test_pad_id_outside_the_vocabulary(pad):
    """transformers' config takes it and its model fails to build (padding_idx out of range); ours refuses
    at the config, naming the field. Negative ids within range are kept, as in transformers' embedding."""
    small = dict(TINY, num_hidden_layers=1)
    with pytest.raises(Exception):
        transformers.Qwen2Model(transformers.Qwen2Config(**small, pad_token_id=pad))
    with pytest.raises(ValueError, match=f"pad_token_id={pad}"):
        Qwen2Config(**small, pad_token_id=pad)
    assert Qwen2Config(**small, pad_token_id=-1).pad_token_id == -1


@pytest.mark.parametrize("change", [{"rms_norm_eps": "tiny"}, {"tie_word_embeddings": "no"}, {"to_dict": 1},
                                    {"use_return_dict": False}, {"num_hidden_layers": "24"}, {"layer_types": "full"}])
def test_config_file_errors_name_the_file_and_field(tmp_path, change):
    (tmp_path / "config.json").write_text(json.dumps({**TINY, **change}))
    with pytest.raises(ValueError) as info:
        Qwen2Config.from_pretrained(tmp_path)
    assert "config.json" in str(info.value) and next(iter(change)) in str(info.value)
