"""Classification metrics used for model selection and reports."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score


def summary(labels: Sequence[int], preds: Sequence[int]) -> dict[str, float]:
    """Accuracy and weighted F1 as fractions in [0, 1]."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    if labels.size == 0:
        return {"accuracy": 0.0, "weighted_f1": 0.0}
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "weighted_f1": float(f1_score(labels, preds, average="weighted", zero_division=0)),
    }


def per_class(labels: Sequence[int], preds: Sequence[int], names: Sequence[str]) -> dict:
    """Per-class precision / recall / F1 / support (sklearn's dict report)."""
    return classification_report(
        labels, preds, labels=list(range(len(names))), target_names=list(names),
        output_dict=True, zero_division=0,
    )


def report_text(labels: Sequence[int], preds: Sequence[int], names: Sequence[str]) -> str:
    return classification_report(
        labels, preds, labels=list(range(len(names))), target_names=list(names),
        digits=4, zero_division=0,
    )


def confusion(labels: Sequence[int], preds: Sequence[int], n_classes: int) -> list[list[int]]:
    return confusion_matrix(labels, preds, labels=list(range(n_classes))).tolist()


def majority_weighted_f1(train_labels: Sequence[int], test_labels: Sequence[int]) -> float:
    """Weighted F1 of always predicting the most frequent training class."""
    majority = int(np.bincount(np.asarray(train_labels)).argmax())
    return summary(test_labels, [majority] * len(test_labels))["weighted_f1"]
