"""``<DS>/ablation.py`` (docs/METHOD.md §5, Ablation tables) on hand-made feature pickles: the
modalities table, its statistics, files and resumability."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import dataset_spec, script
from magtkd import ablation
from magtkd.predictions import read_predictions
from magtkd.results import summary


FAST = ["--epochs", "2", "--n_head", "2", "--device", "cpu", "--lr", "1e-3", "--batch_size", "2"]


def test_modalities_table_for_one_epoch(iemocap_pickles: Path, tmp_path: Path):
    """The script as a user runs it, at its smallest: every subset of T, A, V trained for one epoch, one seed,
    compared with T+A+V; the table in JSON, Markdown and a plot."""
    doc = script("IEMOCAP", "ablation").main(["--table", "modalities", "--seeds", "1", "--feature_dir",
                                              str(iemocap_pickles), "--save_dir", str(tmp_path), *FAST[2:],
                                              "--epochs", "1"])
    folder = tmp_path / "ablation"
    assert [v["key"] for v in doc["variants"]] == ["T", "A", "V", "T+A", "T+V", "A+V", "T+A+V"]
    assert json.loads((folder / "modalities.json").read_text()) == json.loads(json.dumps(doc))
    for row in doc["variants"]:
        assert [s["seed"] for s in row["seeds"]] == [1] and row["test_weighted_f1_std"] == 0.0
        metrics = json.loads((folder / "modalities" / row["key"] / "multimodal_fusion_metrics.json").read_text())
        assert metrics["sizes"]["variant"]["modalities"] == row["key"].split("+") and len(metrics["epochs"]) == 1
        # Each row's run wrote every prediction as a row in its folder; its weighted F1 is the row's
        index = {label: i for i, label in enumerate(dataset_spec("IEMOCAP").labels)}
        frame = read_predictions(folder / "modalities" / row["key"] / "multimodal_fusion_predictions_test.csv")
        scores = summary(frame["gold"].map(index).to_numpy(), frame["predicted"].map(index).to_numpy())
        assert scores["weighted_f1"] == row["seeds"][0]["test_weighted_f1"]
        assert (frame["audio_anchor"] != "").all() == ("A" in row["key"])  # no audio anchor, no audio column
    assert "| T+A+V |" in (folder / "modalities.md").read_text() and (folder / "modalities.png").stat().st_size > 0


@pytest.mark.slow
def test_modalities_table(iemocap_pickles: Path, tmp_path: Path):
    argv = ["--table", "modalities", "--seeds", "1", "2", "--feature_dir", str(iemocap_pickles), "--save_dir",
            str(tmp_path), *FAST]
    doc = script("IEMOCAP", "ablation").main(argv)
    folder = tmp_path / "ablation"
    assert [v["key"] for v in doc["variants"]] == ["T", "A", "V", "T+A", "T+V", "A+V", "T+A+V"]
    assert json.loads((folder / "modalities.json").read_text()) == json.loads(json.dumps(doc))
    for row in doc["variants"]:
        values = [s["test_weighted_f1"] for s in row["seeds"]]
        assert [s["seed"] for s in row["seeds"]] == [1, 2]
        assert row["test_weighted_f1_mean"] == pytest.approx(np.mean(values))
        assert row["test_weighted_f1_std"] == pytest.approx(np.std(values, ddof=1))
        assert row["test_accuracy_mean"] == pytest.approx(np.mean([s["test_accuracy"] for s in row["seeds"]]))
        if row["key"] != "T+A+V":
            assert 0 < row["p_value"] <= 1 and row["reference"] == "T+A+V"
            full = next(r for r in doc["variants"] if r["key"] == "T+A+V")
            assert row["difference_weighted_f1"] == pytest.approx(row["test_weighted_f1_mean"]
                                                                  - full["test_weighted_f1_mean"])
        metrics = json.loads((folder / "modalities" / row["key"] / "multimodal_fusion_metrics_seed1.json").read_text())
        assert metrics["sizes"]["variant"]["modalities"] == row["key"].split("+")
    assert (folder / "modalities.png").stat().st_size > 0
    table = (folder / "modalities.md").read_text()
    assert "| T+A+V |" in table and "**" in table and " ± " in table
    # resumable: finished variants are skipped; a changed setting re-runs them
    record = folder / "modalities" / "T" / ablation.ABLATION_RECORD
    before = record.stat().st_mtime_ns
    script("IEMOCAP", "ablation").main(argv)
    assert record.stat().st_mtime_ns == before
    script("IEMOCAP", "ablation").main([*argv[:-len(FAST)], *FAST[:-2], "--batch_size", "3"])
    assert record.stat().st_mtime_ns != before
