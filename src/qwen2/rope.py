"""Rotary position embedding: inverse-frequency initialisers for every rope type Qwen2 configs use.

Each initialiser maps (rope parameters, head_dim, max_position_embeddings, seq_len) to (inv_freq, attention
scaling), with the formulas of transformers' modeling_rope_utils.py (default, linear, dynamic NTK, YaRN, LongRoPE,
Llama 3), computed in float32 in the same order so tables match the reference bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# (params, head_dim, max_position_embeddings, seq_len, device) -> (inv_freq, attention scaling)
RopeInit = Callable[..., tuple[torch.Tensor, float]]


def _base_inv_freq(base: float, dim: int, device: torch.device | None) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
    return 1.0 / (base**exponents)


def _default(params: dict[str, Any], dim: int, max_positions: int, seq_len: Any, device=None):
    return _base_inv_freq(params["rope_theta"], dim, device), 1.0


def _linear(params: dict[str, Any], dim: int, max_positions: int, seq_len: Any, device=None):
    return _base_inv_freq(params["rope_theta"], dim, device) / params["factor"], 1.0


def _dynamic(params: dict[str, Any], dim: int, max_positions: int, seq_len: Any, device=None):
    """NTK-aware scaling: the base grows with the sequence once it exceeds max_position_embeddings."""
    factor = params["factor"]
    if seq_len is None:
        seq_len = max_positions
    elif isinstance(seq_len, torch.Tensor):
        seq_len = torch.maximum(seq_len, torch.tensor(max_positions, dtype=seq_len.dtype, device=seq_len.device))
    else:
        seq_len = max(seq_len, max_positions)
    base = params["rope_theta"] * ((factor * seq_len / max_positions) - (factor - 1)) ** (dim / (dim - 2))
    return _base_inv_freq(base, dim, device), 1.0


def _extension(params: dict[str, Any], max_positions: int) -> tuple[float, int, float]:
    """(base, original context, factor) of a context-extension rope; the factor defaults to the extension ratio."""
    original = params["original_max_position_embeddings"]
    factor = params.get("factor")
    return params["rope_theta"], original, max_positions / original if factor is None else factor


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(params: dict[str, Any], dim: int, max_positions: int, seq_len: Any, device=None):
    """YaRN: interpolate low frequencies, extrapolate high ones, blend with a linear ramp; scale attention."""
    base, original, factor = _extension(params, max_positions)
    attention_factor = params.get("attention_factor")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)

    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_weight = 1 - ramp.to(device=device, dtype=torch.float)
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq, attention_factor


def _longrope(params: dict[str, Any], dim: int, max_positions: int, seq_len: Any, device=None):
    """LongRoPE: per-dimension rescaling, `long_factor` beyond the original context, `short_factor` within it."""
    base, original, factor = _extension(params, max_positions)
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    use_long = bool(seq_len and seq_len > original)
    ext = torch.tensor(params["long_factor" if use_long else "short_factor"], dtype=torch.float32, device=device)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (ext * base**exponents), attention_factor


def _llama3(params: dict[str, Any], dim: int, max_positions: int, seq_len: Any, device=None):
    """Llama 3.1: divide low frequencies by `factor`, keep high ones, smooth in between."""
    inv_freq = _base_inv_freq(params["rope_theta"], dim, device)
    factor = params["factor"]
    low_factor, high_factor = params["low_freq_factor"], params["high_freq_factor"]
    original = params["original_max_position_embeddings"]
    low_wavelen, high_wavelen = original / low_factor, original / high_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low_factor) / (high_factor - low_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled), 1.0


ROPE_INIT_FUNCTIONS: dict[str, RopeInit] = {
    "default": _default,
    "linear": _linear,
    "dynamic": _dynamic,
    "yarn": _yarn,
    "longrope": _longrope,
    "llama3": _llama3,
}


def rope_parameters_of(config: Any) -> dict[str, Any]:
    """The config's rope parameters as a dict with `rope_type` and `rope_theta` (4.x configs included)."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_type", params.pop("type", "default"))
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    if params["rope_type"] in ("yarn", "longrope", "llama3"):
        params.setdefault("original_max_position_embeddings", config.max_position_embeddings)
    if params["rope_type"] not in ROPE_INIT_FUNCTIONS:
        raise ValueError(
            f"rope_parameters['rope_type']={params['rope_type']!r} is not supported; "
            f"use one of {sorted(ROPE_INIT_FUNCTIONS)}."
        )
    return params


class Qwen2RotaryEmbedding(nn.Module):
    """cos/sin tables for the positions of a forward call, with the half-split (rotate_half) convention.

    `dynamic` and `longrope` change their frequencies with the longest position seen, statefully, exactly as
    transformers' `dynamic_rope_update`; only `dynamic` reads positions back to the host (a sync per call).
    """

    def __init__(self, config: Any, device: torch.device | None = None) -> None:
        super().__init__()
        self.params = rope_parameters_of(config)
        self.rope_type = self.params["rope_type"]
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.max_positions = config.max_position_embeddings
        self._init = ROPE_INIT_FUNCTIONS[self.rope_type]
        self.register_buffer("inv_freq", torch.empty(self.head_dim // 2, device=device), persistent=False)
        self.register_buffer("original_inv_freq", torch.empty(self.head_dim // 2, device=device), persistent=False)
        self.reset_tables()

    def reset_tables(self, device: torch.device | None = None) -> None:
        """(Re)compute the frequencies in float32 on `device` (default: where the buffers are), e.g. after the
        model was built on the meta device and loaded with `assign=True`."""
        device = torch.device(device) if device is not None else self.inv_freq.device
        self.max_seq_len_cached = self.max_positions
        self.long_inv_freq: torch.Tensor | None = None
        if device.type == "meta":
            # Built for loading: init_buffers() computes the tables once the weights are in. Arithmetic on meta
            # tensors would import torch._dynamo (about a second and 70 MB of resident memory, once per process).
            self.attention_scaling = 1.0
            return
        inv_freq, self.attention_scaling = self._init(self.params, self.head_dim, self.max_positions, None, device)
        self.inv_freq = inv_freq.to(device)
        self.original_inv_freq = inv_freq.clone().to(device)

    def _update_dynamic(self, position_ids: torch.Tensor) -> None:
        seq_len = torch.max(position_ids) + 1
        if seq_len > self.max_seq_len_cached:  # grow: recompute for the longer sequence
            inv_freq, self.attention_scaling = self._init(
                self.params, self.head_dim, self.max_positions, seq_len, position_ids.device
            )
            self.inv_freq = inv_freq
            self.max_seq_len_cached = seq_len
        if seq_len < self.max_positions and self.max_seq_len_cached > self.max_positions:  # back to original
            self.inv_freq = self.original_inv_freq.to(position_ids.device)
            self.max_seq_len_cached = self.max_positions

    def _update_longrope(self, position_ids: torch.Tensor) -> None:
        original = self.params["original_max_position_embeddings"]
        if self.long_inv_freq is None:
            self.long_inv_freq, _ = self._init(
                self.params, self.head_dim, self.max_positions, original + 1, position_ids.device
            )
        seq_len = torch.max(position_ids) + 1
        long_inv_freq = self.long_inv_freq.to(position_ids.device)
        short_inv_freq = self.original_inv_freq.to(position_ids.device)
        self.inv_freq.copy_(torch.where(seq_len > original, long_inv_freq, short_inv_freq))

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rope_type == "dynamic":
            self._update_dynamic(position_ids)
        elif self.rope_type == "longrope":
            self._update_longrope(position_ids)
        inv_freq = self.inv_freq.to(device=x.device, dtype=torch.float)
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, D/2)
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = angles.cos() * self.attention_scaling
        sin = angles.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)
