"""`PreTrainedModel`: transformers' `from_pretrained` / `save_pretrained` for every Qwen2 head.

Loading follows gpt-fast's recipe: build the model on the meta device (no memory, no random init), then give
each parameter its storage in the target dtype and device and fill it straight from the checkpoint (file reads
into it, or a GGUF's blocks dequantised into it, a few MB at a time), and `load_state_dict(assign=True)` so
those tensors *become* the parameters. Peak memory is the model plus a few MB: no float32 copy, no mapped
file pages. With `quantization=` the Linears are swapped for quantised modules first and each weight is
quantised as it is read (`qwen2.quantization.QuantizingLoader`). The model contract:

- `init_buffers()` is called once every parameter is on its final device and dtype; it must (re)create each
  non-persistent buffer (rope tables, ...) there, since the meta-device build left them empty.
- `_init_weights(module)` initialises one module's parameters, as transformers does; it is called only for
  modules with parameters the checkpoint did not provide (e.g. a fresh classification head).
- `tie_weights()` ties `lm_head.weight` to the input embeddings when `config.tie_word_embeddings`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qwen2.config import CONFIG_NAME, Qwen2Config
from qwen2.loading.heap import reuse_large_blocks
from qwen2.loading.hub import resolve_model_dir
from qwen2.loading.safetensors import (TensorSource, checkpoint_dtype, checkpoint_files, iter_sources, read_header,
                                      read_tensor, save_state_dict)

logger = logging.getLogger(__name__)

GENERATION_CONFIG_NAME = "generation_config.json"
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # old checkpoints saved this buffer; it is always recomputed
_MODEL_PATTERNS = ["*.json", "*.safetensors"]
_BIN_PATTERNS = ["*.json", "pytorch_model*.bin"]
# Accepted for transformers compatibility; they change nothing here (single device, no remote code).
_NO_OP_KWARGS = frozenset({"trust_remote_code", "low_cpu_mem_usage", "force_download", "resume_download", "proxies",
                           "mirror", "_fast_init", "offload_folder", "offload_state_dict", "max_memory",
                           "_from_auto", "_from_pipeline"})


class PreTrainedModel(nn.Module):
    """Base of the Qwen2 heads: loading, saving and the small helpers transformers models have."""

    config_class: type = Qwen2Config
    base_model_prefix = "model"
    main_input_name = "input_ids"
    loss_type: str | None = None  # transformers' name of the head's loss (Trainer reads it)

    def __init__(self, config: Qwen2Config, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.config = config
        if getattr(config, "_attn_implementation", None) is None:
            config._attn_implementation = "sdpa"  # what transformers sets on a model it builds
        # An instance attribute, as in transformers: peft reads it from the model's __dict__ for adapter configs.
        self.name_or_path = config.name_or_path

    # ------------------------------------------------------------------------------------------ model contract

    def init_buffers(self) -> None:
        """Recreate non-persistent buffers on the parameters' device; models with buffers override this."""

    def _init_weights(self, module: nn.Module) -> None:
        """transformers' default initialisation: normal(0, initializer_range) weights, zero biases, unit norms."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif getattr(module, "weight", None) is not None and "norm" in type(module).__name__.lower():
            nn.init.ones_(module.weight)

    def get_input_embeddings(self) -> nn.Module | None:
        base = getattr(self, self.base_model_prefix, self)
        return getattr(base, "embed_tokens", None)

    def get_output_embeddings(self) -> nn.Module | None:
        return getattr(self, "lm_head", None)

    def tie_weights(self) -> None:
        """Share the input embedding matrix with the LM head when the config asks for it."""
        output, inputs = self.get_output_embeddings(), self.get_input_embeddings()
        if self.config.tie_word_embeddings and output is not None and inputs is not None:
            output.weight = inputs.weight

    def post_init(self) -> None:
        """Initialise every module and tie weights; call at the end of a head's `__init__` (as transformers)."""
        for module in self.modules():
            self._init_weights(module)
        self.tie_weights()

    # ------------------------------------------------------------------------------------------------ helpers

    @property
    def base_model(self) -> nn.Module:
        """The decoder stack a head is built on (the model itself for `Qwen2Model`)."""
        return getattr(self, self.base_model_prefix, self)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        for param in self.parameters():
            if param.is_floating_point():
                return param.dtype
        return torch.get_default_dtype()

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameter count (shared tensors counted once), optionally only trainable / without embeddings."""
        skip = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)} if exclude_embeddings else set()
        return sum(p.numel() for p in self.parameters()
                   if id(p) not in skip and (p.requires_grad or not only_trainable))

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        """Bytes held by the parameters (and buffers): what the weights cost in memory."""
        tensors = [*self.parameters(), *(self.buffers() if return_buffers else ())]
        return sum(t.nelement() * t.element_size() for t in tensors)

    def enable_input_require_grads(self) -> None:
        """Make the input embeddings' output require grad, so gradients reach adapters (LoRA) and checkpointed
        layers while the embedding weights stay frozen."""
        self.disable_input_require_grads()
        embeddings = self.get_input_embeddings()
        if embeddings is None:
            raise ValueError(f"{type(self).__name__} has no input embeddings to hook")
        hook = embeddings.register_forward_hook(lambda module, inputs, output: output.requires_grad_(True))
        self._require_grads_hooks = [hook]

    def disable_input_require_grads(self) -> None:
        for hook in getattr(self, "_require_grads_hooks", []):
            hook.remove()
        self._require_grads_hooks = []

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Module:
        """Resize the vocabulary (input embeddings and an untied LM head; a tied head stays tied) as transformers
        does, e.g. after adding tokens to the tokenizer; updates `config.vocab_size`. See qwen2.resize."""
        from qwen2.resize import padded_size, resize_embedding, resize_lm_head

        embeddings = self.get_input_embeddings()
        if new_num_tokens is not None and (not isinstance(new_num_tokens, int) or isinstance(new_num_tokens, bool)
                                           or new_num_tokens <= 0):
            raise ValueError(f"new_num_tokens must be a positive integer, got {new_num_tokens!r}")
        size = padded_size(embeddings.weight.shape[0], new_num_tokens, pad_to_multiple_of)
        if size is None:
            return embeddings
        resize_embedding(self, embeddings, size, mean_resizing)
        head = self.get_output_embeddings()
        if head is not None:
            self.set_output_embeddings(resize_lm_head(self, head, size, mean_resizing))
        self.config.vocab_size = size
        for module in (self, self.base_model):
            if hasattr(module, "vocab_size"):
                module.vocab_size = size
        self.tie_weights()
        return embeddings

    def can_generate(self) -> bool:
        return hasattr(self, "generate") and hasattr(self, "lm_head")

    @classmethod
    def _from_config(cls, config: Qwen2Config, dtype: torch.dtype | str | None = None, **kwargs: Any) -> nn.Module:
        """Build a randomly initialised model (transformers' `_from_config`, used by `Auto*.from_config`)."""
        config = _as_qwen2_config(config)
        target = _resolve_dtype(dtype, None, [], config) if dtype is not None else None
        with _default_dtype(target):
            model = cls(config, **kwargs)
        if target is not None:
            model.config.dtype = target
        return model

    # ------------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any,
                        config: Qwen2Config | str | os.PathLike | None = None, dtype: Any = None,
                        torch_dtype: Any = None, device_map: Any = None, gguf_file: str | None = None,
                        revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                        local_files_only: bool = False, token: str | bool | None = None,
                        ignore_mismatched_sizes: bool = False, quantization: str | None = None,
                        group_size: int | None = None, allow_non_finite: bool = False,
                        **kwargs: Any) -> nn.Module:
        """Load a model from a directory, a .gguf file or a hub id; config-named kwargs override the config.

        `dtype` (or the older `torch_dtype`) defaults to "auto", transformers 5's default: the checkpoint's own
        dtype (config.json's `dtype`, else the first floating-point tensor's). `device_map` may be None/"cpu",
        "auto" (first GPU if any, else CPU), a device, or {"": device}; the model lives on one device.
        `quantization` ("int8", "int4" with `group_size`, or "w8a8") quantises the weights as they load (a
        GGUF's 4-bit blocks go to int4 group 32 as they are); a checkpoint saved quantised reloads as such
        without it. A weight holding NaN or Inf is refused, naming it, unless `allow_non_finite=True`.
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        tp_plan, tp_size = kwargs.pop("tp_plan", None), kwargs.pop("tp_size", None)
        use_safetensors = kwargs.pop("use_safetensors", None)
        subfolder = kwargs.pop("subfolder", "") or ""
        if kwargs.pop("variant", None) is not None:
            raise ValueError("variant= checkpoints (model.<variant>.safetensors) are not supported; pass a "
                             "directory holding model.safetensors")
        for name in _NO_OP_KWARGS & kwargs.keys():
            kwargs.pop(name)
        hub_options = dict(gguf_file=gguf_file, revision=revision, cache_dir=cache_dir,
                           local_files_only=local_files_only, token=token)
        directory = resolve_model_dir(pretrained_model_name_or_path, allow_patterns=_MODEL_PATTERNS, **hub_options)
        if gguf_file is None and use_safetensors is not True and not _has_safetensors(directory) \
                and not Path(pretrained_model_name_or_path).expanduser().exists():
            directory = resolve_model_dir(pretrained_model_name_or_path, allow_patterns=_BIN_PATTERNS, **hub_options)
        directory = directory / subfolder

        config, model_kwargs = _load_config(cls, config, directory, pretrained_model_name_or_path, kwargs)
        if model_kwargs:
            raise TypeError(f"{cls.__name__}.from_pretrained got unexpected keyword argument(s) "
                            f"{sorted(model_kwargs)}: they are neither loading options nor config fields")
        files, index_metadata = checkpoint_files(directory, use_safetensors)
        _check_layer_count(config, files)
        target_dtype = _resolve_dtype(dtype if dtype is not None else torch_dtype, index_metadata, files, config)
        config.dtype = target_dtype
        device = _target_device(device_map)
        if tp_plan is not None and device_map is not None:
            raise ValueError("tp_plan and device_map are mutually exclusive: under tp_plan each rank places its "
                             "slice on its own device")

        with _default_dtype(target_dtype), torch.device("meta"), _no_init():
            model = cls(config, *model_args)
            if getattr(config, "quantization_config", None) and tp_plan is None:
                from qwen2.quantization import convert_for_runtime

                convert_for_runtime(model, config.quantization_config)  # same module swap as when it was saved
        sharder = None
        if tp_plan is not None:  # tensor parallelism: this rank's slices only (qwen2.distributed)
            from qwen2.distributed import TensorParallelLoader

            sharder = TensorParallelLoader(model, tp_plan, tp_size)
            device = sharder.device
        elif tp_size is not None:
            raise ValueError("tp_size applies only with tp_plan='auto'")
        quantizer = None
        if quantization is not None:
            from qwen2.quantization import QuantizingLoader

            quantizer = QuantizingLoader(model, quantization, group_size)
        elif group_size is not None:
            raise ValueError("group_size= applies only with quantization='int4'")
        info = _load_weights(model, files, device, ignore_mismatched_sizes, quantizer, not allow_non_finite, sharder)
        if device.type == "cpu":
            reuse_large_blocks()  # after loading: the load's own peak memory is unchanged
        if device_map is not None:
            model.hf_device_map = {"": str(device)}
        model.eval()
        _load_generation_config(model, directory)
        if sharder is not None:
            sharder.finish(model)
        return (model, info) if output_loading_info else model

    # ------------------------------------------------------------------------------------------------- saving

    def save_pretrained(self, save_directory: str | os.PathLike, *, max_shard_size: int | str = "50GB",
                        safe_serialization: bool = True, state_dict: dict[str, torch.Tensor] | None = None,
                        is_main_process: bool = True, **kwargs: Any) -> None:
        """Write config.json (+ generation_config.json) and the weights as transformers does.

        Tied weights are saved once (the LM head of a tied model is left out, as transformers does), so the
        directory loads unchanged in transformers. `max_shard_size` is bytes or a string like "500MB".
        """
        directory = Path(save_directory)
        if directory.is_file():
            raise ValueError(f"save_pretrained needs a directory, but {directory} is a file")
        if getattr(self, "tp_size", 1) > 1:
            raise ValueError("This model is split over tensor-parallel ranks (tp_plan='auto'): each holds only its "
                             "slices. Save the checkpoint it was loaded from, or load it without tp_plan to save")
        if kwargs.get("push_to_hub") or kwargs.get("variant"):
            raise ValueError("push_to_hub and variant are not supported: save to a directory, then upload it with "
                             "huggingface_hub (`hf upload`)")
        if not is_main_process:
            return
        directory.mkdir(parents=True, exist_ok=True)
        self.config.dtype = self.dtype
        self.config.architectures = [type(self).__name__]
        self.config.save_pretrained(directory)
        generation_config = getattr(self, "generation_config", None)
        if generation_config is not None and self.can_generate():
            generation_config.save_pretrained(directory)
        if state_dict is None:
            state_dict = self.state_dict()
        state_dict = {name: tensor for name, tensor in _without_aliases(state_dict)
                      if not name.endswith(_IGNORED_SUFFIXES)}
        save_state_dict(state_dict, directory, max_shard_size, safe_serialization, self.num_parameters())
        logger.info("Model saved in %s", directory)


# ----------------------------------------------------------------------------------------------- loading steps


def _has_safetensors(directory: Path) -> bool:
    return (directory / "model.safetensors").is_file() or (directory / "model.safetensors.index.json").is_file()


def _load_config(cls: type, config: Any, directory: Path, name: Any,
                 kwargs: dict[str, Any]) -> tuple[Qwen2Config, dict[str, Any]]:
    """The model's config, with config-named kwargs applied; returns the kwargs that named no config field."""
    if config is not None and not isinstance(config, (str, os.PathLike)):
        return Qwen2Config.from_dict(_as_qwen2_config(config).to_dict(), return_unused_kwargs=True, **kwargs)
    source = Path(config) if config is not None else directory
    if source.is_dir():
        source = source / CONFIG_NAME
    if not source.is_file():
        ggufs = sorted(p.name for p in directory.glob("*.gguf"))
        hint = f"; to load a GGUF from it pass gguf_file={ggufs[0]!r}" if ggufs else ""
        if not ggufs and _has_safetensors(directory):
            # transformers.Trainer.save_model writes only the weights of a model that is not its own class.
            hint = ("; it holds weights only, as transformers.Trainer.save_model writes them for a qwen2 model: "
                    "call model.save_pretrained(directory) after training (it writes config.json too), or pass "
                    "config= (the base model's directory or config) to load these weights")
        raise OSError(f"{directory} has no {CONFIG_NAME}: it is not a transformers-format model directory{hint}")
    return cls.config_class.from_pretrained(source, name_or_path=str(name), return_unused_kwargs=True, **kwargs)


_LAYER_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _check_layer_count(config: Qwen2Config, files: list[Path]) -> None:
    """Refuse a config with more layers than the checkpoint holds before building anything: a corrupt
    `num_hidden_layers` would otherwise build (and randomly initialise) a model of a million layers.
    From safetensors headers only; pickles and GGUF files (whose own metadata is checked) are not read."""
    if not files or any(path.suffix != ".safetensors" for path in files):
        return
    found = {int(m.group(1)) for path in files for name in read_header(path) if (m := _LAYER_NAME.search(name))}
    if len(found) < config.num_hidden_layers:
        raise ValueError(f"The config of {files[0].parent} says num_hidden_layers={config.num_hidden_layers:,}, "
                         f"but its checkpoint holds weights for {len(found)} layer(s): they do not match")


def _as_qwen2_config(config: Any) -> Qwen2Config:
    """Our config, also from a transformers `Qwen2Config` (same field names) so mixed code keeps working."""
    if isinstance(config, Qwen2Config):
        return config
    if hasattr(config, "to_dict"):
        return Qwen2Config.from_dict(copy.deepcopy(config.to_dict()))
    raise TypeError(f"config must be a Qwen2Config or a path, not {type(config).__name__}")


def _resolve_dtype(dtype: Any, index_metadata: dict | None, files: list[Path], config: Qwen2Config) -> torch.dtype:
    """transformers 5 semantics: None and "auto" mean the checkpoint's own dtype."""
    if isinstance(dtype, dict):
        dtype = dtype.get("", "auto")
    if dtype is None or dtype == "auto":
        if isinstance(config.dtype, torch.dtype):
            return config.dtype
        if index_metadata and index_metadata.get("dtype"):
            return _resolve_dtype(index_metadata["dtype"], None, files, config)
        found = checkpoint_dtype(files[0]) if files else None
        return found if found is not None else torch.get_default_dtype()
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not valid: use 'auto' or a torch dtype name such as 'bfloat16'")
        dtype = resolved
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype={dtype!r} is not valid: use 'auto', a torch.dtype or its name")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype} is not a floating-point dtype; weights need one (e.g. torch.bfloat16)")
    return dtype


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Build modules directly in `dtype` so parameters the checkpoint lacks come out right too."""
    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "xavier_uniform_",
                   "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_")


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """Modules' own random initialisation made a no-op while the model is built on meta (as transformers'
    `no_init_weights`): the values would be thrown away, and on meta tensors torch runs it through its
    decompositions, whose first use imports torch._dynamo and sympy (about a second and 70 MB of memory)."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    for name in saved:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


def _target_device(device_map: Any) -> torch.device:
    """The one device a `device_map` names; maps that split the model over devices are refused."""
    if isinstance(device_map, dict):
        devices = {_device(d) for d in device_map.values()}
        if len(devices) != 1:
            raise ValueError(f"device_map={device_map!r} spreads the model over {len(devices) or 'no'} devices; "
                             f"qwen2 runs a model on one device: use 'auto', 'cpu', 'cuda:0' or {{'': device}}")
        return devices.pop()
    return _device(device_map)


def _device(spec: Any) -> torch.device:
    if spec is None or spec in ("auto", "balanced", "balanced_low_0", "sequential"):
        return torch.device("cuda", 0) if spec is not None and torch.cuda.is_available() else torch.device("cpu")
    if isinstance(spec, int) and not isinstance(spec, bool):
        return torch.device("cuda", spec)
    if spec == "disk":
        raise ValueError("device_map='disk' offloading is not supported; load on 'cpu' instead")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device_map={spec!r} is not a device: use 'auto', 'cpu', 'cuda', 'cuda:1', a "
                         f"torch.device or a dict like {{'': 'cuda:0'}}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device_map={spec!r} asks for CUDA, but torch sees no GPU; use 'cpu' or 'auto'")
    return device


def _sources(path: Path) -> Iterator[tuple[str, TensorSource]]:
    if path.suffix == ".gguf":
        from qwen2.loading.gguf import iter_gguf_sources

        return iter_gguf_sources(path)
    return iter_sources(path)


def _check_finite(tensor: torch.Tensor, name: str, path: Path) -> None:
    """Refuse NaN or Inf: in a weight they make every logit NaN, and greedy decoding then emits token 0
    forever without a word. One `aminmax` over what was just read, while it is still in cache: min and max
    propagate NaN and are infinite when any value is, so this is exact, allocates nothing and runs at
    memory speed (`isfinite` builds a mask and was ~30x slower here)."""
    if not tensor.is_floating_point() or tensor.is_meta or not tensor.numel():
        return
    if tensor.dtype in _MINMAX_DTYPES:
        low, high = torch.aminmax(tensor)
        finite = math.isfinite(low) and math.isfinite(high)
    else:  # float8 and other dtypes aminmax does not take
        finite = bool(torch.isfinite(tensor).all())
    if not finite:
        raise ValueError(f"Tensor {name} in {path} holds NaN or Inf values (as loaded in {tensor.dtype}); "
                         f"the checkpoint is corrupt. Pass allow_non_finite=True to load it anyway")


_MINMAX_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class _FiniteSource:
    """A `TensorSource` whose values are checked by `_check_finite` as they are read."""

    def __init__(self, source: TensorSource, name: str, path: Path) -> None:
        self.source, self.name, self.path = source, name, path
        self.shape, self.dtype = source.shape, source.dtype

    def read_into(self, out: torch.Tensor, start: int = 0) -> None:
        self.source.read_into(out, start)
        _check_finite(out, self.name, self.path)


def _load_weights(model: nn.Module, files: list[Path], device: torch.device, ignore_mismatched_sizes: bool,
                  quantizer: Any = None, check_finite: bool = True, sharder: Any = None) -> dict[str, list]:
    """Fill the meta-built `model` from the checkpoint, one tensor at a time; returns transformers'
    loading-info dict. `quantizer` (a `QuantizingLoader`) quantises the weights of the modules it swapped;
    `check_finite` refuses NaN and Inf in the float weights (`_FiniteSource`); `sharder` (a
    `qwen2.distributed.TensorParallelLoader`) turns each source into this rank's slice of it."""
    expected = model.state_dict()  # meta tensors: names and shapes only
    quantized = quantizer.modules if quantizer is not None else {}
    rename = _key_renamer(set(expected), getattr(model, "base_model_prefix", "model"))
    loaded: dict[str, torch.Tensor] = {}
    unexpected, mismatched = [], []
    for path in files:
        for raw_name, source in _sources(path):
            if raw_name.endswith(_IGNORED_SUFFIXES):
                continue
            name = rename(raw_name)
            stored = getattr(source, "name", raw_name)  # a GGUF's own name for it, which its user knows
            if sharder is not None:
                source = sharder(name, raw_name, source, path)
            label = repr(raw_name) if stored == raw_name else f"{stored!r} ({raw_name})"
            if name in quantized:  # checked once quantised: a NaN or Inf weight gives non-finite scales
                quantizer.load(name, source, device)
                for tensor in quantized[name].buffers() if check_finite else ():
                    _check_finite(tensor, label, path)
                continue
            if check_finite and source.dtype.is_floating_point:
                source = _FiniteSource(source, label, path)
            if name not in expected:
                unexpected.append(raw_name)
                continue
            if tuple(source.shape) != tuple(expected[name].shape):
                if not ignore_mismatched_sizes:
                    raise ValueError(
                        f"Tensor {name!r} in {path} has shape {tuple(source.shape)} but the model expects "
                        f"{tuple(expected[name].shape)}: the checkpoint does not match the config. Pass "
                        f"ignore_mismatched_sizes=True to re-initialise such tensors instead.")
                mismatched.append((name, tuple(source.shape), tuple(expected[name].shape)))
                continue
            if source.dtype.is_floating_point != expected[name].dtype.is_floating_point:
                raise ValueError(f"Tensor {name!r} in {path} is stored as {source.dtype}, but the model holds it "
                                 f"as {expected[name].dtype}: the checkpoint does not match the model")
            # Floats take the dtype the model built for them (quantisation scales may differ from `dtype`).
            target = expected[name].dtype if source.dtype.is_floating_point else source.dtype
            loaded[name] = read_tensor(source, target, device)
    model.load_state_dict(loaded, strict=False, assign=True)
    model.tie_weights()
    missing = _materialise_missing(model, set(loaded), device)
    model.tie_weights()
    model.init_buffers()
    _check_nothing_on_meta(model)

    if missing:
        logger.warning("Some weights of %s were not in the checkpoint and are newly initialised: %s. You should "
                       "probably train this model before using it.", type(model).__name__, missing)
    if unexpected:
        logger.warning("Some weights of the checkpoint were not used by %s: %s", type(model).__name__, unexpected)
    if mismatched:
        details = ", ".join(f"{n} (checkpoint {a}, model {b})" for n, a, b in mismatched)
        logger.warning("Some weights of %s had the wrong shape and are newly initialised: %s",
                       type(model).__name__, details)
    return {"missing_keys": missing, "unexpected_keys": unexpected, "mismatched_keys": mismatched,
            "error_msgs": []}


def _key_renamer(model_keys: set[str], prefix: str):
    """Map checkpoint names onto the model's: a head loads a bare base model's checkpoint and vice versa."""
    model_has_prefix = any(k.startswith(prefix + ".") for k in model_keys)

    def rename(name: str) -> str:
        if name in model_keys:
            return name
        if model_has_prefix and f"{prefix}.{name}" in model_keys:
            return f"{prefix}.{name}"
        if not model_has_prefix and name.startswith(prefix + ".") and name[len(prefix) + 1:] in model_keys:
            return name[len(prefix) + 1:]
        return name

    return rename


def _materialise_missing(model: nn.Module, loaded: set[str], device: torch.device) -> list[str]:
    """Give parameters/persistent buffers the checkpoint lacked real storage and the model's own init.

    Only the missing tensors are replaced; loaded tensors of the same module are restored after
    `_init_weights`, which initialises whole modules.
    """
    missing = []
    for module_name, module in model.named_modules():
        tensors = {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}
        persistent = [n for n in tensors if n not in getattr(module, "_non_persistent_buffers_set", set())]
        absent = [n for n in persistent if tensors[n].is_meta]
        if not absent:
            continue
        keep = {n: tensors[n].detach().clone() for n in persistent if n not in absent}
        for local in absent:
            full = f"{module_name}.{local}" if module_name else local
            old = tensors[local]
            new = torch.empty_like(old, device=device)
            if isinstance(old, nn.Parameter):
                setattr(module, local, nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                module._buffers[local] = new
            if full not in loaded:
                missing.append(full)
        model._init_weights(module)
        with torch.no_grad():
            for local, value in keep.items():
                getattr(module, local).copy_(value)
    return missing


def _check_nothing_on_meta(model: nn.Module) -> None:
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{type(model).__name__} still has tensors on the meta device after loading: {left}; "
                           f"its init_buffers() must recreate every non-persistent buffer")


def _load_generation_config(model: nn.Module, directory: Path) -> None:
    if not hasattr(model, "generation_config") or not (directory / GENERATION_CONFIG_NAME).is_file():
        return
    try:
        from qwen2.generation import GenerationConfig
    except ImportError:
        logger.info("qwen2.generation.GenerationConfig is unavailable; %s not loaded", GENERATION_CONFIG_NAME)
        return
    model.generation_config = GenerationConfig.from_pretrained(directory)


def _without_aliases(state_dict: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Drop later names of tensors sharing storage (a tied LM head): safetensors cannot store aliases."""
    seen: set[tuple] = set()
    for name, tensor in state_dict.items():
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.device.type != "meta" and key in seen:
            continue
        seen.add(key)
        yield name, tensor
