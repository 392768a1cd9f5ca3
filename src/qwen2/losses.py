"""Training losses of the Qwen2 heads, as transformers' loss_utils.py computes them."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean cross entropy, or sum / num_items_in_batch for gradient accumulation across micro-batches."""
    if num_items_in_batch is None:
        return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="mean")
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Next-token loss: position t predicts label t+1 (labels are shifted here), computed in float32."""
    logits = logits.float()
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.reshape(-1).to(logits.device)
    return cross_entropy(logits.view(-1, vocab_size), shift_labels, num_items_in_batch, ignore_index)


def sequence_classification_loss(pooled_logits: torch.Tensor, labels: torch.Tensor, config: Any) -> torch.Tensor:
    """Regression (1 label), single-label (integer labels) or multi-label (float labels), inferred once and
    recorded in `config.problem_type`, as transformers does."""
    num_labels = config.num_labels
    if config.problem_type is None:
        if num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    labels = labels.to(pooled_logits.device)
    if config.problem_type == "regression":
        if num_labels == 1:
            return F.mse_loss(pooled_logits.squeeze(), labels.squeeze())
        return F.mse_loss(pooled_logits, labels)
    if config.problem_type == "single_label_classification":
        return cross_entropy(pooled_logits.view(-1, num_labels), labels.view(-1))
    if config.problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(pooled_logits, labels)
    raise ValueError(
        f"config.problem_type={config.problem_type!r} is not one of 'regression', "
        "'single_label_classification', 'multi_label_classification'."
    )


def question_answering_loss(
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    start_positions: torch.Tensor,
    end_positions: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Mean of start and end cross entropies; positions outside the sequence are clamped and ignored."""
    if start_positions.dim() > 1:
        start_positions = start_positions.squeeze(-1)
    if end_positions.dim() > 1:
        end_positions = end_positions.squeeze(-1)
    ignored = start_logits.size(1)
    start_positions = start_positions.to(start_logits.device).clamp(0, ignored)
    end_positions = end_positions.to(end_logits.device).clamp(0, ignored)
    start_loss = cross_entropy(start_logits, start_positions, num_items_in_batch, ignore_index=ignored)
    end_loss = cross_entropy(end_logits, end_positions, num_items_in_batch, ignore_index=ignored)
    return (start_loss + end_loss) / 2
