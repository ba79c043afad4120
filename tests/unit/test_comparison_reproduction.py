"""The reproduction table (`magtkd.comparison.reproduction_document`; docs/METHOD.md §5, "The reproduction
table"): each release's attention under both selections, the seed-2024 run, the paper's figures and the
paired test of the two attentions, from hand-made runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers import assert_png, dataset_spec
from magtkd.ablation import ablation_variants
from magtkd.comparison import PAPER, paired_bootstrap, reproduction_markdown, write_reproduction
from magtkd.results import AUTHORS_PROTOCOL

LABELS = [0, 1, 2, 1, 0, 2, 2, 1]
DIALOGUES = [0, 0, 1, 1, 2, 2, 3, 3]


def run(key: str, seeds: dict[int, tuple[float, float, float, float, list[int]]]) -> dict:
    """A variant's record: per seed (dev-selected accuracy, weighted F1, test-selected accuracy, weighted F1,
    dev-selected predictions)."""
    rows = [{"seed": seed, "selected_epoch": 4, "test_accuracy": a, "test_weighted_f1": f,
             "test_selected_epoch": 2, "test_selected_accuracy": ta, "test_selected_weighted_f1": tf,
             "labels": LABELS, "preds": preds}
            for seed, (a, f, ta, tf, preds) in seeds.items()]
    return {"complete": True, "setting": {"argv": [key]}, "labels": ["x", "y", "z"], "dialogues": DIALOGUES,
            "seeds": rows}


def test_cells_seed_2024_paper_figures_and_the_paired_test(tmp_path: Path):
    paper_preds = [[0, 1, 2, 1, 0, 2, 2, 0], [0, 1, 1, 1, 0, 2, 2, 1]]
    fixed_preds = [[0, 0, 2, 1, 1, 2, 0, 1], [1, 1, 2, 0, 0, 2, 2, 1]]
    runs = {"paper": run("paper", {2024: (0.70, 0.69, 0.75, 0.74, paper_preds[0]),
                                   7: (0.60, 0.61, 0.65, 0.66, paper_preds[1])}),
            "fixed": run("fixed", {2024: (0.50, 0.52, 0.55, 0.56, fixed_preds[0]),
                                   7: (0.58, 0.57, 0.62, 0.60, fixed_preds[1])})}
    variants = ablation_variants("reproduction", dataset_spec("IEMOCAP"))
    assert [v.key for v in variants] == ["paper", "fixed"] and variants[0].baseline == "fixed"
    assert "--paper_attention" in variants[0].argv and "authors" in variants[1].argv
    doc = write_reproduction(tmp_path, "IEMOCAP", variants, runs, "caption")
    test_cell, dev_cell = doc["attentions"][0]["cells"]
    assert (test_cell["selection"], test_cell["protocol"]) == ("test", AUTHORS_PROTOCOL)
    assert test_cell["weighted_f1_mean"] == pytest.approx(70.0) and test_cell["weighted_f1_std"] == pytest.approx(
        np.std([74, 66], ddof=1))
    assert test_cell["seed_2024"] == {"seed": 2024, "epoch": 2, "accuracy": pytest.approx(75.0),
                                      "weighted_f1": pytest.approx(74.0)}
    assert dev_cell["accuracy_mean"] == pytest.approx(65.0) and dev_cell["seed_2024"]["epoch"] == 4
    expected = paired_bootstrap(LABELS, DIALOGUES, paper_preds, fixed_preds, 3)
    assert doc["paired_test"]["difference_weighted_f1"] == pytest.approx(100 * expected["difference"])
    assert doc["paired_test"]["p_value"] == expected["p_value"] and doc["paired_test"]["selection"] == "dev"
    assert doc["paper"]["weighted_f1"] == PAPER["IEMOCAP"]["weighted_f1"] == 69.59
    table = (tmp_path / "reproduction.md").read_text(encoding="utf-8")
    assert table == reproduction_markdown(doc)
    assert "69.59" in table and "IJCAI 2025" in table and table.count(AUTHORS_PROTOCOL) == 2
    assert "| May 2025 (paper attention) | selected on dev | 2 | 65.00 ± 7.07 | 65.00 ± 5.66 | 70.00 / 69.00 (4) |" \
        in table
    assert_png(tmp_path / "reproduction.png", (590, 420))  # 4 bars


def test_without_seed_2024_the_single_run_is_left_blank(tmp_path: Path):
    runs = {key: run(key, {1: (0.5, 0.5, 0.6, 0.6, LABELS)}) for key in ("paper", "fixed")}
    doc = write_reproduction(tmp_path, "MELD", ablation_variants("reproduction", dataset_spec("MELD")), runs, "c")
    assert doc["attentions"][1]["cells"][0]["seed_2024"] is None
    assert "65.32" in reproduction_markdown(doc) and "| - |" in reproduction_markdown(doc)
