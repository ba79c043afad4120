"""Real scale on CPU: every stage under torchrun (2 gloo processes; docs/METHOD.md §2, §3, §6) with rank 0
alone writing and logging, the features equal to one process's, the fusion run by rank 0 alone, TensorBoard
event files whose learning rates follow one process's, and KD's gradient scaler in its training state.

The runs are shared, not repeated per test: `stages` runs IEMOCAP's stages one after the other under torchrun
(MELD's copies of the scripts are the same code: tests/scripts/test_script_pairs.py), `text_runs` trains
text with one and with two processes, and the KD test starts from `stages`' checkpoints.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import REPO, SUBPROCESS_ENV, script, text_command, tiny_iemocap
from IEMOCAP.config import IEMOCAP
from magtkd import artifacts, pickles
from magtkd.artifacts import features_record, frames_record

pytestmark = pytest.mark.slow

EPOCHS = ("--epochs", "1", "--learning_rate", "1e-3")


def torchrun(dataset: str, name: str, generated: Path, out: Path, *extra: str, nproc: int = 2,
             check: bool = True) -> subprocess.CompletedProcess:
    """``<DS>/<name>.py`` under torchrun on ``out / "data"`` (else the generated data), writing under ``out``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(REPO / dataset / f"{name}.py"), "--device", "cpu", *extra]
    if name != "multimodal_fusion":
        data_dir = out / "data" / dataset if (out / "data").is_dir() else generated / "datasets" / dataset
        command += ["--data_dir", str(data_dir), "--pretrained_dir", str(generated / "pretrained_model")]
    command += ["--save_dir", str(out / "save"), "--feature_dir", str(out / "feature")]
    done = subprocess.run(command, env=SUBPROCESS_ENV, capture_output=True, text=True, cwd=REPO, timeout=1200)
    if check:
        assert done.returncode == 0, f"{name}: {done.stderr[-3000:]}"
    return done


def complete(path: Path) -> bool:
    return json.loads(path.read_text())["complete"] is True


@pytest.fixture(scope="module")
def stages(generated: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """IEMOCAP's stages under torchrun, 2 processes, one epoch each, on the first 24 train, 10 dev and 9 test
    utterances of the generated data (9: one rank gets a padded copy; text with two seeds: the per-seed sets,
    the best seed's copy and the summary); then the features once more by one process (this one) over the same
    frames and checkpoints; then the fusion under torchrun (rank 0 alone)."""
    out = tmp_path_factory.mktemp("torchrun")
    data_dir = tiny_iemocap(generated, out / "data", {"train": 24, "dev": 10, "test": 9})
    text_log = torchrun("IEMOCAP", "text", generated, out, *EPOCHS, "--seeds", "1", "2").stderr
    torchrun("IEMOCAP", "audio", generated, out, *EPOCHS)
    torchrun("IEMOCAP", "video_feature_extract", generated, out)
    torchrun("IEMOCAP", "video", generated, out, *EPOCHS)
    for student in ("audio", "video"):
        torchrun("IEMOCAP", "KD", generated, out, "--student", student, *EPOCHS)
    torchrun("IEMOCAP", "extract_first_stage_features", generated, out)
    temps = list(out.rglob(".*.tmp"))
    one = out / "one"
    (one / "feature").mkdir(parents=True)
    os.symlink(out / "feature" / "video", one / "feature" / "video")
    script("IEMOCAP", "extract_first_stage_features").main([  # one process: this one
        "--data_dir", str(data_dir), "--pretrained_dir", str(generated / "pretrained_model"),
        "--save_dir", str(out / "save"), "--feature_dir", str(one / "feature"), "--device", "cpu"])
    fusion = torchrun("IEMOCAP", "multimodal_fusion", generated, out, "--epochs", "1", check=False)
    return {"out": out, "one": one, "text_log": text_log, "temps": temps, "fusion": fusion}


def test_every_stage_under_torchrun_and_features_equal_one_process(stages: dict) -> None:
    out, save = stages["out"], stages["out"] / "save"
    # text with two seeds: the per-seed sets, the best seed's copy and the summary, written once (rank 0)
    assert stages["text_log"].count("seeds, best dev seed") == 1
    summary = json.loads((save / "text_seeds.json").read_text())
    assert [row["seed"] for row in summary["seeds"]] == [1, 2] and complete(save / "text.json")
    assert complete(frames_record(out / "feature"))
    for name in ("text", "audio", "video", "text_KD_audio", "text_KD_video"):
        assert complete(save / f"{name}.json"), name
        assert json.loads((save / f"{name}.json").read_text())["args"]["epochs"] == 1
    assert complete(features_record(out / "feature"))
    assert stages["temps"] == []  # no temp file left by any rank

    # One process over the same frames and checkpoints: the same features (float tolerance)
    for split in ("train", "dev", "test"):
        a = pickles.load_features(artifacts.feature_path(out / "feature", split))
        b = pickles.load_features(artifacts.feature_path(stages["one"] / "feature", split))
        assert list(a["vids"]) == list(b["vids"]) and a["labels"] == b["labels"] and a["speakers"] == b["speakers"]
        for key in pickles.FEATURE_KEYS:
            for vid in a["vids"]:
                np.testing.assert_allclose(np.asarray(a[key][vid]), np.asarray(b[key][vid]), rtol=1e-4, atol=1e-5)

    # The fusion is a one-process stage: rank 0 trains it alone, the other process exits at once (status 0)
    done = stages["fusion"]
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("the fusion stage runs in one process (it takes minutes): under torchrun rank 0 runs "
                             "it alone and the other 1 process(es) exit") == 1
    assert not [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in done.stderr
    assert complete(save / "multimodal_fusion_metrics.json")


def test_kd_with_amp_on_cpu_keeps_its_scaler_in_the_state(stages: dict, generated: Path, tmp_path: Path) -> None:
    """A KD run with --amp True on CPU (the scaler runs enabled there; one process, this one), from the text
    and audio checkpoints `stages` trained: its state file holds the scale and loads with weights_only=True;
    --tensorboard records the scale."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path
    (out / "save").mkdir()
    for name in ("text.bin", "audio.bin"):
        shutil.copy2(stages["out"] / "save" / name, out / "save" / name)
    script("IEMOCAP", "KD").main([
        "--student", "audio", "--amp", "True", "--save_state", "True", "--tensorboard", str(tmp_path / "tb"), *EPOCHS,
        "--device", "cpu", "--data_dir", str(generated / "datasets" / "IEMOCAP"),
        "--pretrained_dir", str(generated / "pretrained_model"), "--save_dir", str(out / "save"),
        "--feature_dir", str(out / "feature")])
    state = torch.load(out / "save" / "text_KD_audio.state.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0 and "_growth_tracker" in state["scaler"]
    assert state["device_type"] == "cpu" and state["rng"][0]["cuda"] is None
    events = EventAccumulator(str(tmp_path / "tb" / "text_KD_audio"))
    events.Reload()
    assert "train/grad_scale" in events.Tags()["scalars"]


# --------------------------------------------------------------------------- one text training, 1 and 2 processes

@pytest.fixture(scope="module")
def text_runs(generated: Path, small_iemocap: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """IEMOCAP text for 2 epochs on 20 train / 9 dev / 9 test utterances with --tensorboard, at global batch 4:
    one process of batch 4 (python), and two processes of batch 2 (torchrun; 9 test utterances: one rank gets a
    padded copy)."""
    root = tmp_path_factory.mktemp("text_runs")
    runs = {}
    for nproc, batch in ((1, 4), (2, 2)):
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if nproc == 2 else []
        command = [sys.executable, *launcher, *text_command(
            small_iemocap, generated / "pretrained_model", root / f"save{nproc}", "--epochs", "2", "--batch_size",
            str(batch), "--tensorboard", str(root / f"tb{nproc}"))]
        done = subprocess.run(command, env=SUBPROCESS_ENV, capture_output=True, text=True, cwd=REPO, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[nproc] = {"log": done.stderr, "save": root / f"save{nproc}", "tb": root / f"tb{nproc}"}
    return runs


# Merged: the two-process text training of the old test_scale.py and the TensorBoard runs of the old
# test_torchrun.py are the same runs (text_runs); each test keeps its name and its checks.
def test_tensorboard_event_files_parse_and_two_processes_follow_one_process_lr(text_runs: dict) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def events_of(run: dict) -> EventAccumulator:
        assert "ETA" in run["log"] and "schedule: global batch 4" in run["log"]
        assert len(list((run["tb"] / "text").glob("events.out.tfevents.*"))) == 1  # rank 0 alone writes
        events = EventAccumulator(str(run["tb"] / "text"))
        events.Reload()
        return events

    one, two = events_of(text_runs[1]), events_of(text_runs[2])
    tags = set(one.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "epoch/train_loss", "dev/accuracy",
            "dev/weighted_f1", "test/weighted_f1"} <= tags
    rates = lambda events: [(e.step, e.value) for e in events.Scalars("train/learning_rate")]  # noqa: E731
    assert rates(one) == rates(two) and len(rates(one)) == 2 * math.ceil(20 / 4)  # 2 epochs of 20 rows, batch 4
    assert rates(one)[0] == (1, 0.0)  # the first update at factor 0, as the authors' LambdaLR
    assert [e.step for e in one.Scalars("dev/weighted_f1")] == [1, 2]
    assert all(np.isfinite(e.value) and e.value >= 0 for e in one.Scalars("train/grad_norm"))


def test_torchrun_two_cpu_processes_train_text(text_runs: dict, small_iemocap: Path) -> None:
    log, save_dir = text_runs[2]["log"], text_runs[2]["save"]
    assert "world_size=2" in log
    # Rank 0 alone logs: one start-up line, one line per epoch
    assert log.count("IEMOCAP text: device cpu world_size=2") == 1
    assert log.count("IEMOCAP text epoch 1/2:") == 1 and log.count("IEMOCAP text epoch 2/2:") == 1
    assert sorted(p.name for p in save_dir.iterdir()) == [
        "text.bin", "text.json", "text_confusion.png", "text_curves.png", "text_predictions_dev.csv",
        "text_predictions_test.csv"]
    # Every prediction as a row, gathered from both ranks: each dev/test utterance once
    for split in ("dev", "test"):  # small_iemocap: 9 utterances each
        with open(save_dir / f"text_predictions_{split}.csv", newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == 9 and len({(r["dialogue_id"], r["utterance_id"]) for r in rows}) == 9
    state = torch.load(save_dir / "text.bin", map_location="cpu", weights_only=True)
    assert "classifier.weight" in state

    # The test report counts each test utterance once (no padded duplicates), per class as in the CSV
    with open(small_iemocap / "IEMOCAP_test.csv", newline="", encoding="utf-8") as fh:
        gold = Counter(IEMOCAP.labels[IEMOCAP.label_id(row["Emotion"])] for row in csv.DictReader(fh))
    test = json.loads((save_dir / "text.json").read_text())["test"]["per_class"]
    assert {name: int(test[name]["support"]) for name in IEMOCAP.labels} == {n: gold.get(n, 0) for n in IEMOCAP.labels}
    assert int(test["weighted avg"]["support"]) == 9
