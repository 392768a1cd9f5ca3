"""`Qwen2Config`: the model hyper-parameters, with transformers' `config.json` field names and defaults.

Mirrors transformers 5.x `Qwen2Config` (plus the common `PreTrainedConfig` fields a checkpoint carries):
same attribute names, same defaults, same `config.json` layout, so files written by either library load in
the other. RoPE settings are normalised to the 5.x `rope_parameters` dict; the 4.x spelling (`rope_theta` +
`rope_scaling`, including the legacy `"type"` key) is accepted and `rope_theta`/`rope_scaling` stay readable.

Importable without torch: `dtype` becomes a `torch.dtype` only when torch is installed (as in transformers).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from qwen2.config_checks import check_fields

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
MODEL_TYPE = "qwen2"

# Activation names the model implements (a subset of transformers' ACT2FN); model.py maps each to a function.
SUPPORTED_ACTIVATIONS: tuple[str, ...] = (
    "silu", "swish", "gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "quick_gelu",
    "relu", "relu2", "relu6", "leaky_relu", "sigmoid", "tanh", "mish", "linear",
)

LAYER_TYPES = ("full_attention", "sliding_attention")
_LEGACY_LAYER_TYPES = {"attention": "full_attention"}

DEFAULT_ROPE_THETA = 10_000.0
# rope_type -> keys it cannot work without (after `original_max_position_embeddings` and `rope_theta` are filled
# in from the config, as transformers does) and keys it may carry. Anything else only earns a warning.
_ROPE_KEYS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "default": (frozenset(), frozenset()),
    "linear": (frozenset({"factor"}), frozenset()),
    "dynamic": (frozenset({"factor"}), frozenset()),
    "yarn": (frozenset({"factor", "original_max_position_embeddings"}),
             frozenset({"attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"})),
    "longrope": (frozenset({"short_factor", "long_factor", "original_max_position_embeddings"}),
                 frozenset({"attention_factor", "factor"})),
    "llama3": (frozenset({"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"}),
               frozenset()),
}
_ROPE_ALWAYS_ALLOWED = frozenset({"rope_type", "type", "rope_theta", "partial_rotary_factor"})
_ROPE_NEEDS_ORIGINAL_MAX = ("llama3", "yarn", "longrope")

# Fields every transformers config carries, with the defaults `to_json_string(use_diff=True)` leaves out.
_COMMON_DEFAULTS: dict[str, Any] = {
    "architectures": None,
    "output_hidden_states": False,
    "output_attentions": False,
    "return_dict": True,
    "dtype": None,
    "chunk_size_feed_forward": 0,
    "is_encoder_decoder": False,
    "id2label": {0: "LABEL_0", 1: "LABEL_1"},
    "label2id": {"LABEL_0": 0, "LABEL_1": 1},
    "problem_type": None,
    "_name_or_path": "",
}

# Generation settings that old config.json files carry; transformers drops them (they belong in
# generation_config.json), and so do we, so a config never holds two sources of truth.
_GENERATION_KEYS = frozenset({
    "assistant_confidence_threshold", "assistant_lookbehind", "bad_words_ids", "begin_suppress_tokens",
    "diversity_penalty", "do_sample", "early_stopping", "encoder_no_repeat_ngram_size",
    "encoder_repetition_penalty", "epsilon_cutoff", "eta_cutoff", "exponential_decay_length_penalty",
    "forced_bos_token_id", "forced_eos_token_id", "length_penalty", "max_length", "min_length",
    "no_repeat_ngram_size", "num_assistant_tokens", "num_assistant_tokens_schedule", "num_beam_groups",
    "num_beams", "num_return_sequences", "output_scores", "remove_invalid_values", "repetition_penalty",
    "return_dict_in_generate", "suppress_tokens", "target_lookbehind", "temperature", "top_k", "top_p",
    "typical_p",
})
# Keys that say something about the file, not the model: read and dropped.
_DROPPED_KEYS = frozenset({"_commit_hash", "_attn_implementation_internal", "_experts_implementation_internal"})
# Constructor keywords that are not plain attributes but are valid overrides in from_dict / from_pretrained.
_INIT_ONLY_KEYS = frozenset({"attn_implementation", "torch_dtype", "rope_scaling", "rope_theta", "num_labels",
                             "partial_rotary_factor", "name_or_path"})
_LAYER_TYPE_INPUTS = frozenset({"num_hidden_layers", "use_sliding_window", "sliding_window", "max_window_layers"})
_MAX_LAYERS = 65_536
_MAX_LABELS = 1 << 20
_PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


class Qwen2Config:
    """Configuration of a Qwen2 / Qwen2.5 model; arguments and defaults are transformers' `Qwen2Config`."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        *,
        vocab_size: int = 151936,
        hidden_size: int = 4096,
        intermediate_size: int = 22016,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = 32,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 32768,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        rope_parameters: dict[str, Any] | None = None,
        use_sliding_window: bool = False,
        sliding_window: int | None = 4096,
        max_window_layers: int = 28,
        layer_types: list[str] | None = None,
        attention_dropout: float = 0.0,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        classifier_dropout: float | None = None,
        architectures: list[str] | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        return_dict: bool = True,
        dtype: Any = None,
        chunk_size_feed_forward: int = 0,
        is_encoder_decoder: bool = False,
        id2label: dict[Any, str] | None = None,
        label2id: dict[str, int] | None = None,
        problem_type: str | None = None,
        **kwargs: Any,
    ) -> None:
        model_type = kwargs.pop("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ValueError(f"model_type={model_type!r} is not supported: Qwen2Config only describes "
                             f"model_type={MODEL_TYPE!r} checkpoints")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = head_dim
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.tie_word_embeddings = tie_word_embeddings
        self.use_sliding_window = use_sliding_window
        # As in the reference: the window only exists when sliding is switched on.
        self.sliding_window = sliding_window if use_sliding_window else None
        self.max_window_layers = max_window_layers
        self.attention_dropout = attention_dropout
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.classifier_dropout = classifier_dropout
        self.architectures = architectures
        self.output_hidden_states = output_hidden_states
        self.return_dict = return_dict
        self.chunk_size_feed_forward = chunk_size_feed_forward
        self.is_encoder_decoder = is_encoder_decoder
        self.problem_type = problem_type

        torch_dtype = kwargs.pop("torch_dtype", None)
        self.dtype = _normalise_dtype(dtype if dtype is not None else torch_dtype)

        num_labels = kwargs.pop("num_labels", None)
        if num_labels is not None:
            _require_int("num_labels", num_labels, minimum=0)
            if num_labels > _MAX_LABELS:  # a label table is built from it right away
                raise ValueError(f"num_labels={num_labels:,} is not plausible (at most {_MAX_LABELS:,})")
        if id2label is not None and not isinstance(id2label, dict):
            raise ValueError(f"id2label={id2label!r} must be a dict {{id: label}}")
        try:
            self.id2label = None if id2label is None else {int(k): v for k, v in id2label.items()}
        except (TypeError, ValueError):
            raise ValueError(f"id2label={id2label!r} must map integer ids to labels") from None
        self.label2id = label2id
        if self.id2label is None:
            self.num_labels = 2 if num_labels is None else num_labels
        elif num_labels is not None and num_labels != len(self.id2label):
            logger.warning("num_labels=%s disagrees with id2label, which has %d labels; keeping id2label",
                           num_labels, len(self.id2label))

        self._output_attentions = output_attentions
        self._attn_implementation = kwargs.pop("attn_implementation", None)
        self._name_or_path = str(kwargs.pop("name_or_path", kwargs.pop("_name_or_path", "")))

        # Precedence as in transformers: rope_scaling (4.x) over rope_parameters, and a theta inside the dict over
        # a top-level rope_theta; a 4.x rope_scaling override still keeps the theta of the 5.x dict.
        rope_scaling = kwargs.pop("rope_scaling", None)
        rope_theta = kwargs.pop("rope_theta", None)
        if rope_theta is None:
            rope_theta = rope_parameters.get("rope_theta", DEFAULT_ROPE_THETA) if isinstance(rope_parameters, dict) \
                else DEFAULT_ROPE_THETA
        self.rope_parameters = _standardise_rope(rope_scaling or rope_parameters, rope_theta,
                                                 kwargs.pop("partial_rotary_factor", None), max_position_embeddings)

        self._check_sizes()  # before deriving per-layer lists from them
        if layer_types is not None and not isinstance(layer_types, list):
            raise ValueError(f"layer_types={layer_types!r} must be a list with one entry per layer")
        self.layer_types = self._derive_layer_types() if layer_types is None else [
            _LEGACY_LAYER_TYPES.get(t, t) if isinstance(t, str) else t for t in layer_types]

        for key, value in kwargs.items():
            if hasattr(type(self), key):  # a method or read-only property: the file cannot replace it
                raise ValueError(f"{key!r} is not a config field (it names a Qwen2Config {_member_kind(self, key)})")
            if key in _GENERATION_KEYS:
                logger.info("Ignoring generation setting %s=%r in the model config: it belongs in "
                            "generation_config.json", key, value)
            elif key not in _DROPPED_KEYS:
                setattr(self, key, value)
        self.validate()

    # ----------------------------------------------------------------------------------------------- derived fields

    def _derive_layer_types(self) -> list[str]:
        """Layers from `max_window_layers` on use the sliding window, the reference's (inverted-looking) rule."""
        return ["sliding_attention" if self.sliding_window is not None and i >= self.max_window_layers
                else "full_attention" for i in range(self.num_hidden_layers)]

    @property
    def head_dim(self) -> int:
        if self._head_dim is not None:
            return self._head_dim
        return self.hidden_size // self.num_attention_heads

    @head_dim.setter
    def head_dim(self, value: int | None) -> None:
        self._head_dim = value

    @property
    def num_labels(self) -> int | None:
        return None if self.id2label is None else len(self.id2label)

    @num_labels.setter
    def num_labels(self, num_labels: int) -> None:
        if self.id2label is None or len(self.id2label) != num_labels:
            self.id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
            self.label2id = {label: i for i, label in self.id2label.items()}

    @property
    def output_attentions(self) -> bool:
        return self._output_attentions

    @output_attentions.setter
    def output_attentions(self, value: bool) -> None:
        self._output_attentions = value

    @property
    def rope_theta(self) -> float:
        """4.x spelling of `rope_parameters["rope_theta"]`."""
        return self.rope_parameters["rope_theta"]

    @rope_theta.setter
    def rope_theta(self, value: float) -> None:
        self.rope_parameters["rope_theta"] = value

    @property
    def rope_scaling(self) -> dict[str, Any]:
        """4.x spelling; like transformers 5.x it is now the whole `rope_parameters` dict."""
        return self.rope_parameters

    @rope_scaling.setter
    def rope_scaling(self, value: dict[str, Any] | None) -> None:
        self.rope_parameters = _standardise_rope(
            value, self.rope_parameters.get("rope_theta", DEFAULT_ROPE_THETA), None, self.max_position_embeddings)
        _validate_rope(self.rope_parameters, self.head_dim)

    @property
    def torch_dtype(self) -> Any:
        """Older name of `dtype`."""
        return self.dtype

    @torch_dtype.setter
    def torch_dtype(self, value: Any) -> None:
        self.dtype = _normalise_dtype(value)

    @property
    def use_return_dict(self) -> bool:
        return self.return_dict

    @property
    def name_or_path(self) -> str:
        return self._name_or_path

    @name_or_path.setter
    def name_or_path(self, value: str | os.PathLike) -> None:
        self._name_or_path = str(value)

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> Qwen2Config:
        """Qwen2 is text-only: its text config is itself (transformers' generation code asks for it)."""
        return self

    # --------------------------------------------------------------------------------------------------- validation

    def validate(self) -> None:
        """Reject configurations the model cannot be built from or that make its numbers meaningless, naming
        the field and its value: the field types transformers' strict config checks, plus ranges."""
        self._check_sizes()
        check_fields(self)
        if self._head_dim is not None:
            _require_int("head_dim", self._head_dim, minimum=1)
        elif self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                             f"{self.num_attention_heads}; pass head_dim explicitly if this is intended")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not divisible by "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; choose one of "
                             f"{', '.join(SUPPORTED_ACTIVATIONS)}")
        if not isinstance(self.layer_types, list) or len(self.layer_types) != self.num_hidden_layers:
            length = len(self.layer_types) if isinstance(self.layer_types, (list, tuple)) else "no"
            raise ValueError(f"layer_types has {length} entries but num_hidden_layers={self.num_hidden_layers}: "
                             "give one entry per layer")
        for i, layer_type in enumerate(self.layer_types):
            if layer_type not in LAYER_TYPES:
                raise ValueError(f"layer_types[{i}]={layer_type!r} is not supported; each entry must be one of "
                                 f"{LAYER_TYPES}")
        if self.problem_type is not None and self.problem_type not in _PROBLEM_TYPES:
            raise ValueError(f"problem_type={self.problem_type!r} must be one of {_PROBLEM_TYPES} or None")
        if self.problem_type == "single_label_classification" and self.num_labels == 1:
            raise ValueError('problem_type="single_label_classification" needs num_labels > 1; use num_labels=2 '
                             'for binary classification or problem_type="regression" for one output')
        _validate_rope(self.rope_parameters, self.head_dim)

    def _check_sizes(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings", "max_window_layers"):
            _require_int(name, getattr(self, name), minimum=1 if name != "max_window_layers" else 0)
        if self.num_hidden_layers > _MAX_LAYERS:  # per-layer lists are derived from it right away
            raise ValueError(f"num_hidden_layers={self.num_hidden_layers:,} is not a plausible model (at most "
                             f"{_MAX_LAYERS:,}); the config is corrupt")
        if self.use_sliding_window and self.sliding_window is not None:
            _require_int("sliding_window", self.sliding_window, minimum=1)

    # -------------------------------------------------------------------------------------------- (de)serialisation

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Qwen2Config | tuple[Qwen2Config, dict]:
        """Build from a `config.json`-style dict; `kwargs` naming config attributes override it.

        Overrides are applied before construction, so derived fields (layer_types, id2label) follow them. With
        `return_unused_kwargs=True` also returns the kwargs that named no attribute (transformers' contract).
        """
        return_unused_kwargs = kwargs.pop("return_unused_kwargs", False)
        if not isinstance(config_dict, dict):
            raise ValueError(f"a config must be a dict of fields, not {type(config_dict).__name__}")
        bad = [key for key in [*config_dict, *kwargs] if not isinstance(key, str) or key == "self"]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a config field")
        model_type = config_dict.get("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ValueError(f"This config has model_type={model_type!r}; qwen2 only loads "
                             f"model_type={MODEL_TYPE!r} checkpoints")
        base = cls(**config_dict)
        overrides = {k: v for k, v in kwargs.items() if k in _INIT_ONLY_KEYS or hasattr(base, k)}
        unused = {k: v for k, v in kwargs.items() if k not in overrides}
        if not overrides:
            return (base, unused) if return_unused_kwargs else base
        merged = dict(config_dict)
        if "layer_types" in merged and _LAYER_TYPE_INPUTS & overrides.keys() \
                and merged["layer_types"] == base._derive_layer_types():
            del merged["layer_types"]  # it was the derived default: derive it again from the new values
        for key in ("dtype", "torch_dtype"):
            if key in overrides:
                value = overrides.pop(key)
                if value is not None and value != "auto":
                    merged.pop("torch_dtype", None)
                    merged["dtype"] = value
        if "num_labels" in overrides and base.num_labels != overrides["num_labels"]:
            merged.pop("id2label", None)
            merged.pop("label2id", None)
        if "rope_theta" in overrides and isinstance(merged.get("rope_parameters"), dict):
            merged["rope_parameters"] = {**merged["rope_parameters"], "rope_theta": overrides["rope_theta"]}
        merged.update(overrides)
        config = cls(**merged)
        return (config, unused) if return_unused_kwargs else config

    def to_dict(self) -> dict[str, Any]:
        """Every attribute, JSON-ready (dtype as a string), under transformers' key names."""
        out: dict[str, Any] = {}
        for key, value in self.__dict__.items():
            if key.startswith("_") and key != "_name_or_path":
                continue
            out[key] = copy.deepcopy(value)
        if self._head_dim is not None:
            out["head_dim"] = self._head_dim
        if self.classifier_dropout is None:
            out.pop("classifier_dropout")
        out["output_attentions"] = self._output_attentions
        out["model_type"] = MODEL_TYPE
        if out.get("dtype") is not None and not isinstance(out["dtype"], str):
            out["dtype"] = str(out["dtype"]).rsplit(".", 1)[-1]
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        """`to_dict` without the common fields still at their defaults: what transformers writes to config.json."""
        out = self.to_dict()
        for key, default in _COMMON_DEFAULTS.items():
            if key in out and (out[key] == default or key == "_name_or_path"):
                del out[key]
        return out

    def to_json_string(self, use_diff: bool = True) -> str:
        data = self.to_diff_dict() if use_diff else self.to_dict()
        return json.dumps(_encode_special_floats(data), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike, use_diff: bool = True) -> None:
        Path(json_file_path).write_text(self.to_json_string(use_diff=use_diff), encoding="utf-8")

    @classmethod
    def from_json_file(cls, json_file: str | os.PathLike) -> Qwen2Config:
        return _named(Path(json_file), cls.from_dict, _read_json(Path(json_file)))

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write `config.json` into `save_directory` (created if needed)."""
        directory = Path(save_directory)
        if directory.is_file():
            raise ValueError(f"save_pretrained needs a directory, but {directory} is a file")
        directory.mkdir(parents=True, exist_ok=True)
        self.validate()
        self.to_json_file(directory / CONFIG_NAME)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, cache_dir: str | None = None,
                        revision: str | None = None, token: str | bool | None = None,
                        local_files_only: bool = False, gguf_file: str | None = None,
                        **kwargs: Any) -> Qwen2Config | tuple[Qwen2Config, dict]:
        """Load from a directory, a `config.json` path, a GGUF file or a hub id; `kwargs` override fields."""
        path = Path(pretrained_model_name_or_path)
        if path.is_file() and path.suffix != ".gguf":
            config_file = path
        else:
            from qwen2.loading.hub import resolve_model_dir

            directory = resolve_model_dir(pretrained_model_name_or_path, gguf_file=gguf_file, revision=revision,
                                          cache_dir=cache_dir, local_files_only=local_files_only, token=token,
                                          allow_patterns=["config.json", "generation_config.json"])
            config_file = directory / CONFIG_NAME
            if not config_file.is_file():
                raise OSError(f"{directory} has no {CONFIG_NAME}; is it a transformers-format model directory?")
        config_dict = _read_json(config_file)
        kwargs.setdefault("name_or_path", str(pretrained_model_name_or_path))
        return _named(config_file, cls.from_dict, config_dict, **kwargs)

    # ------------------------------------------------------------------------------------------------------ dunders

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Qwen2Config) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    def update(self, config_dict: dict[str, Any]) -> None:
        for key, value in config_dict.items():
            setattr(self, key, value)


# --------------------------------------------------------------------------------------------------------- helpers


def _require_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")


def _member_kind(config: Qwen2Config, key: str) -> str:
    return "property" if isinstance(getattr(type(config), key), property) else "method or class attribute"


def _normalise_dtype(value: Any) -> Any:
    """A dtype name becomes a `torch.dtype` when torch is installed, as transformers does; else it stays a string."""
    if not isinstance(value, str):
        return value
    name = value.removeprefix("torch.")
    try:
        import torch
    except ImportError:
        return name
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype={value!r} is not a torch dtype name (e.g. 'float32', 'bfloat16', 'float16')")
    return dtype


def _standardise_rope(rope: dict[str, Any] | None, rope_theta: float, partial_rotary_factor: float | None,
                      max_position_embeddings: int) -> dict[str, Any]:
    """One flat 5.x `rope_parameters` dict with `rope_type` and `rope_theta` always present."""
    if rope is not None and not isinstance(rope, dict):
        raise ValueError(f"rope_parameters={rope!r} must be a dict such as {{'rope_type': 'default'}}")
    params = dict(rope or {})
    params.setdefault("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", rope_theta)
    if partial_rotary_factor is not None:
        params.setdefault("partial_rotary_factor", partial_rotary_factor)
    if params["rope_type"] in _ROPE_NEEDS_ORIGINAL_MAX:
        params.setdefault("original_max_position_embeddings", max_position_embeddings)
    return params


def _validate_rope(params: dict[str, Any], head_dim: int) -> None:
    rope_type = params["rope_type"]
    if rope_type not in _ROPE_KEYS:
        raise ValueError(f"rope_parameters['rope_type']={rope_type!r} is not supported; choose one of "
                         f"{', '.join(_ROPE_KEYS)}")
    required, optional = _ROPE_KEYS[rope_type]
    missing = sorted(required - params.keys())
    if missing:
        raise ValueError(f"rope_parameters for rope_type={rope_type!r} is missing required key(s) {missing}")
    unknown = sorted(params.keys() - required - optional - _ROPE_ALWAYS_ALLOWED)
    if unknown:
        logger.warning("Unrecognised keys in rope_parameters for rope_type=%r: %s", rope_type, unknown)
    for key in ("factor", "rope_theta", "low_freq_factor", "high_freq_factor", "attention_factor", "beta_fast",
                "beta_slow", "mscale", "mscale_all_dim", "partial_rotary_factor"):
        value = params.get(key)
        if key in params and value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"rope_parameters[{key!r}]={value!r} must be a number")
        # Beyond the reference, which warns at most: these can only give NaN or meaningless angles.
        if key in ("factor", "rope_theta", "attention_factor", "partial_rotary_factor") and value is not None \
                and not (math.isfinite(value) and value > 0):
            raise ValueError(f"rope_parameters[{key!r}]={value!r} must be a finite number > 0")
    if "original_max_position_embeddings" in params:
        _require_int("rope_parameters['original_max_position_embeddings']",
                     params["original_max_position_embeddings"], minimum=1)
    if isinstance(params.get("factor"), (int, float)) and params["factor"] < 1:
        logger.warning("rope_parameters['factor']=%s is below 1, which shrinks the context instead of extending it",
                       params["factor"])
    partial = params.get("partial_rotary_factor")
    partial = 1.0 if partial is None else partial
    if partial > 1:
        raise ValueError(f"rope_parameters['partial_rotary_factor']={partial!r} must be at most 1")
    rotary_dim = int(head_dim * partial)
    if rope_type == "longrope":
        for key in ("short_factor", "long_factor"):
            factors = params[key]
            if not isinstance(factors, list) or len(factors) != rotary_dim // 2:
                raise ValueError(f"rope_parameters[{key!r}] must be a list of {rotary_dim // 2} numbers "
                                 f"(head_dim // 2), got {factors!r}")
    if head_dim > 4 and head_dim % 2 and rotary_dim == head_dim:
        raise ValueError(f"RoPE needs an even rotary dimension, but head_dim={head_dim}")


def _named(path: Path, build: Any, *args: Any, **kwargs: Any) -> Any:
    """`build(*args, **kwargs)`, its ValueError naming the file the values came from."""
    try:
        return build(*args, **kwargs)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise OSError(f"{path} is not a valid JSON file: {err}") from err
    if not isinstance(data, dict):
        raise OSError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return _decode_special_floats(data)


# JSON has no inf/nan; transformers writes them as {"__float__": "Infinity"} and so do we.
_FLOAT_TAG = "__float__"
_SPECIAL_FLOATS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def _encode_special_floats(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return {_FLOAT_TAG: "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")}
    if isinstance(obj, dict):
        return {k: _encode_special_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode_special_floats(v) for v in obj]
    return obj


def _decode_special_floats(obj: Any) -> Any:
    if isinstance(obj, dict):
        if obj.keys() == {_FLOAT_TAG} and obj[_FLOAT_TAG] in _SPECIAL_FLOATS:
            return _SPECIAL_FLOATS[obj[_FLOAT_TAG]]
        return {k: _decode_special_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_special_floats(v) for v in obj]
    return obj
