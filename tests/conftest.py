"""Shared fixtures: the generated tiny data/models, and one demo run whose artifacts many tests read.

The demo (``python -m magtkd.synthetic.demo``) runs both datasets' full pipelines once per
test session; stage tests then check its artifacts and run the scripts'
evaluation-only modes against them, so the suite trains each model only once.

Under pytest-xdist (the README's test command: ``-n 2 --dist loadfile``) the session fixtures are built
once for all workers: the first worker that needs one builds it under a file lock in the run's shared
temporary folder, the others wait and read it. Each worker then computes with one thread (two workers on
two cores; the tiny tensors gain nothing from a second thread, and oversubscribed threads lose time).
"""

from __future__ import annotations

import fcntl
import functools
import os
import pickle
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER is not None:
    os.environ["OMP_NUM_THREADS"] = "1"  # also for the stage processes the tests start
    import torch

    torch.set_num_threads(1)


def shared_fixture(factory: pytest.TempPathFactory, name: str, build: Callable[[Path], Any]) -> Any:
    """``build(folder)`` once per test run: in-process without xdist; across xdist workers, by the first
    worker under a lock (its value pickled beside the folder; a build that failed is tried again)."""
    if WORKER is None:
        return build(factory.mktemp(name))
    root = factory.getbasetemp().parent
    folder, value = root / name, root / f"{name}.fixture.pkl"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if value.is_file():
            return pickle.loads(value.read_bytes())
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        result = build(folder)
        value.write_bytes(pickle.dumps(result))
        return result


@pytest.fixture(scope="session")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny IEMOCAP/MELD release trees (prepared: CSVs written) and model stand-ins."""
    from IEMOCAP.preprocessing import main as prepare_iemocap
    from MELD.preprocessing import main as prepare_meld
    from magtkd.synthetic.__main__ import generate

    def build(root: Path) -> Path:
        generate(root, seed=0)
        prepare_iemocap(["--data_dir", str(root / "datasets" / "IEMOCAP")])
        prepare_meld(["--data_dir", str(root / "datasets" / "MELD")])
        return root

    return shared_fixture(tmp_path_factory, "generated", build)


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One full demo run (both datasets, all stages, in-process). Returns paths and results."""
    from magtkd.synthetic.demo import main as demo_main

    def build(workdir: Path) -> dict:
        return {"workdir": workdir, "results": demo_main(["--workdir", str(workdir)])}

    return shared_fixture(tmp_path_factory, "demo", build)


def stage_paths(workdir: Path, dataset: str) -> dict[str, Path]:
    """The folders the demo used for one dataset (as passed to every stage)."""
    return {
        "data_dir": workdir / "datasets" / dataset,
        "pretrained_dir": workdir / "pretrained_model",
        "save_dir": workdir / dataset / "save_model",
        "feature_dir": workdir / dataset / "feature",
    }


@functools.cache
def script(dataset: str, name: str):
    """The module of ``<repo>/<dataset>/<name>.py`` (its ``main(argv)`` takes the CLI flags)."""
    from magtkd.pipeline import load_script

    return load_script(REPO / dataset / f"{name}.py")


def flags(paths: dict[str, Path], **extra: str) -> list[str]:
    argv = [item for key, value in paths.items() for item in (f"--{key}", str(value))]
    return argv + [item for key, value in extra.items() for item in (f"--{key}", str(value))]


def copy_checkpoints(paths: dict[str, Path], tmp: Path, *names: str) -> dict[str, Path]:
    """The demo's folders with ``save_dir`` replaced by a copy holding ``names`` (the demo stays untouched)."""
    save_dir = tmp / "save_model"
    save_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy2(paths["save_dir"] / name, save_dir / name)
    return {**paths, "save_dir": save_dir}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test that needs the demo (directly or through another fixture) is in the slow tier.

    The tests say so with ``@pytest.mark.slow`` themselves; this keeps a new demo test from
    slipping into ``-m "not slow"`` (which must never start the four-minute demo run).
    """
    for item in items:
        if "demo" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)
