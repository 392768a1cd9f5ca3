"""`GenerationConfig`: the knobs of `generate()`, stored as `generation_config.json`.

Follows transformers 5.x (`transformers/generation/configuration_utils.py`): every field defaults to `None`
("unset"), so a checkpoint's `generation_config.json` can be layered under the user's arguments, and the
library-wide defaults (`DEFAULT_GENERATION_PARAMS`) are only filled in at `generate()` time.
Value checks that depend on the decoding strategy (temperature, top_p, ...) run when `generate()` builds
its logits processors, as in the reference; this class checks what it can alone.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

GENERATION_CONFIG_NAME = "generation_config.json"

# Every field transformers' GenerationConfig knows, all defaulting to None. Unknown keys are kept as
# attributes too, so a generation_config.json survives a load/save round trip unchanged.
FIELDS: tuple[str, ...] = (
    # length
    "max_length", "max_new_tokens", "min_length", "min_new_tokens", "early_stopping", "max_time", "stop_strings",
    # strategy
    "do_sample", "num_beams", "use_mtp",
    # cache
    "use_cache", "cache_implementation", "cache_config", "max_cache_len",
    # logits manipulation
    "temperature", "top_k", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff",
    "repetition_penalty", "encoder_repetition_penalty", "length_penalty", "no_repeat_ngram_size", "bad_words_ids",
    "renormalize_logits", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "sequence_bias",
    "token_healing", "guidance_scale", "watermarking_config",
    # outputs
    "num_return_sequences", "output_attentions", "output_hidden_states", "output_scores", "output_logits",
    "return_dict_in_generate",
    # special tokens
    "pad_token_id", "bos_token_id", "eos_token_id",
    # encoder-decoder and assisted decoding (kept for file compatibility; unused by decoder-only Qwen2)
    "encoder_no_repeat_ngram_size", "decoder_start_token_id", "is_assistant", "num_assistant_tokens",
    "num_assistant_tokens_schedule", "assistant_confidence_threshold", "prompt_lookup_num_tokens",
    "max_matching_ngram_size", "assistant_early_exit", "assistant_lookbehind", "target_lookbehind",
    "assistant_ensemble_weight", "speculation_type",
    # performance
    "compile_config", "disable_compile", "continuous_batching_config", "prefill_chunk_size",
    # deprecated in the reference, still read from old files
    "low_memory", "penalty_alpha", "dola_layers", "diversity_penalty", "num_beam_groups", "constraints",
    "force_words_ids",
)

# The reference's fallbacks for fields that neither the user nor the checkpoint set.
DEFAULT_GENERATION_PARAMS: dict[str, Any] = {
    "max_length": 20,
    "min_length": 0,
    "do_sample": False,
    "use_cache": True,
    "early_stopping": False,
    "num_beams": 1,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "typical_p": 1.0,
    "repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "num_return_sequences": 1,
    "output_scores": False,
    "return_dict_in_generate": False,
    "remove_invalid_values": False,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "encoder_repetition_penalty": 1.0,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
}

EXTRA_OUTPUT_FLAGS = ("output_attentions", "output_hidden_states", "output_scores", "output_logits")
METADATA_FIELDS = ("_from_model_config", "_commit_hash", "_original_object_hash", "transformers_version")
# generate() arguments that users sometimes put in the config by mistake.
_GENERATE_ONLY_ARGUMENTS = (
    "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus", "assistant_model",
    "streamer", "negative_prompt_ids", "negative_prompt_attention_mask",
)


class GenerationConfig:
    """Generation parameters with transformers' names; unset fields are `None`."""

    extra_output_flags = EXTRA_OUTPUT_FLAGS

    def __init__(self, **kwargs: Any) -> None:
        user_set = set(kwargs)
        for name in FIELDS:
            setattr(self, name, kwargs.pop(name, None))
        kwargs.pop("_commit_hash", None)
        self._from_model_config = kwargs.pop("_from_model_config", None)
        self.transformers_version = kwargs.pop("transformers_version", None)
        # A model config carries many unrelated keys (hidden_size, ...): keep extras only from real generation files.
        if not self._from_model_config:
            for key, value in kwargs.items():
                setattr(self, key, value)
        self.validate(user_set_attributes=user_set)

    # ------------------------------------------------------------------ checks
    def validate(self, strict: bool = False, user_set_attributes: set[str] | None = None) -> None:
        """Raise ValueError for values that can never work; log (or raise, if `strict`) contradictory flags.

        With `user_set_attributes`, contradictions are only reported for flags the caller set (not for
        values inherited from a checkpoint's generation_config.json), as in the reference."""
        if self.early_stopping not in (None, True, False, "never"):
            raise ValueError(f"`early_stopping` must be a boolean or 'never', but is {self.early_stopping!r}.")
        _check_values(self)
        for arg in _GENERATE_ONLY_ARGUMENTS:
            if arg in self.__dict__:
                raise ValueError(
                    f"Argument `{arg}` is not a valid argument of `GenerationConfig`. Pass it to `generate()` directly."
                )
        if self.num_return_sequences is not None and self.num_return_sequences > 1:
            if self.num_beams is None or self.num_beams == 1:
                if not self.do_sample:
                    raise ValueError(
                        "Greedy methods (do_sample != True) without beam search do not support "
                        f"`num_return_sequences` different than 1 (got {self.num_return_sequences})."
                    )
            elif self.num_return_sequences > self.num_beams:
                raise ValueError(
                    f"`num_return_sequences` ({self.num_return_sequences}) has to be smaller or equal to "
                    f"`num_beams` ({self.num_beams})."
                )
        issues = self._minor_issues()
        if user_set_attributes is not None:
            issues = {name: text for name, text in issues.items() if name in user_set_attributes}
        if issues:
            message = "\n".join(f"- `{name}`: {text}" for name, text in issues.items())
            if strict:
                raise ValueError("GenerationConfig is invalid:\n" + message)
            logger.warning("These generation flags are not used and may be ignored:\n%s", message)

    def _minor_issues(self) -> dict[str, str]:
        issues: dict[str, str] = {}
        if self.pad_token_id is not None and self.pad_token_id < 0:
            issues["pad_token_id"] = f"should be non-negative, but is {self.pad_token_id}."
        if self.do_sample is not True:
            sample_only = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "typical_p": 1.0,
                           "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}
            for name, neutral in sample_only.items():
                value = getattr(self, name)
                if value is not None and value != neutral:
                    issues[name] = f"is {value}, but only used when sampling; set `do_sample=True` or unset it."
            if self.min_p is not None:
                issues["min_p"] = f"is {self.min_p}, but only used when sampling; set `do_sample=True` or unset it."
        if self.num_beams is None or self.num_beams == 1:
            if self.early_stopping not in (None, False):
                issues["early_stopping"] = "is only used in beam search; set `num_beams>1` or unset it."
            if self.length_penalty is not None and self.length_penalty != 1.0:
                issues["length_penalty"] = "is only used in beam search; set `num_beams>1` or unset it."
        if self.return_dict_in_generate is not True:
            for flag in self.extra_output_flags:
                if getattr(self, flag) is True:
                    issues[flag] = "is ignored unless `return_dict_in_generate=True`."
        return issues

    def get_generation_mode(self) -> str:
        """'greedy_search', 'sample', 'beam_search' or 'beam_sample' (the reference's mode names)."""
        beams = self.num_beams is not None and self.num_beams > 1
        if beams:
            return "beam_sample" if self.do_sample is True else "beam_search"
        return "sample" if self.do_sample is True else "greedy_search"

    # ------------------------------------------------------------ dict / json
    def to_dict(self) -> dict[str, Any]:
        """Every attribute, including unset ones (None)."""
        output = copy.deepcopy({k: v for k, v in self.__dict__.items() if k not in ("_original_object_hash",)})
        output.pop("_commit_hash", None)
        return output

    def to_diff_dict(self) -> dict[str, Any]:
        """Only the attributes that differ from a fresh `GenerationConfig()` (what gets saved)."""
        default = GenerationConfig().to_dict()
        return {
            key: value
            for key, value in self.to_dict().items()
            if key not in default or value != default[key]
        }

    def to_json_string(self, use_diff: bool = True, ignore_metadata: bool = False) -> str:
        config_dict = self.to_diff_dict() if use_diff else self.to_dict()
        if ignore_metadata:
            for field in METADATA_FIELDS:
                config_dict.pop(field, None)
        return json.dumps(_jsonable(config_dict), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike, use_diff: bool = True) -> None:
        Path(json_file_path).write_text(self.to_json_string(use_diff=use_diff), encoding="utf-8")

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> GenerationConfig | tuple[GenerationConfig, dict]:
        """Build from a dict; `kwargs` override it. With `return_unused_kwargs=True` also return unknown kwargs."""
        return_unused_kwargs = kwargs.pop("return_unused_kwargs", False)
        config = cls(**{**config_dict, **kwargs})
        unused = config.update(**kwargs)
        return (config, unused) if return_unused_kwargs else config

    def update(self, **kwargs: Any) -> dict[str, Any]:
        """Set the attributes that exist; return the kwargs that matched none."""
        used = [key for key in kwargs if hasattr(self, key)]
        for key in used:
            setattr(self, key, kwargs[key])
        self.validate(user_set_attributes=set(used))
        return {key: value for key, value in kwargs.items() if key not in used}

    # ------------------------------------------------------------- files
    def save_pretrained(self, save_directory: str | os.PathLike, config_file_name: str | None = None) -> None:
        """Write `generation_config.json` (only the set fields) into `save_directory`."""
        self.validate()
        directory = Path(save_directory)
        if directory.is_file():
            raise ValueError(f"save_directory {str(directory)!r} is a file; pass a directory.")
        directory.mkdir(parents=True, exist_ok=True)
        self.to_json_file(directory / (config_file_name or GENERATION_CONFIG_NAME))

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name: str | os.PathLike, config_file_name: str | None = None, **kwargs: Any
    ) -> GenerationConfig | tuple[GenerationConfig, dict]:
        """Load from a directory (or a JSON file path, or a hub repo id when it is reachable)."""
        file_name = config_file_name or GENERATION_CONFIG_NAME
        path = _resolve_config_file(pretrained_model_name, file_name, kwargs)
        try:
            config_dict = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise OSError(f"The generation config file {str(path)!r} is not valid JSON: {err}") from err
        if not isinstance(config_dict, dict):
            raise OSError(f"The generation config file {str(path)!r} must hold a JSON object.")
        if kwargs.pop("_from_model_config", False):
            return cls.from_model_config(config_dict)
        return cls.from_dict(config_dict, **kwargs)

    @classmethod
    def from_model_config(cls, model_config: Any) -> GenerationConfig:
        """Take the generation-related fields (token ids, use_cache, ...) from a model config or its dict."""
        if isinstance(model_config, dict):
            config_dict = dict(model_config)
        elif hasattr(model_config, "to_dict"):
            config_dict = model_config.to_dict()
        elif dataclasses.is_dataclass(model_config):
            config_dict = dataclasses.asdict(model_config)
        else:
            raise TypeError(f"from_model_config expects a config object or dict, got {type(model_config).__name__}.")
        config_dict.pop("_from_model_config", None)
        config_dict = {key: value for key, value in config_dict.items() if value is not None}
        config = cls(**config_dict, _from_model_config=True)
        if not config.return_dict_in_generate and any(getattr(config, f) for f in config.extra_output_flags):
            config.return_dict_in_generate = True
        return config

    # ------------------------------------------------------------- dunder
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GenerationConfig):
            return False
        return self.to_json_string(use_diff=False, ignore_metadata=True) == other.to_json_string(
            use_diff=False, ignore_metadata=True
        )

    def __hash__(self) -> int:
        return hash(self.to_json_string(ignore_metadata=True))

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string(ignore_metadata=True)}"


# Integer fields and their least meaningful value: below it they can only crash or produce garbage.
_INT_MINIMUMS = {"max_new_tokens": 1, "max_length": 1, "min_length": 0, "min_new_tokens": 0, "num_beams": 1,
                 "num_return_sequences": 1, "top_k": 0, "no_repeat_ngram_size": 0,
                 "encoder_no_repeat_ngram_size": 0, "max_cache_len": 1, "prefill_chunk_size": 1}
# Float fields and the closed/open interval they mean something in ("(" = exclusive).
_FLOAT_RANGES = {"temperature": ("[", 0.0, math.inf, ")"), "top_p": ("[", 0.0, 1.0, "]"),
                 "min_p": ("[", 0.0, 1.0, "]"), "typical_p": ("(", 0.0, 1.0, "]"),
                 "epsilon_cutoff": ("[", 0.0, 1.0, ")"), "eta_cutoff": ("[", 0.0, 1.0, ")"),
                 "repetition_penalty": ("(", 0.0, math.inf, ")"), "encoder_repetition_penalty": ("(", 0.0, math.inf, ")"),
                 "length_penalty": ("(", -math.inf, math.inf, ")"), "max_time": ("[", 0.0, math.inf, ")"),
                 "guidance_scale": ("(", -math.inf, math.inf, ")"), "assistant_ensemble_weight": ("(", 0.0, 1.0, ")")}


def _check_values(config: GenerationConfig) -> None:
    """What transformers' `GenerationConfig.validate` refuses, and the values it lets through that can only
    crash generate() or make garbage (num_beams=0, temperature=inf, a negative n-gram size, ...)."""
    for name, minimum in _INT_MINIMUMS.items():
        value = getattr(config, name, None)
        if value is not None and (not _is_int(value) or value < minimum):
            raise ValueError(f"`{name}` must be an integer >= {minimum}, but is {value!r}.")
    for name, (left, low, high, right) in _FLOAT_RANGES.items():
        value = getattr(config, name, None)
        if value is None:
            continue
        inside = (_is_number(value) and (low <= value if left == "[" else low < value)
                  and (value <= high if right == "]" else value < high))
        if not inside:
            raise ValueError(f"`{name}` must be a number in {left}{low}, {high}{right}, but is {value!r}.")
    if config.do_sample is True and config.temperature == 0:
        raise ValueError("`temperature=0` with `do_sample=True` divides the logits by zero; for greedy decoding "
                         "set `do_sample=False`.")
    if config.min_new_tokens is not None and config.max_new_tokens is not None \
            and config.min_new_tokens > config.max_new_tokens:
        raise ValueError(f"`min_new_tokens` ({config.min_new_tokens}) is above `max_new_tokens` "
                         f"({config.max_new_tokens}): end-of-sequence would be forbidden for the whole answer.")
    if config.suppress_tokens is not None:  # the reference's rule: forcing only suppressed tokens gives NaN
        for name in ("forced_bos_token_id", "forced_eos_token_id"):
            forced = getattr(config, name)
            forced = {forced} if isinstance(forced, int) else set(forced or ())
            if forced and forced <= set(config.suppress_tokens):
                raise ValueError(f"Every token of `{name}` ({sorted(forced)}) is also in `suppress_tokens`: forcing "
                                 f"a suppressed token leaves no token to choose.")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def check_attention_mask(attention_mask: Any) -> None:
    """No row of a generate() prompt may be masked out entirely: it would attend to nothing (transformers
    then generates from NaN). Ids outside the vocabulary are the model's forward's to refuse."""
    if attention_mask is not None and bool((attention_mask == 0).all(dim=-1).any()):
        rows = (attention_mask == 0).all(dim=-1).nonzero().flatten().tolist()
        raise ValueError(f"`attention_mask` masks every token of row(s) {rows}: each row needs at least one "
                         f"token to attend to.")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(key): _jsonable(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(item) for item in obj]
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    return obj


def _resolve_config_file(name: str | os.PathLike, file_name: str, kwargs: dict[str, Any]) -> Path:
    """A local file or directory, else a hub download (huggingface_hub is imported only then)."""
    subfolder = kwargs.pop("subfolder", "") or ""
    hub_options = {key: kwargs.pop(key) for key in ("cache_dir", "force_download", "local_files_only", "token",
                                                      "revision") if key in kwargs}
    for key in ("proxies", "_from_auto", "_from_pipeline"):
        kwargs.pop(key, None)
    path = Path(name)
    if path.is_file():
        return path
    local = path / subfolder / file_name
    if local.is_file():
        return local
    if path.is_dir():
        raise OSError(f"No {file_name} in the directory {str(path)!r}.")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as err:  # pragma: no cover - huggingface_hub is a core dependency
        raise OSError(f"{str(name)!r} is not a local directory and huggingface_hub is not installed.") from err
    try:
        return Path(hf_hub_download(str(name), file_name, subfolder=subfolder or None, **hub_options))
    except Exception as err:
        raise OSError(
            f"Can't load {file_name} for {str(name)!r}: it is not a local directory holding that file and the "
            f"hub download failed ({type(err).__name__}: {err})."
        ) from err
