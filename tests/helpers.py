"""What many tests share besides fixtures (those are in conftest.py): the repository, a dataset's
description and stage scripts, the demo's folders, and argv building. Test files import from here,
never from each other.
"""

from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def dataset_spec(dataset: str):
    """The `DatasetSpec` of ``<repo>/<dataset>/config.py``."""
    return getattr(importlib.import_module(f"{dataset}.config"), dataset)


def stage_paths(workdir: Path, dataset: str) -> dict[str, Path]:
    """The folders the demo used for one dataset (as passed to every stage)."""
    return {
        "data_dir": workdir / "datasets" / dataset,
        "pretrained_dir": workdir / "pretrained_model",
        "save_dir": workdir / dataset / "save_model",
        "feature_dir": workdir / dataset / "feature",
    }


def script(dataset: str, name: str):
    """The module of ``<repo>/<dataset>/<name>.py`` (its ``main(argv)`` takes the CLI flags)."""
    return importlib.import_module(f"{dataset}.{name}")


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
