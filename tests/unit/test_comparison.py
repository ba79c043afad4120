"""The ablation tables' statistics (`magtkd.comparison`): weighted F1 of repeated utterances and the
paired bootstrap (docs/METHOD.md §5, Ablation tables)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from magtkd import comparison


def test_weighted_f1_of_weights_is_sklearns_on_the_repeated_utterances():
    rng = np.random.default_rng(1)
    labels, preds = rng.integers(0, 5, 60), rng.integers(0, 6, 60)
    weights = rng.integers(0, 4, (3, 60))
    ours = comparison.weighted_f1_weighted(labels, preds, weights.astype(float), 6)
    for w, value in zip(weights, ours):
        theirs = f1_score(np.repeat(labels, w), np.repeat(preds, w), average="weighted", zero_division=0)
        assert value == pytest.approx(theirs, abs=1e-12)


def test_paired_bootstrap_identical_and_better_models():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    dialogues = np.repeat(np.arange(40), 5)
    same = comparison.paired_bootstrap(labels, dialogues, [labels], [labels], 3)
    assert same["difference"] == 0 and same["p_value"] == 1.0
    noisy = np.where(rng.random(200) < 0.6, rng.integers(0, 3, 200), labels)
    better = comparison.paired_bootstrap(labels, dialogues, [labels], [noisy], 3)
    assert better["difference"] > 0.2 and better["p_value"] < 0.01
