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
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest

from helpers import REPO  # noqa: F401  (helpers puts the repository on sys.path)
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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test that needs the demo (directly or through another fixture) is in the slow tier.

    The tests say so with ``@pytest.mark.slow`` themselves; this keeps a new demo test from
    slipping into ``-m "not slow"`` (which must never start the four-minute demo run).
    """
    for item in items:
        if "demo" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)
