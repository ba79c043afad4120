"""The resume state (`magtkd.training_state`; docs/METHOD.md §6): gradient scaler, random
generators, world size and flags."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import Curve, schedule_config
from magtkd import engine, schedule, utils
from magtkd.artifacts import StageFiles
from magtkd.training_state import TrainingState


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
