"""Which epoch a fusion run keeps (`magtkd.engine.improves`, `magtkd.results`; docs/METHOD.md §5, §7): the best
dev weighted F1, or with ``--selection test`` the authors' rule, rounding and ties included, labelled as what
it is wherever it shows."""

from __future__ import annotations

from pathlib import Path

from magtkd.artifacts import StageFiles
from magtkd.engine import improves
from magtkd.results import (AUTHORS_PROTOCOL, SELECTIONS, metrics_document, seeds_markdown, seeds_summary,
                            authors_kept_row)

# Test weighted F1 per epoch: 69.59 (rounded), then a higher raw value that rounds the same (a tie), then 69.60.
TEST_F1 = [0.695862, 0.695940, 0.695996, 0.69]
DEV_F1 = [0.50, 0.70, 0.60, 0.80]


def rows() -> list[dict]:
    return [{"epoch": i + 1, "train_loss": 1.0, "dev": {"accuracy": d, "weighted_f1": d},
             "test": {"accuracy": t, "weighted_f1": t}} for i, (d, t) in enumerate(zip(DEV_F1, TEST_F1))]


def kept(selection: str) -> int:
    best: dict = {}
    for row in rows():
        if improves(selection, best, row["dev"], row["test"]):
            best = {"epoch": row["epoch"], "dev": row["dev"], "test": row["test"]}
    return best["epoch"]


def test_the_authors_rule_compares_rounded_percentages_and_keeps_the_first_of_ties():
    """Their ``round(f1 * 100, 2) > best``: 69.5862 and 69.5940 are both 69.59, so epoch 1 stays until 69.60."""
    assert kept("test") == 3
    assert authors_kept_row(rows())["epoch"] == 3
    assert authors_kept_row(rows()[:2])["epoch"] == 1  # a plain max would take epoch 2
    assert kept("dev") == 4


def test_the_metrics_document_says_how_the_epoch_was_chosen(tmp_path: Path):
    common = dict(stage="s", script="x.py", dataset="IEMOCAP", labels=["a"], width=4, args={}, sizes={},
                  files=StageFiles.fusion(tmp_path), epochs=rows(), complete=True, test_every_epoch=True)
    on_test = metrics_document(best={"epoch": 3, "dev": rows()[2]["dev"], "test": rows()[2]["test"]},
                               selection="test", **common)
    assert AUTHORS_PROTOCOL in on_test["selection"] and on_test["test_scored"] == "every epoch, selects the epoch"
    assert (on_test["test_selected_epoch"], on_test["test_selected_weighted_f1"]) == (3, TEST_F1[2])
    on_dev = metrics_document(best={"epoch": 4, "dev": rows()[3]["dev"], "test": rows()[3]["test"]}, **common)
    assert on_dev["selection"] == "best dev weighted F1" and on_dev["test_selected_epoch"] == 3


def test_the_seeds_table_of_a_test_selected_run_is_labelled():
    row = {"seed": 1, "selected_epoch": 3, "dev_weighted_f1": 0.6, "test_accuracy": 0.7, "test_weighted_f1": 0.69,
           "test_per_class_f1": {"a": 0.5}}
    doc = seeds_summary([row, {**row, "seed": 2}])
    assert AUTHORS_PROTOCOL not in seeds_markdown("t", doc, ["a"])
    labelled = seeds_markdown("t", {**doc, "selection": SELECTIONS["test"]}, ["a"])
    assert AUTHORS_PROTOCOL in labelled and "selected epoch (test)" in labelled
