"""Attention masks by absolute position, with the semantics of transformers' masking_utils.py.

A layer's keys come with their absolute positions (from the cache, or the current tokens without one), so one
rule covers no cache, growable and static caches and sliding-window ring buffers alike.
"""

from __future__ import annotations

import torch

# (bool mask (B|1, 1, q, kv) or None, is_causal): None+False attends everywhere, None+True is plain causal.
AttentionMask = tuple[torch.Tensor | None, bool]


def build_mask(
    kv_positions: torch.Tensor,
    is_prefix: bool,
    query_positions: torch.Tensor,
    padding_mask: torch.Tensor | None,
    window: int | None,
    segments: torch.Tensor | None,
) -> AttentionMask:
    """Boolean mask over the keys a layer sees, by absolute position (transformers' masking_utils semantics):
    key j is visible to query i iff 0 <= pos_j <= pos_i, pos_j > pos_i - window (window includes the query),
    the key is not padding, and (packed sequences) both belong to the same segment."""
    q_len, kv_len = query_positions.shape[0], kv_positions.shape[0]
    if padding_mask is None and segments is None and is_prefix and (window is None or kv_len <= window):
        if q_len == 1:
            return None, False
        if q_len == kv_len:
            return None, True
    kv, q = kv_positions[None, :], query_positions[:, None]
    allowed = (kv >= 0) & (kv <= q)  # (q, kv)
    if window is not None:
        allowed = allowed & (kv > q - window)
    allowed = allowed[None, None]  # (1, 1, q, kv)
    if padding_mask is not None:
        padding = padding_mask.to(device=kv.device, dtype=torch.bool)
        # Keys past the end of the 2-D mask count as padding (transformers pads the mask with zeros).
        index = kv_positions.clamp(0, padding.shape[1] - 1)
        visible = padding[:, index] & (kv_positions < padding.shape[1])
        allowed = allowed & visible[:, None, None, :]
    if segments is not None:
        allowed = allowed & (segments[:, None, :, None] == segments[:, None, None, :])
    return allowed, False


def packed_segments(position_ids: torch.Tensor, batch: int) -> torch.Tensor | None:
    """Sequence ids when several sequences are packed in one row (positions restart), else None."""
    position_ids = position_ids.expand(batch, -1)
    diff = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    segments = (diff != 1).cumsum(-1)
    return segments if bool((segments[:, -1] != 0).any()) else None
