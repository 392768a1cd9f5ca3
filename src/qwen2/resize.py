"""Resizing the vocabulary of a model: the input embeddings and an untied LM head, as transformers 5.24 does.

Semantics of transformers' `PreTrainedModel.resize_token_embeddings`: the size may be rounded up to a multiple
(`pad_to_multiple_of`); rows are kept or cut at the end; added rows are drawn from a normal distribution with
the old rows' mean and 1e-9 times their covariance (`mean_resizing`, so the new tokens barely move the next-token
distribution; the mean itself when that covariance is not positive definite) or else get the model's own
initialisation. The embedding module stays the same object (its weight is replaced), a tied LM head stays tied.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

_COVARIANCE_SCALE = 1e-9


def padded_size(current: int, new_num_tokens: int | None, pad_to_multiple_of: int | None) -> int | None:
    """The new vocabulary size: `new_num_tokens` (default: the current size) rounded up to the multiple."""
    if pad_to_multiple_of is None:
        return new_num_tokens
    if not isinstance(pad_to_multiple_of, int) or isinstance(pad_to_multiple_of, bool) or pad_to_multiple_of <= 0:
        raise ValueError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of!r}")
    size = current if new_num_tokens is None else new_num_tokens
    return -(-size // pad_to_multiple_of) * pad_to_multiple_of


def fill_added_rows_with_mean(old: torch.Tensor, new: torch.Tensor, added: int) -> None:
    """Rows `new[-added:]` drawn around the mean of `old`'s rows (covariance scaled by 1e-9)."""
    rows = old.detach().float()
    mean = rows.mean(dim=0)
    centered = rows - mean
    covariance = _COVARIANCE_SCALE * (centered.T @ centered / rows.shape[0])
    if bool(torch.distributions.constraints.positive_definite.check(covariance).all()):
        normal = torch.distributions.MultivariateNormal(mean, covariance_matrix=covariance)
        sample = normal.sample((added,))
    else:
        sample = mean[None, :].repeat(added, 1)
    with torch.no_grad():
        new[-added:] = sample.to(new.dtype)


def _fill(model: nn.Module, fresh: nn.Module, old_weight: torch.Tensor, mean_resizing: bool) -> None:
    """Initialise `fresh` (built at the new size) as transformers does, then copy the old rows that fit."""
    old_size, size = old_weight.shape[0], fresh.weight.shape[0]
    if size > old_size:
        if mean_resizing:
            fill_added_rows_with_mean(old_weight, fresh.weight.data, size - old_size)
        else:
            model._init_weights(fresh)
    keep = min(size, old_size)
    fresh.weight.data[:keep] = old_weight.data[:keep]


def resize_embedding(model: nn.Module, embeddings: nn.Module, size: int, mean_resizing: bool) -> nn.Module:
    """Resize `embeddings` in place (same module, new weight data)."""
    if not isinstance(embeddings, nn.Embedding):
        raise TypeError(f"Cannot resize input embeddings of type {type(embeddings).__name__}: an nn.Embedding "
                        "is needed (quantised embeddings cannot be resized)")
    weight = embeddings.weight
    if weight.shape[0] != size:
        fresh = nn.Embedding(size, weight.shape[1], device=weight.device, dtype=weight.dtype)
        _fill(model, fresh, weight, mean_resizing)
        embeddings.weight.data = fresh.weight.data
        if embeddings.padding_idx is not None and embeddings.padding_idx > size - 1:
            embeddings.padding_idx = None
    embeddings.num_embeddings = size
    return embeddings


def resize_lm_head(model: nn.Module, head: nn.Module, size: int, mean_resizing: bool) -> nn.Module:
    """A new Linear with `size` output rows (the same module when the size already fits, e.g. a tied head)."""
    if head.weight.shape[0] == size:
        head.out_features = size
        return head
    if type(head) is not nn.Linear or head.bias is not None:
        raise TypeError(f"Cannot resize an LM head of type {type(head).__name__}: a bias-free nn.Linear is needed "
                        "(quantised heads cannot be resized)")
    fresh = nn.Linear(head.in_features, size, bias=False, device=head.weight.device, dtype=head.weight.dtype)
    _fill(model, fresh, head.weight, mean_resizing)
    fresh.weight.requires_grad_(head.weight.requires_grad)
    return fresh
