"""Evaluation metrics against counts worked out by hand (seqeval's CoNLL entity rules, scikit-learn's macro F1)."""

from __future__ import annotations

import pytest

from qwen2.training.metrics import accuracy, entities, entity_f1, macro_f1


def test_entities_follow_conll_rules():
    assert entities(["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC"]) == {("PER", 0, 1), ("LOC", 3, 3),
                                                                            ("LOC", 4, 5)}
    assert entities(["I-NUM", "I-NUM", "O"]) == {("NUM", 0, 1)}  # I- opening a run starts an entity
    assert entities(["B-PER", "I-LOC"]) == {("PER", 0, 0), ("LOC", 1, 1)}  # a type change ends one
    assert entities(["O", "O"]) == set()


def test_entity_f1_counts_exact_matches_only():
    truth = [["B-PER", "I-PER", "O", "B-LOC"], ["B-NUM", "O"]]
    guess = [["B-PER", "O", "O", "B-LOC"], ["B-NUM", "B-NUM"]]  # PER cut short: wrong; LOC, NUM right; one extra
    scores = entity_f1(guess, truth)
    # 2 true positives, 4 predicted, 3 actual: precision 1/2, recall 2/3, F1 = 2*(1/2)*(2/3)/(1/2+2/3) = 4/7
    assert scores == pytest.approx({"precision": 0.5, "recall": 2 / 3, "f1": 4 / 7})
    assert entity_f1([["O"]], [["O"]])["f1"] == 0.0


def test_accuracy_and_macro_f1():
    references = [0, 0, 1, 1, 2]
    predictions = [0, 1, 1, 1, 0]
    assert accuracy(predictions, references) == pytest.approx(3 / 5)
    # label 0: tp 1, predicted 2, actual 2 -> 1/2; label 1: tp 2, predicted 3, actual 2 -> 4/5; label 2: 0
    assert macro_f1(predictions, references) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    with pytest.raises(ValueError, match="equal, non-empty"):
        accuracy([], [])
