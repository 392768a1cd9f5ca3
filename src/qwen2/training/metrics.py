"""Evaluation metrics: accuracy and macro F1 for classification, entity F1 for tagging.

Entity F1 follows seqeval's default (CoNLL) rules: an entity is a maximal run B-X I-X ... (or I-X starting a
run, as conlleval accepts), it counts as found only when its type and both ends match exactly, and
precision/recall/F1 are micro-averaged over all entities. Tags without a `B-`/`I-` prefix (`O`) end entities.
"""

from __future__ import annotations

from collections.abc import Sequence


def accuracy(predictions: Sequence[int], references: Sequence[int]) -> float:
    if len(predictions) != len(references) or not references:
        raise ValueError(f"need equal, non-empty lists, got {len(predictions)} and {len(references)}")
    return sum(p == r for p, r in zip(predictions, references)) / len(references)


def _f1(true_positive: int, predicted: int, actual: int) -> float:
    precision = true_positive / predicted if predicted else 0.0
    recall = true_positive / actual if actual else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def macro_f1(predictions: Sequence[int], references: Sequence[int]) -> float:
    """The mean over labels present in the references or predictions of each label's F1 (scikit-learn's
    'macro' over the labels that occur)."""
    present = sorted(set(references) | set(predictions))
    scores = []
    for label in present:
        true_positive = sum(p == r == label for p, r in zip(predictions, references))
        scores.append(_f1(true_positive, sum(p == label for p in predictions), sum(r == label for r in references)))
    return sum(scores) / len(scores) if scores else 0.0


def entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """(type, first index, last index) of each entity in an IOB1/IOB2 tag sequence."""
    found = set()
    kind, start = None, 0
    for index, tag in enumerate([*tags, "O"]):
        prefix, _, name = tag.partition("-") if tag[:2] in ("B-", "I-") else ("O", "", "")
        continues = prefix == "I" and name == kind
        if kind is not None and not continues:
            found.add((kind, start, index - 1))
            kind = None
        if prefix in ("B", "I") and not continues:
            kind, start = name, index
    return found


def entity_f1(predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Micro precision, recall and F1 over exact-match entities of each sentence."""
    true_positive = predicted = actual = 0
    for guess, truth in zip(predictions, references, strict=True):
        guessed, expected = entities(guess), entities(truth)
        true_positive += len(guessed & expected)
        predicted += len(guessed)
        actual += len(expected)
    precision = true_positive / predicted if predicted else 0.0
    recall = true_positive / actual if actual else 0.0
    return {"precision": precision, "recall": recall, "f1": _f1(true_positive, predicted, actual)}
