"""Types and ranges of `Qwen2Config` fields: transformers' strict config types, and the ranges it leaves open.

Kept apart from config.py (which holds the fields, their derivations and (de)serialisation); importable
without torch like it.
"""

from __future__ import annotations

import math
from typing import Any

# Field -> accepted types, as transformers' strict dataclass types them (an int is not a float there either).
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "initializer_range": (float,), "rms_norm_eps": (float,), "attention_dropout": (float, int),
    "hidden_act": (str,), "use_cache": (bool,), "tie_word_embeddings": (bool,), "use_sliding_window": (bool,),
    "sliding_window": (int, type(None)), "pad_token_id": (int, type(None)), "bos_token_id": (int, type(None)),
    "eos_token_id": (int, list, type(None)), "output_hidden_states": (bool, type(None)),
    "return_dict": (bool, type(None)), "is_encoder_decoder": (bool,), "chunk_size_feed_forward": (int,),
    "classifier_dropout": (float, int, type(None)), "layer_types": (list,), "rope_parameters": (dict,),
}


def check_fields(config: Any) -> None:
    """Each field of a `Qwen2Config` of its type, and in the range where its numbers mean something."""
    for name, kinds in _FIELD_TYPES.items():
        value = getattr(config, name)
        if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
            expected = " or ".join("None" if k is type(None) else k.__name__ for k in kinds)
            raise ValueError(f"{name}={value!r} must be {expected}, not {type(value).__name__}")
    eos = config.eos_token_id
    if isinstance(eos, list) and not all(isinstance(i, int) and not isinstance(i, bool) for i in eos):
        raise ValueError(f"eos_token_id={eos!r} must be an int or a list of ints")
    if not all(isinstance(t, str) for t in config.layer_types):
        raise ValueError(f"layer_types={config.layer_types!r} must be a list of strings")
    # Beyond the reference (which accepts these and computes NaN or garbage from them):
    if not (math.isfinite(config.rms_norm_eps) and config.rms_norm_eps > 0):
        raise ValueError(f"rms_norm_eps={config.rms_norm_eps!r} must be a finite number > 0")
    if not (math.isfinite(config.initializer_range) and config.initializer_range >= 0):
        raise ValueError(f"initializer_range={config.initializer_range!r} must be a finite number >= 0")
    for name in ("attention_dropout", "classifier_dropout"):
        value = getattr(config, name)
        if value is not None and not 0 <= value <= 1:
            raise ValueError(f"{name}={value!r} must be a probability between 0 and 1")
    vocab = config.vocab_size
    if isinstance(vocab, int) and config.pad_token_id is not None and not -vocab <= config.pad_token_id < vocab:
        # The embedding's padding row must exist (transformers fails on it when building the model).
        raise ValueError(f"pad_token_id={config.pad_token_id} is outside the vocabulary (vocab_size={vocab})")
    dtype = config.dtype
    if dtype is not None and not isinstance(dtype, str) and not getattr(dtype, "is_floating_point", False):
        raise ValueError(f"dtype={dtype!r} is not a floating-point dtype; weights need one (e.g. 'bfloat16')")
