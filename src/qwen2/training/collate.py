"""Examples -> tensors: padded batches, or rows packing several sequences each.

A packed row carries no attention mask; its position ids restart at 0 for each sequence, and the model turns
the restarts into a block-diagonal causal mask (qwen2.masking.packed_segments), so no sequence attends to
another and each sees the positions it would see alone. The padding at a row's end is a segment of its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qwen2.training.encode import IGNORE, Example


def pad_batch(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids and attention_mask, with `targets` (B, T) or `labels` (B,), and `tokens` (the
    number of real tokens, for tokens/s)."""
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        ids[row, :len(example.input_ids)] = torch.tensor(example.input_ids)
        mask[row, :len(example.input_ids)] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "tokens": mask.sum()}
    if examples[0].label is not None:
        batch["labels"] = torch.tensor([e.label for e in examples], dtype=torch.long)
    else:
        targets = torch.full((len(examples), length), IGNORE, dtype=torch.long)
        for row, example in enumerate(examples):
            targets[row, :len(example.targets)] = torch.tensor(example.targets)
        batch["targets"] = targets
    return batch


def pack(examples: Sequence[Example], max_length: int) -> list[list[Example]]:
    """Group examples, in order, into rows of at most `max_length` tokens (first fit over the open rows)."""
    rows: list[list[Example]] = []
    room: list[int] = []
    for example in examples:
        size = len(example.input_ids)
        for index, left in enumerate(room):
            if size <= left:
                rows[index].append(example)
                room[index] -= size
                break
        else:
            rows.append([example])
            room.append(max_length - size)
    return rows


def packed_batch(rows: Sequence[Sequence[Example]], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, position_ids (restarting per sequence), targets and `tokens` for packed rows of sft or tag
    examples."""
    if any(e.targets is None for row in rows for e in row):
        raise ValueError("packing applies to sft and tag examples (per-token targets), not to classification")
    length = max(sum(len(e.input_ids) for e in row) for row in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), length), dtype=torch.long)
    targets = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for example in row:
            size = len(example.input_ids)
            ids[r, at:at + size] = torch.tensor(example.input_ids)
            positions[r, at:at + size] = torch.arange(size)
            targets[r, at:at + size] = torch.tensor(example.targets)
            at += size
        positions[r, at:] = torch.arange(length - at)  # the padding: a segment of its own
    tokens = torch.tensor(sum(len(e.input_ids) for row in rows for e in row))
    return {"input_ids": ids, "position_ids": positions, "targets": targets, "tokens": tokens}
