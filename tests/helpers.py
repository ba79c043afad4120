"""What many tests share besides fixtures (those are in conftest.py): the repository, a dataset's
description and stage scripts, the demo's folders and argv building, small hand-made inputs (random
dialogues, a reference fusion checkpoint, hostile media), and assertions several rooms make. Test files
import from here, never from each other.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402  (after the repository is on sys.path, as every import below)

from magtkd import runtime  # noqa: E402
from magtkd.dataset import Sample, Utterance, load_split  # noqa: E402
from magtkd.fusion_data import DialogueSet  # noqa: E402
from magtkd.spec import SPLITS  # noqa: E402

# The authors' CSVs and the recorded fusion initialisation, beside the repository when available.
REFERENCE = REPO.parent / "shared" / "reference" / "data"
# Stage processes started by tests: one thread each (the runs compared bit for bit use the same CPU
# kernels, and the subprocesses do not crowd the shared CPU), output unbuffered.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# --------------------------------------------------------------------------- datasets, scripts, folders

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


def generated_paths(generated: Path, dataset: str, tmp: Path) -> dict[str, Path]:
    """A stage's folders on the generated data, its outputs under ``tmp``."""
    return {
        "data_dir": generated / "datasets" / dataset,
        "pretrained_dir": generated / "pretrained_model",
        "save_dir": tmp / "save_model",
        "feature_dir": tmp / "feature",
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


def all_utterances(spec, data_dir: Path) -> list:
    return [u for split in SPLITS for u in load_split(spec, data_dir, split)]


def tiny_iemocap(generated: Path, tmp: Path, rows: dict[str, int]) -> Path:
    """A data folder with the first ``rows[split]`` rows of each generated CSV (media linked, not copied)."""
    spec = dataset_spec("IEMOCAP")
    source = generated / "datasets" / "IEMOCAP"
    target = tmp / "IEMOCAP"
    target.mkdir(parents=True)
    for session in source.glob("Session*"):
        (target / session.name).symlink_to(session, target_is_directory=True)
    for split, n in rows.items():
        name = spec.csv_names[split]
        frame = pd.read_csv(source / name, dtype=str, keep_default_na=False)
        frame.head(n).to_csv(target / name, index=False)
    return target


def meld_conversation(generated: Path, folder: Path, rows: int = 3, copy_clips: bool = False) -> Path:
    """The first ``rows`` rows of the generated MELD test CSV as a user's conversation in ``folder``."""
    data_dir = generated / "datasets" / "MELD"
    frame = pd.read_csv(data_dir / "test_meld_emo.csv", dtype=str, keep_default_na=False).head(rows)
    folder.mkdir(parents=True, exist_ok=True)
    if copy_clips:
        for clip in frame["Video_Path"]:
            (folder / clip).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(data_dir / clip, folder / clip)
    path = folder / "conversation.csv"
    frame.to_csv(path, index=False)
    return path


def digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_epoch_then_evaluate(dataset: str, name: str, stem: str, paths: dict[str, Path], *extra: str) -> dict:
    """``<DS>/<name>.py`` as a user runs it: one epoch on ``paths`` (``extra``: the stage's own flags), then
    ``--train False`` on the checkpoint it wrote. Checks what the later stages and the user rely on: a plain
    state_dict, a complete metrics document (dataset, labels, the epoch, every test utterance scored), the
    plots, and an evaluation that reproduces the recorded test metrics and rewrites nothing. Returns the
    metrics document."""
    main, spec, save = script(dataset, name).main, dataset_spec(dataset), paths["save_dir"]
    main(flags(paths, epochs=1, learning_rate="1e-3", device="cpu") + list(extra))
    state = torch.load(save / f"{stem}.bin", map_location="cpu", weights_only=True)
    assert state and all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items())
    doc = json.loads((save / f"{stem}.json").read_text(encoding="utf-8"))
    assert doc["complete"] is True and doc["dataset"] == dataset and doc["labels"] == list(spec.labels)
    assert doc["checkpoint"] == f"{stem}.bin" and doc["args"]["epochs"] == 1 and doc["args"]["train"] is True
    assert [row["epoch"] for row in doc["epochs"]] == [1] and doc["selected_epoch"] == 1
    per_class = doc["test"]["per_class"]
    assert sum(per_class[label]["support"] for label in spec.labels) == len(load_split(spec, paths["data_dir"], "test"))
    for kind in ("curves", "confusion"):
        assert (save / f"{stem}_{kind}.png").read_bytes()[:8] == PNG_SIGNATURE, kind
    written = {path.name: path.read_bytes() for path in (save / f"{stem}.bin", save / f"{stem}.json")}
    evaluated = main(flags(paths, train="False", device="cpu") + list(extra))
    assert (evaluated["accuracy"], evaluated["weighted_f1"]) == (doc["test"]["accuracy"], doc["test"]["weighted_f1"])
    assert evaluated["per_class"] == per_class
    assert {name: (save / name).read_bytes() for name in written} == written
    return doc


# --------------------------------------------------------------------------- stored frames

def npy_files(feature_dir: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every stored frame file (temporary files excluded)."""
    root = feature_dir / "video"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("*/*.npy"))}


def expected_npy(spec, data_dir: Path) -> set[str]:
    return {f"{u.split}/{u.key}.npy" for u in all_utterances(spec, data_dir)}


def authors_loop(video: Path, t0: float, t1: float) -> list[int] | None:
    """The frame indices the authors' OpenCV loop picks from [t0, t1] (docs/METHOD.md §2), written out
    independently of the library: positions are 1-based after each read, step from the window's duration."""
    import av

    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        fps, total = float(stream.average_rate), stream.frames
    assert total > 0
    step = max(int(fps * (t1 - t0) / 8), 1)
    kept, count = [], 0
    for i in range(total):
        if t0 * fps <= i + 1 <= t1 * fps:
            count += 1
            if count % step == 0 and len(kept) < 8:
                kept.append(i)
    return kept + [kept[-1]] * (8 - len(kept)) if kept else None


# --------------------------------------------------------------------------- hostile media

NON_FINITE = "non-finite samples (NaN/inf) in the decoded audio"

# Plain PyAV, no project code: decode the first video or audio stream of argv[1].
PLAIN_AV = {
    "video": "import av, sys\nc = av.open(sys.argv[1])\nc.streams.video[0].thread_type = 'AUTO'\n"
             "[f.to_ndarray(format='rgb24') for f in c.decode(c.streams.video[0])]\n",
    "audio": "import av, sys\nc = av.open(sys.argv[1])\n[f for f in c.decode(c.streams.audio[0])]\n",
}

# One plain-PyAV process tries each cut in a forked child (import once, fork per cut) and prints the
# first cut whose child died of a signal.
FIRST_CRASH = (
    "import av, os, sys\n"
    "kind, cuts = sys.argv[1], sys.argv[2:]\n"
    "code = {'video': %r, 'audio': %r}[kind].split('import av, sys\\n', 1)[1]\n"
    "for cut in cuts:\n"
    "    pid = os.fork()\n"
    "    if pid == 0:\n"
    "        try:\n"
    "            exec(code, {'av': av, 'sys': type('S', (), {'argv': [None, cut]})})\n"
    "        finally:\n"
    "            os._exit(0)\n"
    "    if os.WIFSIGNALED(os.waitpid(pid, 0)[1]):\n"
    "        print(cut)\n"
    "        break\n"
) % (PLAIN_AV["video"], PLAIN_AV["audio"])


def cut_until_av_crashes(clips: list[Path], out_dir: Path) -> dict[str, Path]:
    """Clips cut inside their moov atom on which plain PyAV dies of a signal while decoding video / audio."""
    cuts = []
    for clip in clips:
        data = clip.read_bytes()
        moov = data.rfind(b"moov") - 4
        for i in range(1, 32):
            cut = out_dir / f"cut_{clip.stem}_{i}.mp4"
            cut.write_bytes(data[: moov + (len(data) - moov) * i // 32])
            cuts.append(str(cut))
    found = {}
    for kind in PLAIN_AV:
        run = subprocess.run([sys.executable, "-c", FIRST_CRASH, kind, *cuts], capture_output=True, text=True,
                             timeout=600)
        if run.stdout.strip():
            found[kind] = Path(run.stdout.strip().splitlines()[0])
    return found


def crash_on(paths: frozenset, path: str, fn, args):
    """A `decoder.run_in_decoder` that kills the decoder child (SIGSEGV) for ``paths``, else decodes."""
    import signal

    if path in paths:
        os.kill(os.getpid(), signal.SIGSEGV)
    return fn(*args)


def write_float_wav(path, samples: np.ndarray, sample_rate: int) -> None:
    """A WAVE_FORMAT_IEEE_FLOAT (3) file of float32 ``samples`` (n,) or (n, channels), header by hand."""
    data = np.ascontiguousarray(samples, dtype="<f4")
    channels = 1 if data.ndim == 1 else data.shape[1]
    payload = data.tobytes()
    fmt = (b"fmt " + (16).to_bytes(4, "little") + (3).to_bytes(2, "little") + channels.to_bytes(2, "little")
           + sample_rate.to_bytes(4, "little") + (sample_rate * 4 * channels).to_bytes(4, "little")
           + (4 * channels).to_bytes(2, "little") + (32).to_bytes(2, "little"))
    body = b"WAVE" + fmt + b"data" + len(payload).to_bytes(4, "little") + payload
    path.write_bytes(b"RIFF" + len(body).to_bytes(4, "little") + body)


def utterance_sample(split: str, dialogue: int, utterance: int, path) -> Sample:
    """A one-utterance `Sample` whose audio and video are ``path`` (MELD-like: no time window)."""
    utt = Utterance(split=split, row=utterance + 1, dialogue_id=dialogue, utterance_id=utterance, text="hi",
                    speaker="Joey", speaker_key="Joey", emotion="joy", label=3, audio_path=path,
                    video_path=path, start=None, end=None)
    return Sample(utt, ("hi",), (0,))


# --------------------------------------------------------------------------- the fusion model's inputs

H, C, N_SPK = 8, 7, 304  # width, classes, speakers of the reference checkpoint below (MELD's)
REFERENCE_BLOCKS = ("t_t", "a_t", "v_t", "a_a", "t_a", "v_a", "v_v", "t_v", "a_v")


def reference_state(h: int = H, c: int = C, n_speaker: int = N_SPK) -> dict[str, torch.Tensor]:
    """A state_dict with the reference's names and shapes, written from the docs/METHOD.md §5 list."""
    g = torch.Generator().manual_seed(0)
    shapes: dict[str, tuple] = {"speaker_embeddings.weight": (n_speaker + 1, h)}
    for b in REFERENCE_BLOCKS:
        shapes[f"{b}.pos_emb.pe"] = (1, 512, h)
        layer = f"{b}.transformer_inter.0"
        for proj in ("proj_q", "proj_k", "proj_v", "fc"):
            shapes[f"{layer}.self_attn.{proj}.weight"] = (h, h)
            shapes[f"{layer}.self_attn.{proj}.bias"] = (h,)
        for lin in ("w_1", "w_2"):
            shapes[f"{layer}.feed_forward.{lin}.weight"] = (h, h)
            shapes[f"{layer}.feed_forward.{lin}.bias"] = (h,)
        for norm in (f"{layer}.feed_forward.layer_norm", f"{layer}.layer_norm"):
            shapes[f"{norm}.weight"] = (h,)
            shapes[f"{norm}.bias"] = (h,)
        shapes[f"{b}_gate.fc.weight"] = (h, h)
        shapes[f"{b}_gate.fc.bias"] = (h,)
    for m in ("t", "a", "v"):
        shapes[f"features_reduce_{m}.weight"] = (h, 3 * h)
        shapes[f"features_reduce_{m}.bias"] = (h,)
        shapes[f"w_{m}.weight"] = (c, h)
        shapes[f"w_{m}.bias"] = (c,)
    shapes["fc.weight"] = (h, 3 * h)  # never used by the reference's forward
    shapes["fc.bias"] = (h,)
    return {k: torch.randn(*s, generator=g) for k, s in shapes.items()}


def random_dialogues(lengths, n_speaker, seed=0) -> DialogueSet:
    """Dialogues of the given lengths with random width-`H` streams, speakers and labels."""
    g = torch.Generator().manual_seed(seed)
    return DialogueSet(
        path=None, vids=list(range(len(lengths))),
        text=[torch.randn(n, H, generator=g) for n in lengths],
        audio=[torch.randn(n, H, generator=g) for n in lengths],
        video=[torch.randn(n, H, generator=g) for n in lengths],
        speakers=[torch.randint(0, n_speaker, (n,), generator=g) for n in lengths],
        labels=[torch.randint(0, C, (n,), generator=g) for n in lengths],
    )


def dialogue_t_logits(model, data, indices, packed=True):
    """Per dialogue of ``indices``: its utterances' t_logits, and the batch."""
    batch = data.collate(indices, model.padding_speaker, packed)
    with torch.no_grad():
        rows = batch.rows(model(*batch.inputs).t_logits)
    return list(rows.split([len(data.labels[i]) for i in indices])), batch


# --------------------------------------------------------------------------- encoders and objectives

class FixedEncoder(torch.nn.Module):
    """An encoder whose ``encode`` returns given (representation, logits)."""

    def __init__(self, rep: torch.Tensor, logits: torch.Tensor) -> None:
        super().__init__()
        self.rep, self.logits, self.grad_enabled = rep, logits, []

    def encode(self, batch):
        self.grad_enabled.append(torch.is_grad_enabled())
        return self.rep, self.logits


def random_batch(n: int = 6, classes: int = 4, width: int = 8, seed: int = 0):
    """Student and teacher (representation, logits) needing gradients, and a batch of labels."""
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, requires_grad=True)  # noqa: E731
    labels = torch.randint(0, classes, (n,), generator=g)
    return make(n, width), make(n, classes), make(n, width), make(n, classes), {"labels": labels}


def authors_layout(state: dict, modality: str, hidden: int, classifier: str = "W", projection: str = "fc") -> dict:
    """``state`` (ours) renamed as the authors' modules write it: ``text_model`` (RobertaModel with its pooler
    and position_ids buffer) or ``model``; ``W`` for the classifier; the text projection under ``projection``."""
    backbone = "text_model." if modality == "text" else "model."
    out = {}
    for key, value in state.items():
        if key.startswith("backbone."):
            out[backbone + key[len("backbone."):]] = value
        elif key.startswith("classifier."):
            out[classifier + key[len("classifier"):]] = value
        else:
            out[projection + key[len("project"):]] = value
    if modality == "text":
        g = torch.Generator().manual_seed(1)
        out["text_model.pooler.dense.weight"] = torch.randn(hidden, hidden, generator=g)
        out["text_model.pooler.dense.bias"] = torch.randn(hidden, generator=g)
        out["text_model.embeddings.position_ids"] = torch.arange(514)[None]
    return out


# --------------------------------------------------------------------------- the schedule's view of a run

class Curve:
    """What `schedule.reference_schedule` reads of the engine's data: items, updates per epoch, global batch."""

    def __init__(self, n_train: int, updates: int, global_batch: runtime.GlobalBatch) -> None:
        self.n_train, self.updates, self.batch = n_train, updates, global_batch

    def updates_per_epoch(self, grad_accum: int) -> int:
        return self.updates

    def global_batch(self, grad_accum: int) -> runtime.GlobalBatch:
        return self.batch


def schedule_config(epochs: int, authors_batch: int | None = None, epoch_anchored: bool = False,
                    per_batch: bool = False) -> SimpleNamespace:
    """What `schedule.reference_schedule` reads of a `engine.FitConfig`."""
    return SimpleNamespace(epochs=epochs, grad_accum=1, authors_batch=authors_batch, schedule_epochs=epoch_anchored,
                           per_batch_schedule=per_batch)


# --------------------------------------------------------------------------- runs, files, processes

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROW_KEYS = {"seed", "selected_epoch", "dev_weighted_f1", "test_accuracy", "test_weighted_f1", "test_per_class_f1"}


def assert_png(path: Path, size: tuple[int, int]) -> None:
    """A real PNG of the expected pixel size with more than a blank canvas in it."""
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 10_000, (path, len(data))
    with Image.open(path) as image:
        assert image.size == size, path
        assert len(image.convert("L").getcolors()) > 20, path  # grey levels: drawn, not blank


def assert_summary_agrees_with_rows(doc: dict, label_names) -> None:
    """``mean`` / ``std`` (sample, n - 1) of every numeric key, recomputed from the per-seed rows."""
    assert {"seeds", "mean", "std", "best_seed"} <= set(doc) <= {"seeds", "mean", "std", "best_seed", "variant"}
    rows = doc["seeds"]
    assert doc["best_seed"] == max(rows, key=lambda r: r["dev_weighted_f1"])["seed"]
    numeric = [k for k in rows[0] if k not in ("seed", "test_per_class_f1")]
    assert set(doc["mean"]) == set(doc["std"]) == {*numeric, "test_per_class_f1"}
    for key in numeric:
        values = np.array([row[key] for row in rows], dtype=float)
        assert doc["mean"][key] == pytest.approx(values.mean()), key
        assert doc["std"][key] == pytest.approx(values.std(ddof=1)), key
    for label in label_names:
        values = np.array([row["test_per_class_f1"][label] for row in rows])
        assert doc["mean"]["test_per_class_f1"][label] == pytest.approx(values.mean()), label
        assert doc["std"]["test_per_class_f1"][label] == pytest.approx(values.std(ddof=1)), label


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:5]}"


def text_command(data_dir: Path, pretrained_dir: Path, save_dir: Path, *extra: str) -> list[str]:
    """``IEMOCAP/text.py`` as a command line (to run under python or torchrun)."""
    return [str(REPO / "IEMOCAP" / "text.py"), "--data_dir", str(data_dir), "--pretrained_dir", str(pretrained_dir),
            "--save_dir", str(save_dir), "--learning_rate", "1e-3", "--device", "cpu", *extra]


def kill_after_first_epoch(command: list[str], state: Path) -> int:
    """Start ``command``; SIGKILL it as soon as the training state of an epoch exists; return that epoch."""
    process = subprocess.Popen(command, env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               cwd=REPO)
    try:
        while not state.exists():  # polling for a file, not timing anything
            assert process.poll() is None, f"{command} ended before writing {state}"
            time.sleep(0.005)
    finally:
        process.kill()
        process.wait()
    return torch.load(state, weights_only=True)["epoch"]


@contextlib.contextmanager
def tmpfs(folder: Path, size: str = "64k") -> Iterator[Path]:
    """A tiny tmpfs at ``folder`` (needs root); the test is skipped where mounting is not allowed."""
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def remount_read_only(folder: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
