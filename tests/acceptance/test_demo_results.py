"""The demo (``python -m magtkd.synthetic.demo``, docs/METHOD.md §0): every artifact of both
pipelines, results.json/results.md and the kept model, run.sh's skip/stop behaviour, and the pipeline's
re-runs of interrupted stages."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import REPO, dataset_spec, flags, script, stage_paths
from magtkd import pipeline, results
from magtkd.artifacts import feature_path, StageFiles
from magtkd.pickles import FEATURE_KEYS, load_features
from magtkd.results import majority_weighted_f1, summary
from magtkd.spec import SPLITS
from magtkd.utils import UserError


DATASETS = ("IEMOCAP", "MELD")

CHECKPOINTS = ("text.bin", "audio.bin", "video.bin", "text_KD_audio.bin", "text_KD_video.bin",
               "multimodal_fusion_best.bin")


@pytest.mark.slow
@pytest.mark.parametrize("dataset", DATASETS)
def test_every_artifact_of_the_pipeline_exists_with_its_format(demo, dataset):
    spec, paths = dataset_spec(dataset), stage_paths(demo["workdir"], dataset)
    # Stage 0: the prepared CSVs (+ MELD speaker map).
    for split in SPLITS:
        assert (paths["data_dir"] / spec.csv_names[split]).is_file()
    if dataset == "MELD":
        speaker2id = json.loads((paths["data_dir"] / "speaker2id.json").read_text(encoding="utf-8"))
        assert sorted(speaker2id.values()) == list(range(len(speaker2id)))
    # Stages 1, 2, 4, 5, 6, 8: plain state_dicts with a metrics JSON beside each.
    for name in CHECKPOINTS:
        state = torch.load(paths["save_dir"] / name, map_location="cpu", weights_only=True)
        assert isinstance(state, dict) and state and all(torch.is_tensor(v) for v in state.values()), name
    for name in CHECKPOINTS[:-1]:
        doc = json.loads((paths["save_dir"] / name).with_suffix(".json").read_text(encoding="utf-8"))
        assert doc["selected_epoch"] >= 1 and 0 <= doc["test"]["weighted_f1"] <= 1
    # Plots beside every metrics JSON: curves and the test confusion matrix at the selected epoch.
    for stem in [n[:-4] for n in CHECKPOINTS[:-1]] + ["multimodal_fusion"]:
        for kind in ("curves", "confusion"):
            data = (paths["save_dir"] / f"{stem}_{kind}.png").read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, (stem, kind)
    assert json.loads((paths["save_dir"] / "multimodal_fusion_metrics.json").read_text())["selected_epoch"] >= 1
    # Stage 3: one uint8 frame file per utterance.
    for split in SPLITS:
        frames = sorted((paths["feature_dir"] / "video" / split).glob("*.npy"))
        assert frames and np.load(frames[0]).dtype == np.uint8
    # Stage 7: the three pickles in the authors' layout.
    for split in SPLITS:
        features = load_features(feature_path(paths["feature_dir"], split))
        assert set(features) == {"vids", *FEATURE_KEYS, "speakers", "labels", "dia2utt"}
    # Stage 8: predictions over the test pickle's utterances, in its dialogue order.
    out = json.loads((paths["save_dir"] / "multimodal_fusion_best.json").read_text())
    test = load_features(feature_path(paths["feature_dir"], "test"), keys=("text",))
    assert out["labels"] == [y for vid in test["vids"] for y in test["labels"][vid]]
    assert len(out["preds"]) == len(out["labels"])


@pytest.mark.slow
@pytest.mark.parametrize("dataset", DATASETS)
def test_results_json_matches_the_predictions_and_beats_the_majority_class(demo, dataset):
    results = json.loads((demo["workdir"] / "results.json").read_text())
    assert set(results) == set(DATASETS)
    r = results[dataset]
    # The headline figures are those of the kept model (the best dev seed's multimodal_fusion_best.*).
    save_dir = demo["workdir"] / dataset / "save_model"
    out = json.loads((save_dir / "multimodal_fusion_best.json").read_text())
    recomputed = summary(out["labels"], out["preds"])
    assert r["test_weighted_f1"] == pytest.approx(recomputed["weighted_f1"])
    assert r["test_accuracy"] == pytest.approx(recomputed["accuracy"])
    assert 0 <= r["test_accuracy"] <= 1 and 0 <= r["test_weighted_f1"] <= 1
    train = load_features(feature_path(demo["workdir"] / dataset / "feature", "train"), keys=("text",))
    majority = majority_weighted_f1([y for v in train["vids"] for y in train["labels"][v]], out["labels"])
    assert r["majority_weighted_f1"] == pytest.approx(majority)
    assert r["test_weighted_f1"] >= majority + 0.2, r
    assert set(r["seconds"]) == {"preprocessing", "text", "audio", "frames", "video", "kd_audio", "kd_video",
                                 "features", "fusion"}
    assert "| " + dataset + " |" in (demo["workdir"] / "results.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("dataset", DATASETS)
def test_demo_reports_three_fusion_seeds_with_mean_std_and_both_protocols(demo, dataset):
    results = json.loads((demo["workdir"] / "results.json").read_text())[dataset]
    save_dir = demo["workdir"] / dataset / "save_model"
    seeds = json.loads((save_dir / "multimodal_fusion_seeds.json").read_text())
    assert results["seeds"] == seeds
    assert [row["seed"] for row in seeds["seeds"]] == [2024, 2025, 2026]
    for key in ("test_accuracy", "test_weighted_f1", "test_selected_weighted_f1"):
        values = np.array([row[key] for row in seeds["seeds"]])
        assert seeds["mean"][key] == pytest.approx(values.mean())
        assert seeds["std"][key] == pytest.approx(values.std(ddof=1))
    best = max(seeds["seeds"], key=lambda row: row["dev_weighted_f1"])["seed"]
    kept = next(row for row in seeds["seeds"] if row["seed"] == best)
    assert results["kept_model"]["seed"] == best == seeds["best_seed"]
    assert kept["test_weighted_f1"] == pytest.approx(results["test_weighted_f1"])
    assert kept["test_accuracy"] == pytest.approx(results["test_accuracy"])
    assert results["test_weighted_f1_mean"] == pytest.approx(seeds["mean"]["test_weighted_f1"])
    assert (save_dir / "multimodal_fusion_best.bin").read_bytes() == \
        (save_dir / f"multimodal_fusion_best_seed{best}.bin").read_bytes()

    md = (demo["workdir"] / "results.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith(f"| {dataset} |"))
    m, s = seeds["mean"], seeds["std"]
    for key in ("test_accuracy", "test_weighted_f1", "test_selected_weighted_f1"):
        assert f"{m[key]:.4f} ± {s[key]:.4f}" in row, key
    assert "test-selected weighted F1 (authors' protocol" in md
    spec = dataset_spec(dataset)
    for label in spec.labels:  # per-class F1, mean ± std
        f1_mean, f1_std = m["test_per_class_f1"][label], s["test_per_class_f1"][label]
        assert f"{f1_mean:.4f} ± {f1_std:.4f}" in md, label
    links = [part.split(")")[0] for part in md.split("](")[1:]]
    pngs = [link for link in links if link.startswith(dataset + "/") and link.endswith(".png")]
    assert f"{dataset}/save_model/multimodal_fusion_curves.png" in pngs
    assert f"{dataset}/save_model/multimodal_fusion_seed2026_confusion.png" in pngs
    assert all((demo["workdir"] / link).is_file() for link in pngs)


@pytest.mark.slow
def test_demo_headline_is_the_kept_model(demo: dict):
    out = json.loads((demo["workdir"] / "results.json").read_text())
    md = (demo["workdir"] / "results.md").read_text()
    for name, r in out.items():
        save = demo["workdir"] / name / "save_model"
        kept = json.loads(StageFiles.fusion(save).predictions.read_text())
        scores = results.summary(kept["labels"], kept["preds"])
        assert (r["test_accuracy"], r["test_weighted_f1"]) == (scores["accuracy"], scores["weighted_f1"])
        summary = json.loads(StageFiles.fusion(save).seeds_summary.read_text())
        assert r["kept_model"]["seed"] == summary["best_seed"]
        assert r["test_weighted_f1_mean"] == summary["mean"]["test_weighted_f1"]
        assert f"{name} seed {summary['best_seed']}: {scores['accuracy']:.4f} / {scores['weighted_f1']:.4f}" in md
    assert md.index("±") < md.index("Kept model")


def run_sh(dataset: str, workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    paths = stage_paths(workdir, dataset)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        ["bash", str(REPO / dataset / "run.sh"), "--data_dir", str(paths["data_dir"]),
         "--pretrained_dir", str(paths["pretrained_dir"]), "--save_dir", str(paths["save_dir"]),
         "--feature_dir", str(paths["feature_dir"]), "--device", "cpu", *extra],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600,
    )


@pytest.mark.slow
def test_run_sh_skips_stages_whose_outputs_are_up_to_date(demo):
    done = run_sh("IEMOCAP", demo["workdir"])
    assert done.returncode == 0, done.stderr[-3000:]
    for stage in ("preprocessing", "text", "audio", "frames", "video", "kd_audio", "kd_video", "features", "fusion"):
        assert f"[IEMOCAP] {stage}: outputs up to date, skipped" in done.stderr


@pytest.mark.slow
def test_run_sh_stops_at_the_first_failing_stage_and_names_it(demo, tmp_path):
    # A copy of the demo's MELD state without text.bin and with no pretrained models:
    # the text stage must run, fail, and stop the pipeline.
    import shutil

    work = tmp_path / "work"
    src = stage_paths(demo["workdir"], "MELD")
    shutil.copytree(src["data_dir"], work / "datasets" / "MELD")
    (work / "pretrained_model").mkdir()
    shutil.copytree(src["save_dir"], work / "MELD" / "save_model")
    (work / "MELD" / "save_model" / "text.bin").unlink()
    failed = run_sh("MELD", work, "--epochs", "1", "--fusion_epochs", "2")
    assert failed.returncode != 0
    assert "text.py --data_dir" in failed.stderr and "--epochs 1" in failed.stderr  # flags pass through
    assert "[MELD] stage 'text' (text.py) failed" in failed.stderr
    assert "[MELD] audio:" not in failed.stderr  # nothing after the failing stage ran


@pytest.mark.slow
def test_demo_help_lists_its_flags():
    out = subprocess.run([sys.executable, "-m", "magtkd.synthetic.demo", "--help"], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0 and "--workdir" in out.stdout and "--jobs" in out.stdout


@pytest.mark.slow
def test_demo_refuses_a_bad_flag_before_generating_anything(tmp_path):
    out = subprocess.run([sys.executable, "-m", "magtkd.synthetic.demo", "--workdir", str(tmp_path / "w"), "--epochs", "0"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 2
    assert "argument --epochs: expected an integer >= 1, got '0'" in out.stderr
    assert not (tmp_path / "w").exists()


def _copy_demo(demo, tmp_path: Path, name: str) -> dict[str, Path]:
    src = stage_paths(demo["workdir"], name)
    paths = dict(src)
    for key in ("save_dir", "feature_dir"):
        paths[key] = tmp_path / name / key
        shutil.copytree(src[key], paths[key])
    return paths


def _mark_incomplete(record: Path) -> None:
    """Rewrite a completion record as a killed run leaves it (its time stamp kept, so only completeness changes)."""
    stamp = record.stat()
    doc = json.loads(record.read_text())
    record.write_text(json.dumps({**doc, "complete": False}))
    os.utime(record, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))


@pytest.mark.slow
def test_pipeline_reruns_exactly_the_interrupted_stage(demo, tmp_path, monkeypatch, caplog):
    paths = _copy_demo(demo, tmp_path, "IEMOCAP")
    ran: list[str] = []
    monkeypatch.setattr(pipeline, "run_stage", lambda stage, *_: ran.append(stage.script))
    argv = [*[x for k in ("data_dir", "pretrained_dir", "save_dir", "feature_dir")
              for x in (f"--{k}", str(paths[k]))], "--in_process"]
    script("IEMOCAP", "pipeline").main(argv)
    assert ran == []  # a complete copy: everything up to date
    for record in (paths["save_dir"] / "audio.json", paths["feature_dir"] / "video" / "extraction.json",
                   paths["feature_dir"] / "first_stage_features.json"):
        _mark_incomplete(record)
    caplog.set_level(logging.INFO, logger="magtkd")
    script("IEMOCAP", "pipeline").main(argv)
    assert ran == ["audio.py", "video_feature_extract.py", "extract_first_stage_features.py"]
    assert "says its last run did not finish; re-running audio.py" in caplog.text


@pytest.mark.slow
def test_downstream_stages_refuse_incomplete_frames_and_features(demo, tmp_path):
    paths = _copy_demo(demo, tmp_path, "IEMOCAP")
    _mark_incomplete(paths["feature_dir"] / "video" / "extraction.json")
    with pytest.raises(UserError, match=r"stored frames .* incomplete.*re-run video_feature_extract.py"):
        script("IEMOCAP", "video").main(flags(paths, train="False"))
    _mark_incomplete(paths["feature_dir"] / "first_stage_features.json")
    with pytest.raises(UserError, match=r"feature pickles .* incomplete.*re-run extract_first_stage_features.py"):
        script("IEMOCAP", "multimodal_fusion").main(["--feature_dir", str(paths["feature_dir"]),
                                                     "--save_dir", str(paths["save_dir"]), "--train", "False"])
