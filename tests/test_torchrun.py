"""Real scale on CPU: every stage under torchrun (2 gloo processes), the resume state (gradient scaler,
per-device CUDA random state, world size), the schedule at any global batch, the CUDA guards, and
TensorBoard event files (docs/METHOD.md §2, §3)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from helpers import REPO
from magtkd import artifacts, cli, engine, pickles, pipeline, runtime, schedule, utils
from magtkd.training_state import TrainingState
from magtkd.artifacts import StageFiles, features_record, frames_record

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# --------------------------------------------------------------------------- the schedule at any global batch

class Curve:
    """What `schedule.reference_schedule` reads of the engine's data: items, updates per epoch, global batch."""

    def __init__(self, n_train: int, updates: int, global_batch: schedule.GlobalBatch) -> None:
        self.n_train, self.updates, self.batch = n_train, updates, global_batch

    def updates_per_epoch(self, grad_accum: int) -> int:
        return self.updates

    def global_batch(self, grad_accum: int) -> schedule.GlobalBatch:
        return self.batch


def schedule_config(epochs: int, authors_batch: int | None = None, epoch_anchored: bool = False,
                    per_batch: bool = False) -> SimpleNamespace:
    """What `schedule.reference_schedule` reads of a `engine.FitConfig`."""
    return SimpleNamespace(epochs=epochs, grad_accum=1, authors_batch=authors_batch, schedule_epochs=epoch_anchored,
                           per_batch_schedule=per_batch)


def lr_curve(n_train: int, batch_size: int, world: int, grad_accum: int, epochs: int, **options) -> list[float]:
    """The learning rate of every update of one rank, its updates per epoch counted as `SampleBatches`
    counts them: the rank's DistributedSampler shard in batches (the world size passed in)."""
    data = list(range(n_train))
    sampler = (torch.utils.data.DistributedSampler(data, num_replicas=world, rank=world - 1, shuffle=True)
               if world > 1 else None)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, sampler=sampler)
    updates = -(-len(loader) // grad_accum)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = schedule.reference_schedule(optimizer, Curve(n_train, updates, schedule.GlobalBatch(batch_size, world,
                                                                                                     grad_accum)),
                                            schedule_config(epochs, **options))
    rates = []
    for _ in range(updates * epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("n_train", [149, 150, 1000])
def test_two_processes_of_batch_2_follow_one_process_of_batch_4_step_for_step(n_train: int) -> None:
    one = lr_curve(n_train, 4, 1, 1, 10)
    assert lr_curve(n_train, 2, 2, 1, 10) == one
    assert lr_curve(n_train, 1, 2, 2, 10) == one  # and 2 processes x batch 1 x --grad_accum 2
    assert max(one) < 1.0 or one.index(max(one)) > 0  # warmup from 0, as the authors'
    assert lr_curve(n_train, 4, 2, 1, 10) != one  # a global batch of 8 is another curve


def test_epoch_anchored_schedule_is_the_authors_curve_over_epochs_at_global_batch_16() -> None:
    n, epochs = 1000, 10
    authors = lr_curve(n, 4, 1, 1, epochs)  # 250 updates per epoch
    steps = lr_curve(n, 4, 4, 1, epochs)  # global batch 16, counted in steps: 63 updates per epoch
    anchored = lr_curve(n, 4, 4, 1, epochs, authors_batch=4, epoch_anchored=True)
    per_epoch_authors, per_epoch_ours = 250, 63
    at = lambda rates, per_epoch, e: rates[min(round(e * per_epoch), len(rates) - 1)]  # noqa: E731
    for tenth in range(1, 100):
        e = tenth / 10
        assert at(anchored, per_epoch_ours, e) == pytest.approx(at(authors, per_epoch_authors, e), abs=0.02)
    # The authors' curve peaks after 4 of 10 epochs and ends at 30/36 of the peak; in steps at global batch 16
    # warmup never ends (the peak stays at about 10/16 of the rate set).
    assert max(authors) == pytest.approx(1.0, abs=1e-3) and authors[-1] == pytest.approx(30 / 36, abs=0.01)
    assert max(anchored) == pytest.approx(1.0, abs=0.01) and anchored[-1] == pytest.approx(30 / 36, abs=0.01)
    assert max(steps) == pytest.approx(630 / 1000, abs=0.01)


def test_schedule_is_logged_in_epochs_and_a_foreign_global_batch_names_the_choices(caplog) -> None:
    caplog.set_level(logging.INFO, logger="magtkd")
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule.reference_schedule(optimizer, Curve(1000, 63, schedule.GlobalBatch(4, 4, 1)), schedule_config(10, 4))
    text = caplog.text
    assert "global batch 16 (4 per process x 4 processes x 1 accumulated)" in text
    assert "warmup would end after 15.87 epochs: it never ends in 10" in text
    assert "not the authors' 4" in text and "--batch_size 1 gives their global batch" in text
    assert "--schedule_epochs True" in text
    caplog.clear()
    schedule.reference_schedule(optimizer, Curve(1000, 250, schedule.GlobalBatch(4, 1, 1)), schedule_config(10, 4))
    assert "warmup ends after 4.00 of 10 epochs; peak factor 1.000" in caplog.text and "WARNING" not in caplog.text
    caplog.clear()
    schedule.reference_schedule(optimizer, Curve(100, 5, schedule.GlobalBatch(4, 1, 5)), schedule_config(30, 16))
    assert "no --batch_size gives their global batch with 5 processes x accumulation" in caplog.text


# --------------------------------------------------------------------------- the resume state

def toy_objects(lr: float = 0.1):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scheduler = schedule.reference_schedule(optimizer, Curve(8, 2, schedule.GlobalBatch(4, 1, 1)), schedule_config(3))
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0 ** 10, growth_interval=2)
    return model, optimizer, scheduler, scaler


def toy_state(tmp_path: Path, objects, generators=(), args=None) -> TrainingState:
    """The training state of a toy run (``objects``: `toy_objects`) saved under ``tmp_path``."""
    model, optimizer, scheduler, scaler = objects
    return TrainingState(StageFiles.first_stage(tmp_path, "toy").state, "toy", args or {"epochs": 3, "amp": True},
                         model, optimizer, scheduler, scaler, list(generators), torch.device("cpu"))


def test_resume_state_holds_the_scaler_loads_weights_only_and_never_touches_cuda(tmp_path: Path,
                                                                               monkeypatch) -> None:
    def no_cuda(*_, **__):
        raise AssertionError("a CPU run touched CUDA")

    for name in ("get_rng_state", "get_rng_state_all", "set_rng_state", "set_rng_state_all", "init"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    model, optimizer, scheduler, scaler = toy_objects()
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    step = engine.Step(optimizer, scheduler, list(model.parameters()), 10.0, scaler)
    for _ in range(5):
        step.update(model, [{"labels": y}], lambda b: nn.functional.cross_entropy(model(x), b["labels"]))
    assert scaler.get_scale() > 2.0 ** 10  # it grew: a restart at the initial scale would differ
    generator = torch.Generator().manual_seed(5)
    saved = toy_state(tmp_path, (model, optimizer, scheduler, scaler), [generator])
    saved.save(1, {"epochs": [], "best": {}})
    raw = torch.load(saved.path, weights_only=True)
    assert raw["scaler"]["scale"] == scaler.get_scale() and raw["device_type"] == "cpu"
    assert raw["rng"][0]["cuda"] is None

    model2, optimizer2, scheduler2, scaler2 = toy_objects()
    generator2 = torch.Generator()
    again = toy_state(tmp_path, (model2, optimizer2, scheduler2, scaler2), [generator2])
    again.restore(again.load(resume=True))
    assert scaler2.get_scale() == scaler.get_scale()
    assert scaler2.state_dict()["_growth_tracker"] == scaler.state_dict()["_growth_tracker"]
    assert scheduler2.last_epoch == scheduler.last_epoch
    assert torch.equal(generator2.get_state(), generator.get_state())


def test_resume_under_another_world_size_or_flags_is_refused(tmp_path: Path) -> None:
    saved = toy_state(tmp_path, toy_objects())
    saved.save(1, {"epochs": [], "best": {}})
    state = torch.load(saved.path, weights_only=True)
    state["world_size"] = 4
    torch.save(state, saved.path)
    with pytest.raises(utils.UserError, match=r"saved by 4 process\(es\) and this run has 1: resume with torchrun "
                                              r"--nproc_per_node 4"):
        saved.load(resume=True)
    state["world_size"] = 1
    torch.save(state, saved.path)
    with pytest.raises(utils.UserError, match="--amp True then, False now"):
        toy_state(tmp_path, toy_objects(), args={"epochs": 3, "amp": False}).load(resume=True)


def test_state_saved_on_cuda_resumes_on_cpu_with_a_warning(tmp_path: Path, caplog) -> None:
    saved = toy_state(tmp_path, toy_objects())
    saved.save(1, {"epochs": [], "best": {}})
    state = torch.load(saved.path, weights_only=True)
    state["device_type"], state["rng"][0]["cuda"] = "cuda", torch.zeros(16, dtype=torch.uint8)
    caplog.set_level(logging.WARNING, logger="magtkd")
    toy_state(tmp_path, toy_objects()).restore(state)
    assert "saved on cuda and this run is on cpu" in caplog.text and "not bit-identical" in caplog.text


# --------------------------------------------------------------------------- CUDA guards (CPU-testable parts)

def test_more_torchrun_processes_than_gpus_is_one_user_error(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(utils.UserError, match=r"more processes per node \(4\) than this machine has GPUs \(2\): "
                                              r"use --nproc_per_node 2"):
        runtime.init_distributed(torch.device("cuda"))


def test_cuda_unavailable_names_the_wheel_and_the_driver(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "gpu_present", lambda: True)
    with pytest.raises(utils.UserError) as err:
        runtime.resolve_device("cuda")
    message = str(err.value)
    assert f"built for CUDA {torch.version.cuda}" in message and "nvidia-smi" in message and "\n" not in message
    monkeypatch.setattr(runtime, "gpu_present", lambda: False)
    with pytest.raises(utils.UserError, match="no NVIDIA driver found"):
        runtime.resolve_device("cuda")


def test_pipeline_launches_the_data_parallel_stages_with_torchrun() -> None:
    by_name = {stage.name: stage for stage in pipeline.STAGES}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3"]
    for name in ("text", "audio", "frames", "video", "kd_audio", "kd_video", "features"):
        assert pipeline.launcher(by_name[name], 3) == torchrun
    for name in ("preprocessing", "fusion"):
        assert pipeline.launcher(by_name[name], 3) == [sys.executable]
    assert pipeline.launcher(by_name["text"], 1) == [sys.executable]
    assert cli.pipeline_parser(None).parse_args(["--nproc_per_node", "2"]).nproc_per_node == 2


# --------------------------------------------------------------------------- every stage under torchrun

def torchrun(dataset: str, name: str, generated: Path, out: Path, *extra: str, nproc: int = 2,
             check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(REPO / dataset / f"{name}.py"), "--device", "cpu", *extra]
    if name != "multimodal_fusion":
        command += ["--data_dir", str(generated / "datasets" / dataset),
                    "--pretrained_dir", str(generated / "pretrained_model")]
    command += ["--save_dir", str(out / "save"), "--feature_dir", str(out / "feature")]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, cwd=REPO, timeout=1200)
    if check:
        assert done.returncode == 0, f"{name}: {done.stderr[-3000:]}"
    return done


def complete(path: Path) -> bool:
    return json.loads(path.read_text())["complete"] is True


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["IEMOCAP", "MELD"])
def test_every_stage_under_torchrun_and_features_equal_one_process(dataset: str, generated: Path,
                                                                   tmp_path: Path) -> None:
    out, save = tmp_path, tmp_path / "save"
    epochs = ("--epochs", "1", "--learning_rate", "1e-3")
    # text with two seeds: the per-seed sets, the best seed's copy and the summary, written once (rank 0)
    log = torchrun(dataset, "text", generated, out, *epochs, "--seeds", "1", "2").stderr
    assert log.count("seeds, best dev seed") == 1
    summary = json.loads((save / "text_seeds.json").read_text())
    assert [row["seed"] for row in summary["seeds"]] == [1, 2] and complete(save / "text.json")
    torchrun(dataset, "audio", generated, out, *epochs)
    torchrun(dataset, "video_feature_extract", generated, out)
    assert complete(frames_record(out / "feature"))
    torchrun(dataset, "video", generated, out, *epochs)
    for student in ("audio", "video"):
        torchrun(dataset, "KD", generated, out, "--student", student, *epochs)
    for name in ("text", "audio", "video", "text_KD_audio", "text_KD_video"):
        assert complete(save / f"{name}.json"), name
        assert json.loads((save / f"{name}.json").read_text())["args"]["epochs"] == 1
    torchrun(dataset, "extract_first_stage_features", generated, out)
    assert complete(features_record(out / "feature"))
    assert not list(out.rglob(".*.tmp"))  # no temp file left by any rank

    # One process over the same frames and checkpoints: the same features (float tolerance)
    one = tmp_path / "one"
    (one / "feature").mkdir(parents=True)
    os.symlink(out / "feature" / "video", one / "feature" / "video")
    os.symlink(save, one / "save")
    torchrun(dataset, "extract_first_stage_features", generated, one, nproc=1)
    for split in ("train", "dev", "test"):
        a = pickles.load_features(artifacts.feature_path(out / "feature", split))
        b = pickles.load_features(artifacts.feature_path(one / "feature", split))
        assert list(a["vids"]) == list(b["vids"]) and a["labels"] == b["labels"] and a["speakers"] == b["speakers"]
        for key in pickles.FEATURE_KEYS:
            for vid in a["vids"]:
                np.testing.assert_allclose(np.asarray(a[key][vid]), np.asarray(b[key][vid]), rtol=1e-4, atol=1e-5)

    # The fusion is a one-process stage: one line per process, status 2 from each, nothing written
    done = torchrun(dataset, "multimodal_fusion", generated, out, "--epochs", "1", check=False)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: the fusion stage trains in one process (it takes minutes): run it with python, "
                      "not torchrun"] * 2
    assert "exitcode: 2" in done.stderr and "Traceback (most recent call last):\n  File \"" + str(REPO) \
        not in done.stderr
    assert not (save / "multimodal_fusion_best.bin").exists()


# --------------------------------------------------------------------------- watching a run

@pytest.mark.slow
def test_tensorboard_event_files_parse_and_two_processes_follow_one_process_lr(generated: Path,
                                                                              tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def run(nproc: int, batch: int) -> EventAccumulator:
        folder = tmp_path / f"tb{nproc}"
        log = torchrun("IEMOCAP", "text", generated, tmp_path / f"run{nproc}", "--epochs", "2", "--batch_size",
                       str(batch), "--tensorboard", str(folder), nproc=nproc).stderr
        assert "ETA" in log and "schedule: global batch 4" in log
        assert len(list((folder / "text").glob("events.out.tfevents.*"))) == 1  # rank 0 alone writes
        events = EventAccumulator(str(folder / "text"))
        events.Reload()
        return events

    one, two = run(1, 4), run(2, 2)
    tags = set(one.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "epoch/train_loss", "dev/accuracy",
            "dev/weighted_f1", "test/weighted_f1"} <= tags
    rates = lambda events: [(e.step, e.value) for e in events.Scalars("train/learning_rate")]  # noqa: E731
    assert rates(one) == rates(two) and len(rates(one)) == 2 * 38
    assert rates(one)[0] == (1, 0.0)  # the first update at factor 0, as the authors' LambdaLR
    assert [e.step for e in one.Scalars("dev/weighted_f1")] == [1, 2]
    assert all(np.isfinite(e.value) and e.value >= 0 for e in one.Scalars("train/grad_norm"))


@pytest.mark.slow
def test_kd_with_amp_on_cpu_keeps_its_scaler_in_the_state(generated: Path, tmp_path: Path) -> None:
    """A KD run with --amp True on CPU (the scaler runs enabled there): its state file holds the scale and
    loads with weights_only=True; --tensorboard records the scale."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path
    epochs = ("--epochs", "1", "--learning_rate", "1e-3")
    torchrun("IEMOCAP", "text", generated, out, *epochs, nproc=1)
    torchrun("IEMOCAP", "audio", generated, out, *epochs, nproc=1)
    torchrun("IEMOCAP", "KD", generated, out, "--student", "audio", "--amp", "True", "--tensorboard",
             str(tmp_path / "tb"), *epochs, nproc=1)
    state = torch.load(out / "save" / "text_KD_audio.state.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0 and "_growth_tracker" in state["scaler"]
    assert state["device_type"] == "cpu" and state["rng"][0]["cuda"] is None
    events = EventAccumulator(str(tmp_path / "tb" / "text_KD_audio"))
    events.Reload()
    assert "train/grad_scale" in events.Tags()["scalars"]
