"""Artifacts on disk: atomic writes, completion records, locks, stale temps, the substitution
report, and the one registry of artifact names (docs/METHOD.md §0: the pipeline table and the folder layout).

Every file a stage publishes is written to a temp file in its folder and renamed;
a set of files is announced incomplete by its completion record before the first
of them changes and complete after the last (`begin_outputs` / `finish_outputs`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from .runtime import gather_objects, is_main
from .utils import UserError


log = logging.getLogger("magtkd")


# The five first-stage models behind the feature keys (docs/METHOD.md §4): feature key -> the name of
# its checkpoint (``<name>.bin``) and the script of the dataset's folder that writes it.
FIRST_STAGE_MODELS: dict[str, tuple[str, str]] = {
    "text": ("text", "text.py"),
    "audio": ("audio", "audio.py"),
    "audio_kd": ("text_KD_audio", "KD.py --student audio --teacher text"),
    "video": ("video", "video.py"),
    "video_kd": ("text_KD_video", "KD.py --student video --teacher text"),
}


FUSION = "multimodal_fusion"


FEATURES_RECORD = "first_stage_features.json"  # beside the pickles, written last by the extraction stage


FEATURES_REPORT = "first_stage_substitutions.tsv"


FRAMES_RECORD = "extraction.json"  # in <feature_dir>/video/, written last by video_feature_extract.py


FRAMES_REPORT = "substitutions.tsv"  # in <feature_dir>/video/ (predict: in its conversation folder)


TABLE_SPLITS = ("dev", "test")  # the splits an evaluation writes per-utterance predictions of


def kd_name(teacher: str, student: str) -> str:
    """``text_KD_audio``: the name of a distilled student's artifacts."""
    return f"{teacher}_KD_{student}"


def teacher_outputs_path(teacher_checkpoint: str | os.PathLike) -> Path:
    """``<save_dir>/text_teacher_outputs.pt`` beside ``text.bin``: the KD teacher's outputs computed once
    (`magtkd.teacher_cache`)."""
    checkpoint = Path(teacher_checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}_teacher_outputs.pt")


def feature_path(feature_dir: str | os.PathLike, split: str) -> Path:
    """``<feature_dir>/first_stage_{split}_features.pkl``."""
    return Path(feature_dir) / f"first_stage_{split}_features.pkl"


SEARCH_DEPTH = 4  # folder levels `found_below` looks down (a download's MAGTKD/MELD/MELD/feature: 3)


def found_below(folder: str | os.PathLike, name: str, limit: int = 5) -> list[Path]:
    """Folders below ``folder`` (``SEARCH_DEPTH`` levels, hidden ones skipped) that hold a file ``name``, at most
    ``limit``: where to point a folder flag whose folder holds no such file (an unpacked download nests
    them, docs/METHOD.md §0)."""
    root, found = Path(folder), []
    for here, dirs, files in os.walk(root):
        depth = len(Path(here).relative_to(root).parts)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth < SEARCH_DEPTH else []
        if depth and name in files:
            found.append(Path(here))
            if len(found) == limit:
                break
    return found


def below_hint(folder: str | os.PathLike, name: str, flag: str) -> str:
    """``; ... found below it in A, B: pass --flag A`` for an error about a missing ``name`` in ``folder``
    (`found_below`), or '' when the folder has none below it."""
    places = found_below(folder, name) if Path(folder).is_dir() else []
    if not places:
        return ""
    return f"; {name} is below it in {', '.join(map(str, places))}: pass {flag} {places[0]}"


def features_record(feature_dir: str | os.PathLike) -> Path:
    """``<feature_dir>/first_stage_features.json``: written last by extract_first_stage_features.py."""
    return Path(feature_dir) / FEATURES_RECORD


def frames_record(feature_dir: str | os.PathLike) -> Path:
    """``<feature_dir>/video/extraction.json``: written last by video_feature_extract.py (completion record)."""
    return Path(feature_dir) / "video" / FRAMES_RECORD


@dataclass(frozen=True)
class StageFiles:
    """The artifact set one training stage writes into its save folder; ``metrics`` is its completion record."""

    checkpoint: Path
    metrics: Path
    state: Path  # the training state ``--resume True`` continues from
    curves: Path
    confusion: Path
    seeds_summary: Path  # <name>_seeds.json, written when several seeds ran
    seeds_table: Path  # <name>_seeds.md
    substitutions: Path  # media replaced while training (audio stages)
    eval_substitutions: Path  # the same for --train False, so the training run's report stays
    predictions: Path | None = None  # the fusion's test labels and predictions at the selected epoch
    table: str = ""  # <name> of <name>_predictions_{dev,test}.csv: the checkpoint's name (fusion: multimodal_fusion)

    @classmethod
    def first_stage(cls, save_dir: str | os.PathLike, name: str, tag: str = "") -> "StageFiles":
        """``<name><tag>.bin`` / ``.json`` / ``.state.pt`` / ``_curves.png`` ...; ``tag`` is `seed_tag`'s."""
        folder, stem = Path(save_dir), f"{name}{tag}"
        return cls(checkpoint=folder / f"{stem}.bin", metrics=folder / f"{stem}.json",
                   state=folder / f"{stem}.state.pt", curves=folder / f"{stem}_curves.png",
                   confusion=folder / f"{stem}_confusion.png", seeds_summary=folder / f"{name}_seeds.json",
                   seeds_table=folder / f"{name}_seeds.md", substitutions=folder / f"{stem}_substitutions.tsv",
                   eval_substitutions=folder / f"{stem}_eval_substitutions.tsv", table=stem)

    @classmethod
    def fusion(cls, save_dir: str | os.PathLike, tag: str = "") -> "StageFiles":
        """``multimodal_fusion_best<tag>.bin`` / ``.json`` (predictions), ``multimodal_fusion_metrics<tag>.json``, ..."""
        folder, stem = Path(save_dir), f"{FUSION}{tag}"
        return cls(checkpoint=folder / f"{FUSION}_best{tag}.bin", metrics=folder / f"{FUSION}_metrics{tag}.json",
                   state=folder / f"{stem}.state.pt", curves=folder / f"{stem}_curves.png",
                   confusion=folder / f"{stem}_confusion.png", seeds_summary=folder / f"{FUSION}_seeds.json",
                   seeds_table=folder / f"{FUSION}_seeds.md", substitutions=folder / f"{stem}_substitutions.tsv",
                   eval_substitutions=folder / f"{stem}_eval_substitutions.tsv",
                   predictions=folder / f"{FUSION}_best{tag}.json", table=stem)

    @property
    def lock_name(self) -> str:
        return self.checkpoint.stem

    def predictions_csv(self, split: str) -> Path:
        """``<name>_predictions_<split>.csv``: one row per utterance of the split (`magtkd.predictions`)."""
        return self.checkpoint.parent / f"{self.table}_predictions_{split}.csv"

    def attention_npz(self, split: str) -> Path:
        """``<name>_attention_<split>.npz``: the fusion's attention per utterance (`magtkd.predictions`)."""
        return self.checkpoint.parent / f"{self.table}_attention_{split}.npz"

    def tables(self) -> list[Path]:
        """The per-utterance files of the evaluated splits (dev, test): predictions CSVs (and, for the
        fusion, the attention npz files)."""
        return [path for split in TABLE_SPLITS for path in
                (self.predictions_csv(split), *([self.attention_npz(split)] if self.predictions else []))]

    @staticmethod
    def in_progress(path: Path) -> Path:
        """Where a training run keeps ``path`` (its best checkpoint, predictions, metrics) until it
        publishes the set at its end, so a re-run never touches the previous complete set before it
        completes (docs/METHOD.md §6): ``text.bin`` -> ``text.bin.partial``."""
        return path.with_name(f"{path.name}.partial")

    def pending(self) -> list[Path]:
        """The in-progress names, published by renaming in this order (metrics last, as a new document)."""
        return [self.in_progress(self.checkpoint), *([self.in_progress(self.predictions)] if self.predictions else []),
                *map(self.in_progress, self.tables()), self.in_progress(self.metrics)]

    def published(self) -> list[Path]:
        """The files a training run publishes, the checkpoint LAST (a pipeline that compares times sees
        the set only once the rest is in place); a best-seed copy goes in this order."""
        return [self.curves, self.confusion, self.metrics, *([self.predictions] if self.predictions else []),
                *self.tables(), self.checkpoint]

    def written(self) -> list[Path]:
        """Every file a training run writes (its stale temps are removed at the next start)."""
        return [*self.published(), *self.pending(), self.state, self.substitutions]



# --------------------------------------------------------------------------- atomic artifact I/O


class WriteError(UserError, OSError):
    """An output could not be written (no space, read-only folder, permission); the message names the
    file and the cause. Its temp file is removed, the previous file (if any) is left as it was."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``path`` on success.

    A failed write (OSError, or torch.save's RuntimeError on a full disk) removes the temp file
    and raises `WriteError` naming ``path`` and the cause (docs/METHOD.md §6).
    """
    path = Path(path)
    tmp_path: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        # mkstemp creates 0600 files; give artifacts the usual umask-based mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    except OSError as err:
        raise WriteError(f"cannot write {path}: {_cause(err, path)}") from err
    except RuntimeError as err:
        cause = _full_disk(err, path)
        if cause is None:
            raise
        raise WriteError(f"cannot write {path}: {cause}") from err
    finally:
        if tmp_path is not None:
            with contextlib.suppress(OSError):
                tmp_path.unlink(missing_ok=True)


def _cause(err: OSError, path: Path) -> str:
    """``os.strerror`` of the failed write, with what to do about it."""
    reason = os.strerror(err.errno) if err.errno else str(err)
    if err.errno == errno.ENOSPC:
        return f"{reason} (free some space on {path.parent}'s disk, or write elsewhere)"
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{reason} (the folder {path.parent} is not writable: choose another output folder)"
    return reason


def _full_disk(err: RuntimeError, path: Path) -> str | None:
    """torch.save reports a failed write as a RuntimeError ("PytorchStreamWriter failed ...",
    "unexpected pos ..."), without errno; it is a full disk when the folder has no space left."""
    text = str(err)
    if "PytorchStreamWriter" not in text and "unexpected pos" not in text and "file write failed" not in text:
        return None
    with contextlib.suppress(OSError):
        if shutil.disk_usage(path.parent).free < 1 << 20:
            return f"{os.strerror(errno.ENOSPC)} (free some space on {path.parent}'s disk, or write elsewhere)"
    return f"the write failed ({text.splitlines()[0] if text else 'torch.save'})"


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=json_default) + "\n")


def json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_state_dict(path: str | os.PathLike, model: nn.Module) -> None:
    """Save a plain ``state_dict`` (the reference's `.bin` format, docs/METHOD.md §0)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def copy_file(src: Path, dst: Path) -> None:
    """Copy ``src`` onto ``dst`` atomically (streamed: checkpoints can be gigabytes)."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)



# --------------------------------------------------------------------------- complete outputs, locks


def remove_stale_temps(folder: str | os.PathLike, names: Sequence[str]) -> None:
    """Delete the temp files `atomic_path` leaves when a write of one of ``names`` was killed.

    Only this stage's names are touched (other stages may be writing into the same folder).
    """
    for name in names:
        for stray in Path(folder).glob(f".{name}.*.tmp"):
            log.info("removing %s, left by an interrupted write", stray)
            stray.unlink(missing_ok=True)


def begin_outputs(record: str | os.PathLike, stage: str, args: Mapping[str, Any],
                  **facts: Any) -> None:
    """Mark an artifact set as being rewritten: its completion record says ``complete: false``.

    Written BEFORE any artifact of the set changes, so a run killed midway
    leaves a set that says it is incomplete (and `run.sh` redoes the stage).
    """
    write_json(record, {"stage": stage, "complete": False, **facts, "args": args_doc(args)})


def finish_outputs(record: str | os.PathLike, stage: str, args: Mapping[str, Any],
                   **facts: Any) -> None:
    """Publish an artifact set: the completion record is written last, naming the stage and its arguments."""
    write_json(record, {"stage": stage, "complete": True, **facts, "args": args_doc(args)})


def args_doc(args: Mapping[str, Any]) -> dict[str, Any]:
    """A run's flags as its records hold them (paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in args.items()}


def read_record(record: str | os.PathLike) -> dict[str, Any] | None:
    """A completion record (or metrics JSON) as a dict; None when absent or unreadable."""
    try:
        doc = json.loads(Path(record).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def recorded_args(metrics: str | os.PathLike) -> dict[str, Any]:
    """The arguments a training stage recorded in its metrics document (``{}`` when there is none):
    the settings a checkpoint does not show, such as the fusion's ``n_head``."""
    doc = read_record(metrics)
    if doc is None:
        if Path(metrics).exists():
            log.warning("%s is not a metrics document; using the default settings", metrics)
        return {}
    return doc["args"] if isinstance(doc.get("args"), dict) else {}


def check_complete(record: str | os.PathLike, what: str, producer: str) -> dict[str, Any] | None:
    """Refuse an artifact set whose record says its run did not finish.

    No record at all is accepted (artifacts made elsewhere, e.g. the authors'
    checkpoints or features); returns the record when there is one.
    """
    doc = read_record(record)
    if doc is None and Path(record).exists():
        raise UserError(f"{record} is unreadable (an interrupted write?); re-run {producer} to rebuild {what}")
    if doc is not None and doc.get("complete") is False:
        raise UserError(f"{what} is incomplete: the run of {producer} that writes it did not finish "
                        f"({record} says complete: false); re-run {producer}")
    return doc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, name: str, holder: str = "", what: str | None = None) -> Iterator[Path]:
    """Hold ``<folder>/.<name>.lock`` (holding the owner's PID, then ``holder``: what runs) while a stage (or
    the pipeline) writes its artifact set (``what``: for the message; default ``name``).

    A second run writing the same set into the same folder stops with a clear
    message naming the first; a lock left by a process that no longer runs is taken over (logged).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / f".{name}.lock"
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid, _, other = lock.read_text().strip().partition("\n")
                age = time.time() - lock.stat().st_mtime
            except OSError:
                continue  # released meanwhile: try again
            owner = int(pid) if pid.isdigit() else None
            if (owner is not None and _pid_alive(owner)) or (owner is None and age < 10):
                first = f"PID {owner if owner is not None else '?'}" + (f": {other.strip()}" if other.strip() else "")
                raise UserError(
                    f"{folder} is in use: another run ({first}) is writing {what or name} there (lock {lock}); "
                    "wait for it to finish, or write elsewhere (--save_dir/--feature_dir)"
                )
            log.warning("taking over the stale lock %s of PID %s, which is no longer running", lock, owner)
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{os.getpid()}\n{holder}\n" if holder else f"{os.getpid()}\n")
        break
    try:
        yield lock
    finally:
        with contextlib.suppress(OSError):
            if lock.read_text().split("\n", 1)[0].strip() == str(os.getpid()):
                lock.unlink()



# --------------------------------------------------------------------------- substitution report


@dataclass(frozen=True)
class Substitution:
    key: str  # utterance key, e.g. "train/dia3_utt1" or "dev/12_4"
    path: str  # media file that could not be read
    reason: str  # why (missing, corrupt, no audio stream, ...)
    replacement: str  # what was used instead ("silence", "black frames")


class SubstitutionReport:
    """Collects substitutions; warns once per media file; writes a TSV report."""

    header = "key\tpath\treason\treplacement\n"

    def __init__(self) -> None:
        self.items: list[Substitution] = []
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def add(self, key: str, path: str | Path, reason: str, replacement: str) -> None:
        path = str(path)
        with self._lock:
            self.items.append(Substitution(key, path, reason, replacement))
            if path not in self._warned:
                self._warned.add(path)
                log.warning("media %s (%s): using %s", path, reason, replacement)

    def add_problem(self, key: str, problem: Sequence[str], replacement: str) -> None:
        """Record a ``(path, reason[, replacement])`` problem; a third item overrides ``replacement``
        (a partially decoded file keeps what was decoded)."""
        self.add(key, problem[0], problem[1], problem[2] if len(problem) > 2 else replacement)

    def extend(self, other: "SubstitutionReport") -> None:
        for item in other.items:
            self.add(item.key, item.path, item.reason, item.replacement)

    def __len__(self) -> int:
        return len(self.items)

    def write(self, path: str | Path) -> Path:
        """Write the report (also when empty, so a clean run is visible as such).

        Under torchrun every rank calls this: the ranks' items are gathered and rank 0 writes them.
        """
        items = [item for part in gather_objects(list(self.items)) for item in part]
        if not is_main():
            return Path(path)
        rows = sorted(set(items), key=lambda s: (s.key, s.path))
        lines = [self.header] + [
            f"{s.key}\t{s.path}\t{s.reason.replace(chr(9), ' ')}\t{s.replacement}\n" for s in rows
        ]
        write_text(path, "".join(lines))
        return Path(path)

    @staticmethod
    def read(path: str | Path) -> list[Substitution]:
        lines = Path(path).read_text(encoding="utf-8").splitlines()[1:]
        return [Substitution(*line.split("\t")) for line in lines if line]
