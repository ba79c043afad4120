"""The resume state (`magtkd.training_state`; docs/METHOD.md §6): gradient scaler, random
generators, world size and flags."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import Curve, schedule_config
from magtkd import engine, runtime, schedule, utils
from magtkd.artifacts import StageFiles
from magtkd.training_state import TrainingState


def toy_objects(lr: float = 0.1):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scheduler = schedule.reference_schedule(optimizer, Curve(8, 2, runtime.GlobalBatch(4, 1, 1)), schedule_config(3))
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

    toy_objects()  # the first AdamW of a process imports torch._dynamo, which must see the real CUDA functions

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
    saved.wait()  # written in the background
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
    saved.wait()  # written in the background
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
    saved.wait()  # written in the background
    state = torch.load(saved.path, weights_only=True)
    state["device_type"], state["rng"][0]["cuda"] = "cuda", torch.zeros(16, dtype=torch.uint8)
    caplog.set_level(logging.WARNING, logger="magtkd")
    toy_state(tmp_path, toy_objects()).restore(state)
    assert "saved on cuda and this run is on cpu" in caplog.text and "not bit-identical" in caplog.text


def test_state_is_written_in_the_background_from_a_snapshot(tmp_path: Path) -> None:
    model, optimizer, scheduler, scaler = toy_objects()
    saved = toy_state(tmp_path, (model, optimizer, scheduler, scaler))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    saved.save(1, {"epochs": [], "best": {}})
    with torch.no_grad():  # training goes on while the thread writes: the state holds the epoch's weights
        for p in model.parameters():
            p.add_(1.0)
    saved.wait()
    written = torch.load(saved.path, weights_only=True)["model"]
    assert all(torch.equal(written[k], before[k]) for k in before)

    blocked = toy_state(tmp_path / "file_not_folder", toy_objects())
    (tmp_path / "file_not_folder").write_text("a file where the folder should be")
    blocked.save(1, {"epochs": [], "best": {}})  # returns at once; the error comes with the wait
    with pytest.raises(utils.UserError, match=r"cannot write .*file_not_folder/toy\.state\.pt"):
        blocked.wait()


def _fit_toy(tmp_path: Path, **flags) -> StageFiles:
    """`engine.fit` for 2 epochs on 8 random samples with the given loop flags; the run's files."""
    from magtkd import loaders

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    model.encode = lambda batch: (model(batch["x"]), model(batch["x"]))  # the encoders' interface
    items = [{"index": i, "x": torch.randn(3), "label": i % 2} for i in range(8)]

    class Items(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(items)

        def __getitem__(self, i: int) -> dict:
            return items[i]

        def collate(self, batch: list) -> dict:
            return {"index": torch.tensor([b["index"] for b in batch]), "x": torch.stack([b["x"] for b in batch]),
                    "labels": torch.tensor([b["label"] for b in batch])}

    data = loaders.SampleBatches({s: loaders.make_loader(Items(), 4, s == "train", 0) for s in ("train", "dev", "test")},
                                 torch.device("cpu"))
    files = StageFiles.first_stage(tmp_path, "toy")
    config = engine.FitConfig.from_flags({"epochs": 2, **flags}, seed=0, stage="toy", script="unit.py", dataset="X",
                                         labels=["a", "b"], files=files)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    engine.fit(model, lambda m, b: nn.functional.cross_entropy(m(b["x"]), b["labels"]), data, optimizer, scheduler,
               config)
    return files


def test_a_plain_run_writes_no_training_state_and_removes_a_stale_one(tmp_path: Path, caplog, monkeypatch) -> None:
    caplog.set_level(logging.INFO, logger="magtkd")
    monkeypatch.setattr(engine, "write_plots", lambda *_, **__: None)  # the plots are not what this is about
    files = _fit_toy(tmp_path, resume=False)
    assert files.checkpoint.is_file() and not files.state.exists()
    files = _fit_toy(tmp_path, save_state=True)  # asked for: after every epoch
    assert torch.load(files.state, weights_only=True)["epoch"] == 2
    files = _fit_toy(tmp_path, resume=True)  # --resume True: a finished state finishes at once, and is kept
    assert "resuming from epoch 2" in caplog.text and files.state.is_file()
    files = _fit_toy(tmp_path)  # a plain run publishes a new set: the old state no longer belongs to it
    assert not files.state.exists() and "removed the training state" in caplog.text
