"""Shared fixtures: the generated tiny data/models, untrained stand-in checkpoints, hostile MELD clips,
hand-made feature pickles, and one demo run whose artifacts the acceptance tests read.

The tiers: ``tests/unit/test_<module>.py`` mirrors the library's modules and never uses the demo or runs a
stage's training (``python -m pytest tests/unit``); ``tests/scripts/test_<script>_script.py`` runs each
stage script's ``main(argv)`` for one epoch on the generated data, then its flags, errors and outputs;
``tests/acceptance`` reads the demo (``python -m magtkd.synthetic.demo``: both datasets' full pipelines,
run once per test session) or runs every stage under torchrun and ``benchmarks/gpu_check.py``, sharing
what they train. The acceptance tests and the long subprocess cases (kill and resume, signals) are marked
``slow``: ``-m "not slow"`` is the fast tier.

Under pytest-xdist (the README's test command: ``-n 2 --dist loadfile``) the demo and the generated data
are built once for all workers: the first worker that needs one builds it under a file lock in the run's
shared temporary folder, the others wait and read it. Each worker then computes with one thread (two
workers on two cores; the tiny tensors gain nothing from a second thread, and oversubscribed threads lose
time). Files are handed to the workers in collection order, the heavy demo-free acceptance files first
(see ``pytest_collection_modifyitems``), so that one worker's demo build overlaps the other's long runs.
"""

from __future__ import annotations

import fcntl
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest

from helpers import crash_on, cut_until_av_crashes, dataset_spec  # (importing helpers puts the repository on sys.path)

WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER is not None:
    os.environ["OMP_NUM_THREADS"] = "1"  # also for the stage processes the tests start
    import torch

    torch.set_num_threads(1)

# Files handed out first (xdist gives a worker a whole file; the rest follow in collection order): one
# worker builds the demo for the first demo reader while the other runs the two long demo-free files, then
# the longest unit file, so that the run ends on short files.
FIRST = ("acceptance/test_demo_results.py", "acceptance/test_every_stage_under_torchrun.py",
         "acceptance/test_gpu_check_on_cpu.py", "unit/test_synthetic.py")


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


# --------------------------------------------------------------------------- session data

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


@pytest.fixture(scope="session")
def untrained(generated: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """untrained(dataset): a save folder holding the five first-stage checkpoints and a fusion checkpoint
    of fresh stand-in models (plain state_dicts as the stages write them, no metrics documents), for the
    stages that read checkpoints: a teacher for KD.py, the extraction's five models, predict.py's six."""
    from magtkd.artifacts import FIRST_STAGE_MODELS, StageFiles
    from magtkd.model import AnchorGatedTransformer
    from magtkd.pretrained import load_encoder, representation_width

    folders: dict[str, Path] = {}

    def save_dir(dataset: str) -> Path:
        if dataset not in folders:
            import torch

            spec, pdir = dataset_spec(dataset), generated / "pretrained_model"
            folder = tmp_path_factory.mktemp(f"untrained_{dataset}")
            torch.manual_seed(0)
            for key, (name, _) in FIRST_STAGE_MODELS.items():
                model, _ = load_encoder(key.removesuffix("_kd"), pdir, spec.num_classes, folder)
                torch.save(model.state_dict(), folder / f"{name}.bin")
            fusion = AnchorGatedTransformer(representation_width(pdir), spec.num_classes, spec.n_speaker)
            torch.save(fusion.state_dict(), StageFiles.fusion(folder).checkpoint)
            folders[dataset] = folder
        return folders[dataset]

    return save_dir


@pytest.fixture(scope="session")
def small_iemocap(generated: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated IEMOCAP CSVs cut to 20 train / 9 dev / 9 test utterances (text reads no media)."""
    root = tmp_path_factory.mktemp("small_iemocap")
    for split, rows in (("train", 20), ("dev", 9), ("test", 9)):
        lines = (generated / "datasets" / "IEMOCAP" / f"IEMOCAP_{split}.csv").read_text(encoding="utf-8").splitlines()
        (root / f"IEMOCAP_{split}.csv").write_text("\n".join(lines[:rows + 1]) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def iemocap_pickles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Hand-made IEMOCAP feature pickles (6 dialogues per split, width 16) and their complete record."""
    from magtkd.synthetic.features import write_synthetic_features

    folder = tmp_path_factory.mktemp("features")
    write_synthetic_features(folder, dataset_spec("IEMOCAP"), 6, 16, 0)
    return folder


@pytest.fixture(scope="session")
def bad_meld(generated: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A copy of the generated MELD whose test split has a clip on which PyAV itself crashes while decoding
    video, one while decoding audio (if this PyAV build crashes on no cut, a clip whose decoder child is made
    to die of SIGSEGV through decoder.run_in_decoder), random bytes mid-file, half a file, an empty file and a clip
    cut before its moov atom."""
    import numpy as np

    from magtkd import media
    from magtkd.dataset import load_split

    meld = dataset_spec("MELD")
    root = tmp_path_factory.mktemp("bad_meld")
    data_dir = root / "MELD"
    shutil.copytree(generated / "datasets" / "MELD", data_dir)
    test = load_split(meld, data_dir, "test")
    healthy = [u for u in test if u.video_path.is_file() and b"moov" in u.video_path.read_bytes()
               and b"ftyp" in u.video_path.read_bytes()[:12]
               and media.decode_windows(u.video_path, [None])[0] is not None]
    names = ("crash_video", "crash_audio", "random", "half", "empty", "moovless")
    victims = {name: healthy[i] for i, name in enumerate(names)}
    crashes = cut_until_av_crashes([u.video_path for u in healthy[len(names):len(names) + 4]], root)
    original = victims["random"].video_path.read_bytes()
    random_bytes = bytearray(original)
    start = len(original) // 3
    random_bytes[start:start + 4000] = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    contents = {
        "random": bytes(random_bytes),
        "half": original[: len(original) // 2],
        "empty": b"",
        "moovless": original[: original.rfind(b"moov") + 100],
    }
    hooked = []
    for kind in ("video", "audio"):
        if kind in crashes:
            contents[f"crash_{kind}"] = crashes[kind].read_bytes()
        else:
            hooked.append(str(victims[f"crash_{kind}"].video_path))
    for name, content in contents.items():
        victims[name].video_path.write_bytes(content)
    return {"data_dir": data_dir, "keys": {k: f"test/{u.key}" for k, u in victims.items()},
            "paths": {k: u.video_path for k, u in victims.items()}, "hooked": hooked}


@pytest.fixture
def crash_hook(bad_meld: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where no cut crashes this PyAV build, the decoder child is made to die of SIGSEGV on those clips."""
    import functools

    from magtkd import decoder

    if bad_meld["hooked"]:
        monkeypatch.setattr(decoder, "run_in_decoder", functools.partial(crash_on, frozenset(bad_meld["hooked"])))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy shared CPU extra threads spin for minutes
    (already so under xdist; this covers a plain ``python -m pytest``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- tiers and order

def pytest_configure(config: pytest.Config) -> None:
    # xdist hands out whole files, by default the files with most tests first; keep the collection order
    # instead (below), which puts the long runs first.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test that needs the demo (directly or through another fixture) is in the slow tier.

    The tests say so with ``@pytest.mark.slow`` themselves; this keeps a new demo test from
    slipping into ``-m "not slow"`` (which must never start the two-minute demo run). Then the files
    of `FIRST` move to the front, in that order (a stable sort: the rest keep theirs).
    """
    for item in items:
        if "demo" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(FIRST)}

    def order(item: pytest.Item) -> int:
        path = Path(str(item.path))
        return rank.get(f"{path.parent.name}/{path.name}", len(FIRST))

    items.sort(key=order)
