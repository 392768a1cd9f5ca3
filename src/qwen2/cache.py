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


def _as_cache_position(cache_kwargs: Any, layer: Any, key_states: torch.Tensor) -> torch.Tensor:
    if isinstance(cache_kwargs, dict):
        cache_kwargs = cache_kwargs.get("cache_position")
    if cache_kwargs is None:  # append after what the layer holds
        start = layer.seen
        return torch.arange(start, start + key_states.shape[2], device=key_states.device)
    return cache_kwargs.to(key_states.device)


class _Layer:
    """One decoder layer's (B, n_kv, capacity, head_dim) key/value buffers; sliding-window layers use them as a
    ring of `window` slots (slot = position % window)."""

    def __init__(self, window: int | None) -> None:
        self.window = window
        self._keys: torch.Tensor | None = None  # the buffers (capacity slots)
        self._values: torch.Tensor | None = None

    @property
    def keys(self) -> torch.Tensor | None:
        """The keys as transformers' layer of the same kind holds them (a static layer: its whole buffer)."""
        return self._keys

    @property
    def values(self) -> torch.Tensor | None:
        return self._values

    def _allocate(self, like_k: torch.Tensor, like_v: torch.Tensor, capacity: int) -> None:
        batch, heads = like_k.shape[:2]
        keys = like_k.new_zeros(batch, heads, capacity, like_k.shape[-1])
        values = like_v.new_zeros(batch, heads, capacity, like_v.shape[-1])
        if self._keys is not None:  # growing: keep what is there (slots keep their index)
            current = self._keys.shape[2]
            keys[:, :, :current] = self._keys
            values[:, :, :current] = self._values
        self._keys, self._values = keys, values

    def _write(self, slots: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._keys.index_copy_(2, slots, key_states.to(self._keys.dtype))
        self._values.index_copy_(2, slots, value_states.to(self._values.dtype))

    def _ring_positions(self, last: torch.Tensor, capacity: int) -> torch.Tensor:
        """Absolute position held by each ring slot when `last` is the newest written position (-1: empty)."""
        slots = torch.arange(capacity, device=last.device)
        positions = last - torch.remainder(last - slots, self.window)
        return torch.where(positions >= 0, positions, -1)

    def _ring_kv_positions(self, cache_position: torch.Tensor, capacity: int) -> torch.Tensor:
        if cache_position.shape[0] == 1:  # written first, then read in place
            return self._ring_positions(cache_position[-1], capacity)
        return torch.cat([self._ring_positions(cache_position[0] - 1, capacity), cache_position])

    def _ring_update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, cache_position: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.shape[2] == 1:
            self._write(torch.remainder(cache_position, self.window), key_states, value_states)
            return self._keys, self._values
        # Several new tokens: each of them needs the old window, so read it before overwriting.
        old_keys, old_values = self._keys.clone(), self._values.clone()
        keep = min(key_states.shape[2], self.window)
        self._write(
            torch.remainder(cache_position[-keep:], self.window), key_states[:, :, -keep:], value_states[:, :, -keep:]
        )
        return torch.cat([old_keys, key_states], dim=2), torch.cat([old_values, value_states], dim=2)

    def reorder(self, index: torch.Tensor) -> None:
        if self._keys is not None:
            self._keys.copy_(self._keys.index_select(0, index.to(self._keys.device)))
            self._values.copy_(self._values.index_select(0, index.to(self._values.device)))

    def select(self, index: torch.Tensor) -> None:
        if self._keys is not None:
            self._keys = self._keys.index_select(0, index.to(self._keys.device))
            self._values = self._values.index_select(0, index.to(self._values.device))

    def repeat_interleave(self, repeats: int) -> None:
        if self._keys is not None:
            self._keys = self._keys.repeat_interleave(repeats, dim=0)
            self._values = self._values.repeat_interleave(repeats, dim=0)

    def _check_crop(self, new_length: int) -> None:
        if self.window is not None and self.seen > self.window and new_length < self.seen:
            raise ValueError(
                f"Cannot crop a sliding-window layer to {new_length} tokens after {self.seen} tokens were written: "
                f"only the last {self.window} are kept."
            )


class _DynamicLayer(_Layer):
    """Growable: capacity doubles when full (amortised O(1) appends); a sliding layer stops growing at its window.
    Tracks its length as a python int, known from shapes."""

    def __init__(self, window: int | None) -> None:
        super().__init__(window)
        self.seen = 0

    @property
    def keys(self) -> torch.Tensor | None:
        """(B, n_kv, T, D): the tokens written, as transformers' DynamicLayer holds them (a sliding layer: the
        last `window - 1`, in order); the buffer behind it keeps spare capacity."""
        return self._visible(self._keys)

    @property
    def values(self) -> torch.Tensor | None:
        return self._visible(self._values)

    def _visible(self, buffer: torch.Tensor | None) -> torch.Tensor | None:
        if buffer is None:
            return None
        if self.window is None:
            return buffer[:, :, :self.seen]
        kept = min(self.seen, self.window - 1)
        positions = torch.arange(self.seen - kept, self.seen, device=buffer.device)
        return buffer.index_select(2, torch.remainder(positions, self.window))

    def _reserve(self, like_k: torch.Tensor, like_v: torch.Tensor, needed: int) -> None:
        if self.window is not None:
            needed = min(needed, self.window)
        current = 0 if self._keys is None else self._keys.shape[2]
        if self._keys is not None and needed <= current:
            return
        capacity = max(needed, 2 * current, _MIN_CAPACITY)
        self._allocate(like_k, like_v, min(capacity, self.window) if self.window else capacity)

    def kv_positions(self, cache_position: torch.Tensor) -> tuple[torch.Tensor, bool]:
        end = self.seen + cache_position.shape[0]
        if self.window is None:
            return torch.arange(end, device=cache_position.device), True
        if self.seen == 0:
            return cache_position, False
        self._reserve(self._keys, self._values, end)  # grow now, so the ring described is the one update returns
        return self._ring_kv_positions(cache_position, self._keys.shape[2]), False

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, cache_position: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.seen, self.seen + key_states.shape[2]
        self.seen = end
        self._reserve(key_states, value_states, end)
        if self.window is None:
            self._keys[:, :, start:end] = key_states
            self._values[:, :, start:end] = value_states
            return self._keys[:, :, :end], self._values[:, :, :end]
        if start == 0:  # nothing cached yet: attend to the new tokens only, as transformers does
            keep = min(end, self.window)
            self._write(torch.remainder(cache_position[-keep:], self.window),
                        key_states[:, :, -keep:], value_states[:, :, -keep:])
            return key_states, value_states
        return self._ring_update(key_states, value_states, cache_position)

    def crop(self, new_length: int) -> None:
        self._check_crop(new_length)
        self.seen = max(min(new_length, self.seen), 0)

    def reset(self) -> None:
        self.seen = 0
        self._keys = self._values = None


class _StaticLayer(_Layer):
    """Fixed capacity, written with `index_copy_` at `cache_position`. The length lives in a tensor (the newest
    position written), never a python int the decode path reads, so a compiled decode step has nothing to
    guard on and is not recompiled as the sequence grows."""

    def __init__(self, max_len: int, window: int | None) -> None:
        super().__init__(window)
        self.max_len = max_len
        self.capacity = min(max_len, window) if window else max_len
        self._last: torch.Tensor | None = None  # (1,) newest position written

    @property
    def seen(self) -> int:
        return 0 if self._last is None else int(self._last[0]) + 1

    def _prefix_end(self, cache_position: torch.Tensor) -> int | None:
        """Several new tokens in eager mode (prefill): the slots up to the newest position, the only ones a
        query can see, so prefill attends causally to `end` keys instead of the whole buffer. None when
        decoding or compiling, which keep the static full-buffer shape."""
        if self.window is not None or cache_position.shape[0] == 1 or torch.compiler.is_compiling():
            return None
        return min(int(cache_position[-1]) + 1, self.max_len)

    def kv_positions(self, cache_position: torch.Tensor) -> tuple[torch.Tensor, bool]:
        end = self._prefix_end(cache_position)
        if end is not None:
            return torch.arange(end, device=cache_position.device), True
        if self.window is None:  # the buffer's own length: a compiled step may treat it as dynamic
            length = self.max_len if self._keys is None else self._keys.shape[2]
            return torch.arange(length, device=cache_position.device), False
        return self._ring_kv_positions(cache_position, self.capacity), False

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, cache_position: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._keys is None:
            self._allocate(key_states, value_states, self.capacity)
        if not torch.compiler.is_compiling() and cache_position.device.type == "cpu":
            if int(cache_position[-1]) >= self.max_len:
                raise ValueError(
                    f"StaticCache is full: max_cache_len={self.max_len} but position {int(cache_position[-1])} "
                    "was written; create the cache with a larger max_cache_len."
                )
        self._last = cache_position[-1:]
        if self.window is None:
            self._write(cache_position, key_states, value_states)
            end = self._prefix_end(cache_position)
            if end is not None:
                return self._keys[:, :, :end], self._values[:, :, :end]
            return self._keys, self._values
        return self._ring_update(key_states, value_states, cache_position)

    def crop(self, new_length: int) -> None:
        self._check_crop(new_length)
        new_length = max(min(new_length, self.seen), 0)
        device = self._last.device if self._last is not None else None
        self._last = torch.tensor([new_length - 1], device=device) if new_length > 0 else None

    def reset(self) -> None:
        self._last = None
        if self._keys is not None:
            self._keys.zero_()
            self._values.zero_()


class Cache:
    """Per-layer KV storage shared by `DynamicCache` and `StaticCache`."""

    is_compileable = False

    def __init__(self) -> None:
        self.layers: list[_Layer] = []

    def _layer(self, layer_idx: int) -> _Layer:
        while len(self.layers) <= layer_idx:
            self.layers.append(_DynamicLayer(None))
        return self.layers[layer_idx]

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        windows = sorted({layer.window for layer in self.layers if layer.window is not None})
        return f"{type(self).__name__}(layers={len(self.layers)}, seq_length={self.get_seq_length()}, windows={windows})"

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, n_kv, T, D) keys/values for `layer_idx`; return all keys/values this layer attends to."""
        layer = self._layer(layer_idx)
        return layer.update(key_states, value_states, _as_cache_position(cache_kwargs, layer, key_states))

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


def _layer_windows(config: Any) -> list[int | None]:
    """Per layer: the sliding window for "sliding_attention" layers, None for full attention."""
    layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)
    window = getattr(config, "sliding_window", None)
    return [window if kind == "sliding_attention" and window else None for kind in layer_types]


class DynamicCache(Cache):
    """Growable cache (capacity doubles as needed). With `config`, sliding-window layers keep only their window;
    without it, the model configures the cache on first use."""

    def __init__(self, config: Any = None, **kwargs: Any) -> None:
        super().__init__()
        if config is not None:
            self._configure(config)

    def _configure(self, config: Any) -> None:
        if not self.layers:
            self.layers = [_DynamicLayer(window) for window in _layer_windows(config)]


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
        self.layers = [_StaticLayer(max_cache_len, window) for window in _layer_windows(config)]
        if dtype is None or max_batch_size is None:
            return  # allocated on the first update, with the batch, dtype and device of the model's keys
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        num_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        for layer in self.layers:
            shape = (max_batch_size, num_kv, layer.capacity, head_dim)
            layer._keys = torch.zeros(shape, dtype=dtype, device=device)
            layer._values = torch.zeros(shape, dtype=dtype, device=device)

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_cache_len
