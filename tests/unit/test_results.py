"""Several seeds' summary (`magtkd.results`): mean and sample std, and a killed run's temporary files."""

from __future__ import annotations

import json

import pytest

from magtkd import cli, results
from magtkd.artifacts import StageFiles


def test_seeds_summary_mean_and_sample_std():
    rows = [{"seed": 1, "selected_epoch": 2, "dev_weighted_f1": 0.5, "test_accuracy": 0.6, "test_weighted_f1": 0.4,
             "test_per_class_f1": {"a": 0.2, "b": 0.8}},
            {"seed": 2, "selected_epoch": 4, "dev_weighted_f1": 0.7, "test_accuracy": 0.8, "test_weighted_f1": 0.6,
             "test_per_class_f1": {"a": 0.4, "b": 0.6}}]
    doc = results.seeds_summary(rows)
    assert doc["seeds"] == rows
    mean, std = doc["mean"], doc["std"]
    assert mean.pop("test_per_class_f1") == pytest.approx({"a": 0.3, "b": 0.7})
    assert mean == pytest.approx({"selected_epoch": 3.0, "dev_weighted_f1": 0.6, "test_accuracy": 0.7,
                                  "test_weighted_f1": 0.5})  # no "seed": an identifier, not a measurement
    sd = 2 ** 0.5 / 10  # two values 0.2 apart: sample std = 0.1 * sqrt(2)
    assert std.pop("test_per_class_f1") == pytest.approx({"a": sd, "b": sd})
    assert std == pytest.approx({"selected_epoch": 2 ** 0.5, "dev_weighted_f1": sd, "test_accuracy": sd,
                                 "test_weighted_f1": sd})
    assert results.seeds_summary(rows[:1])["std"]["test_weighted_f1"] == 0.0


def test_seeds_summary_removes_the_temps_of_a_killed_run(tmp_path):
    files, docs = {}, {}
    for seed, f1 in ((1, 0.4), (2, 0.6)):
        files[seed] = StageFiles.fusion(tmp_path, cli.seed_tag(seed, [1, 2]))
        assert files[seed].checkpoint.name == f"multimodal_fusion_best_seed{seed}.bin"
        files[seed].checkpoint.write_bytes(bytes([seed]))
        docs[seed] = {"stage": "test", "args": {"epochs": 1}, "sizes": {}, "selected_epoch": 1, "dev_weighted_f1": f1,
                      "test": {"accuracy": 0.5, "weighted_f1": f1, "per_class": {"a": {"f1-score": f1}}}}
    strays = [tmp_path / f".{name}.k1ll.tmp" for name in
              ("multimodal_fusion_seeds.json", "multimodal_fusion_seeds.md", "multimodal_fusion_best.bin")]
    for stray in strays:
        stray.write_bytes(b"")
    doc = results.finish_seeds(docs, files, StageFiles.fusion(tmp_path), ["a"])["seeds"]
    assert doc["best_seed"] == 2 and (tmp_path / "multimodal_fusion_best.bin").read_bytes() == bytes([2])
    assert [stray.name for stray in strays if stray.exists()] == []
    assert json.loads((tmp_path / "multimodal_fusion_seeds.json").read_text())["mean"]["test_weighted_f1"] == 0.5
