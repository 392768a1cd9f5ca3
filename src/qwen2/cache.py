"""KV caches for incremental decoding: `DynamicCache` (growable) and `StaticCache` (preallocated).

Every layer writes new keys/values in place into a buffer (no `torch.cat` of the whole history per step):
full-attention layers keep a linear buffer indexed by cache position, sliding-window layers a ring buffer of
`sliding_window` slots (slot = position % window), so they never hold more than their window. A layer also
reports the absolute position of every key it returns (`kv_positions`), from which the model builds the
attention mask; slots not yet written get position -1. Positions come from `cache_position` tensors, so the
decode path needs no host sync and `StaticCache` keeps static shapes (gpt-fast style, compile friendly).

API as transformers' `Cache`: update / get_seq_length / get_max_cache_shape / reorder_cache /
batch_repeat_interleave / batch_select_indices / crop / reset.
"""

from __future__ import annotations

from typing import Any

import torch

_MIN_CAPACITY = 64


def _as_cache_position(cache_kwargs: Any, start: int, length: int, device: torch.device) -> torch.Tensor:
    if isinstance(cache_kwargs, dict):
        cache_kwargs = cache_kwargs.get("cache_position")
    if cache_kwargs is None:
        return torch.arange(start, start + length, device=device)
    return cache_kwargs.to(device)


class _Layer:
    """Storage for one decoder layer. `capacity` slots of shape (B, n_kv, capacity, head_dim)."""

    def __init__(self, max_len: int | None, window: int | None) -> None:
        self.max_len = max_len  # fixed capacity (static) or None (growable)
        self.window = window  # ring size for sliding-window layers
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.seen = 0  # tokens written so far (python int: known from shapes, no sync)

    # ------------------------------------------------------------------ storage
    def _target_capacity(self, needed: int) -> int:
        if self.max_len is not None:
            return min(self.max_len, self.window) if self.window else self.max_len
        current = 0 if self.keys is None else self.keys.shape[2]
        capacity = max(needed, 2 * current, _MIN_CAPACITY)
        return min(capacity, self.window) if self.window else capacity

    def _reserve(self, like_k: torch.Tensor, like_v: torch.Tensor, needed: int) -> None:
        if self.window is not None:
            needed = min(needed, self.window)
        current = 0 if self.keys is None else self.keys.shape[2]
        if self.keys is not None and (needed <= current or self.max_len is not None):
            return
        capacity = self._target_capacity(needed)
        batch, heads = like_k.shape[:2]
        keys = like_k.new_zeros(batch, heads, capacity, like_k.shape[-1])
        values = like_v.new_zeros(batch, heads, capacity, like_v.shape[-1])
        if self.keys is not None:
            keys[:, :, :current] = self.keys
            values[:, :, :current] = self.values
        self.keys, self.values = keys, values

    def _write(self, slots: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.keys.index_copy_(2, slots, key_states.to(self.keys.dtype))
        self.values.index_copy_(2, slots, value_states.to(self.values.dtype))

    # ------------------------------------------------------------------ reads
    def _slot_positions(self, last: torch.Tensor) -> torch.Tensor:
        """Absolute position held by each ring slot when `last` is the newest written position (-1: empty)."""
        slots = torch.arange(self.keys.shape[2], device=self.keys.device)
        positions = last - torch.remainder(last - slots, self.window)
        return torch.where(positions >= 0, positions, -1)

    def kv_positions(self, cache_position: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Positions of the keys `update` will return for queries at `cache_position`, and whether they are
        exactly 0..end-1 (so a plain causal mask is enough)."""
        q_len = cache_position.shape[0]
        device = cache_position.device
        end = self.seen + q_len
        if self.window is None:
            if self.max_len is None:
                return torch.arange(end, device=device), True
            return torch.arange(self.max_len, device=device), False
        if self.seen == 0:
            return cache_position, False
        self._ensure_ring_capacity(end)
        if q_len == 1:
            return self._slot_positions(cache_position[-1]), False
        return torch.cat([self._slot_positions(cache_position[0] - 1), cache_position]), False

    def _ensure_ring_capacity(self, end: int) -> None:
        # kv_positions runs before update: grow now so the ring it describes is the one update returns.
        if self.max_len is None and self.keys is not None:
            self._reserve(self.keys, self.values, end)

    # ------------------------------------------------------------------ writes
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, cache_position: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q_len = key_states.shape[2]
        start = self.seen
        end = start + q_len
        self.seen = end
        if self.window is None:
            if self.max_len is not None and end > self.max_len:
                raise ValueError(
                    f"StaticCache is full: max_cache_len={self.max_len} but {end} tokens were written; "
                    "create the cache with a larger max_cache_len."
                )
            self._reserve(key_states, value_states, end)
            if self.max_len is None:
                self.keys[:, :, start:end] = key_states
                self.values[:, :, start:end] = value_states
                return self.keys[:, :, :end], self.values[:, :, :end]
            self._write(cache_position, key_states, value_states)
            return self.keys, self.values
        # Sliding window: ring buffer of `window` slots.
        self._reserve(key_states, value_states, end)
        if q_len == 1 and start > 0:
            self._write(torch.remainder(cache_position, self.window), key_states, value_states)
            return self.keys, self.values
        # Several new tokens: every one of them needs the old window, so read before overwriting.
        old_keys = None if start == 0 else self.keys.clone()
        old_values = None if start == 0 else self.values.clone()
        keep = min(q_len, self.window)
        self._write(
            torch.remainder(cache_position[-keep:], self.window), key_states[:, :, -keep:], value_states[:, :, -keep:]
        )
        if old_keys is None:
            return key_states, value_states
        return torch.cat([old_keys, key_states], dim=2), torch.cat([old_values, value_states], dim=2)

    # ------------------------------------------------------------------ edits
    def crop(self, new_length: int) -> None:
        if new_length >= self.seen:
            return
        if self.window is not None and self.seen > self.window:
            raise ValueError(
                f"Cannot crop a sliding-window layer to {new_length} tokens after {self.seen} tokens were written: "
                f"only the last {self.window} are kept."
            )
        self.seen = max(new_length, 0)

    def reorder(self, index: torch.Tensor) -> None:
        if self.keys is not None:
            self.keys.copy_(self.keys.index_select(0, index.to(self.keys.device)))
            self.values.copy_(self.values.index_select(0, index.to(self.values.device)))

    def select(self, index: torch.Tensor) -> None:
        if self.keys is not None:
            self.keys = self.keys.index_select(0, index.to(self.keys.device))
            self.values = self.values.index_select(0, index.to(self.values.device))

    def repeat_interleave(self, repeats: int) -> None:
        if self.keys is not None:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)

    def reset(self) -> None:
        self.seen = 0
        if self.max_len is None:
            self.keys = self.values = None
        elif self.keys is not None:
            self.keys.zero_()
            self.values.zero_()


class Cache:
    """Per-layer KV storage shared by `DynamicCache` and `StaticCache`."""

    is_compileable = False

    def __init__(self) -> None:
        self.layers: list[_Layer] = []

    def _layer(self, layer_idx: int) -> _Layer:
        while len(self.layers) <= layer_idx:
            self.layers.append(_Layer(None, None))
        return self.layers[layer_idx]

    def __len__(self) -> int:
        return len(self.layers)

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, n_kv, T, D) keys/values for `layer_idx`; return all keys/values this layer attends to."""
        layer = self._layer(layer_idx)
        cache_position = _as_cache_position(cache_kwargs, layer.seen, key_states.shape[2], key_states.device)
        return layer.update(key_states, value_states, cache_position)

    def kv_positions(self, layer_idx: int, cache_position: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Absolute positions of the keys the next `update` of `layer_idx` returns (-1 marks an empty slot)."""
        return self._layer(layer_idx).kv_positions(cache_position)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of tokens already processed (not the number kept: sliding layers keep only their window)."""
        if layer_idx >= len(self.layers):
            return 0
        return self.layers[layer_idx].seen

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        """Maximum number of tokens the cache can hold (-1 when unbounded)."""
        return -1

    def get_max_length(self) -> int:
        return self.get_max_cache_shape()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch in place (beam search)."""
        for layer in self.layers:
            layer.reorder(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row `repeats` times (expanding a prompt to beams or samples)."""
        for layer in self.layers:
            layer.repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the batch rows in `indices`."""
        for layer in self.layers:
            layer.select(indices)

    def crop(self, max_length: int) -> None:
        """Keep the first `max_length` tokens; a negative value removes that many tokens from the end."""
        for layer in self.layers:
            new_length = layer.seen + max_length if max_length < 0 else max_length
            layer.crop(new_length)

    def reset(self) -> None:
        """Forget all tokens, keeping (static) buffers allocated."""
        for layer in self.layers:
            layer.reset()

    @property
    def is_sliding(self) -> list[bool]:
        return [layer.window is not None for layer in self.layers]


def _layer_windows(config: Any, num_layers: int | None = None) -> list[int | None]:
    layer_types = list(getattr(config, "layer_types", None) or [])
    count = num_layers if num_layers is not None else len(layer_types) or config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    windows: list[int | None] = []
    for index in range(count):
        kind = layer_types[index] if index < len(layer_types) else "full_attention"
        windows.append(window if kind == "sliding_attention" and window else None)
    return windows


class DynamicCache(Cache):
    """Growable cache (capacity doubles as needed). With `config`, sliding-window layers keep only their window;
    without it, the model configures the cache on first use."""

    def __init__(self, config: Any = None, **kwargs: Any) -> None:
        super().__init__()
        if config is not None:
            self._configure(config)

    def _configure(self, config: Any) -> None:
        if not self.layers:
            self.layers = [_Layer(None, window) for window in _layer_windows(config)]


class StaticCache(Cache):
    """Preallocated cache: per-layer (B, n_kv, max_cache_len, head_dim) buffers written in place with
    `index_copy_` at `cache_position` (sliding-window layers: `min(window, max_cache_len)` ring slots).
    Shapes never change, so a decode step can be captured by `torch.compile` / CUDA graphs."""

    is_compileable = True

    def __init__(
        self,
        config: Any,
        max_batch_size: int | None = None,
        max_cache_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if max_cache_len is None:
            max_cache_len = config.max_position_embeddings
        for name, value in (("max_batch_size", max_batch_size), ("max_cache_len", max_cache_len)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"StaticCache needs a positive integer {name}, got {value!r}.")
        self.max_batch_size = max_batch_size
        self.max_cache_len = max_cache_len
        self.layers = [_Layer(max_cache_len, window) for window in _layer_windows(config)]
        if dtype is None or max_batch_size is None:
            return  # allocated on the first update, with the batch, dtype and device of the model's keys
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        num_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        for layer in self.layers:
            shape = (max_batch_size, num_kv, layer._target_capacity(max_cache_len), head_dim)
            layer.keys = torch.zeros(shape, dtype=dtype, device=device)
            layer.values = torch.zeros(shape, dtype=dtype, device=device)

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_cache_len
