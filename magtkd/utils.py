"""What every stage script shares: flags, device/seed/logging, atomic artifact I/O,
checkpoints, the substitution report, metrics, the learning-rate schedule and the
training / evaluation loops (first stage and fusion).

Everything here is dataset-agnostic; a stage script passes its dataset's
description (``<DS>/config.py``) and defaults explicitly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

if TYPE_CHECKING:
    from .dataset import DatasetSpec

log = logging.getLogger("magtkd")


# --------------------------------------------------------------------------- user errors and the entry point

class UserError(Exception):
    """A mistake the user can fix (a flag, a file, a CSV row, a checkpoint that does not fit).

    `run` prints its message as one line and exits with status 2 (no traceback
    unless ``--debug``); the message names the flag/file/row/key and what to do.
    The library's own error types (DataError, FeatureFileError, CheckpointError,
    ...) derive from it.
    """


class InputMissing(UserError, FileNotFoundError):
    """An input file or folder that does not exist; the message says which stage writes it."""


def run(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> None:
    """The stage scripts' entry point: ``if __name__ == "__main__": utils.run(main)``.

    User errors (`UserError`, and ``SystemExit`` carrying a message) become one
    line on stderr and exit status 2; with ``--debug`` on the command line they
    keep their traceback. Anything else is unexpected and keeps its traceback.
    ``main(argv)`` called directly (tests) raises as usual.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        main(argv)
    except UserError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except SystemExit as err:
        if isinstance(err.code, str) and not debug:
            message = err.code if err.code.startswith("error: ") else f"error: {err.code}"
            print(message, file=sys.stderr)
            raise SystemExit(2) from None
        raise


def add_debug_flag(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of errors in the input (flags, files, data)")
    return parser


def _checked_number(kind: type, low: float, inclusive: bool, what: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (value >= low if inclusive else value > low) or value != value:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


# Flag types that refuse values which would silently do nothing (``--epochs 0``) or fail deep
# inside torch (``--batch_size 0``, ``--learning_rate -1``): the error names the flag.
positive_int = _checked_number(int, 1, True, "an integer >= 1")
nonnegative_int = _checked_number(int, 0, True, "an integer >= 0")
positive_float = _checked_number(float, 0.0, False, "a number > 0")
nonnegative_float = _checked_number(float, 0.0, True, "a number >= 0")


# --------------------------------------------------------------------------- flags, device, seed, logging



def str2bool(value: str | bool) -> bool:
    """Parse ``--train False`` properly (the reference's ``type=bool`` made any value True)."""
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in {"true", "1", "yes", "y", "t"}:
        return True
    if lowered in {"false", "0", "no", "n", "f"}:
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults, and keep the stage docstring's layout (it holds the exact command)."""


def paths_parser(spec: DatasetSpec, script_dir: str | Path, description: str | None) -> argparse.ArgumentParser:
    """Flags every stage has: folders (defaulting relative to the script's folder), device, workers."""
    script_dir = Path(script_dir)
    parser = argparse.ArgumentParser(
        description=description, formatter_class=HelpFormatter
    )
    parser.add_argument("--data_dir", type=Path, default=spec.default_data_dir(script_dir),
                        help="the dataset folder (release + prepared CSVs)")
    parser.add_argument("--pretrained_dir", type=Path, default=spec.default_pretrained_dir(script_dir),
                        help="folder holding the four pretrained model folders")
    parser.add_argument("--save_dir", type=Path, default=spec.default_save_dir(script_dir),
                        help="checkpoints (.bin) and their metrics JSON")
    parser.add_argument("--feature_dir", type=Path, default=spec.default_feature_dir(script_dir),
                        help="stored frames and first-stage feature pickles")
    parser.add_argument("--device", default=None, help="cuda, cuda:1 or cpu; None = CUDA when available, else CPU")
    parser.add_argument("--num_workers", type=nonnegative_int, default=0, help="data-loading worker processes")
    return add_debug_flag(parser)


def training_parser(
    spec: DatasetSpec, script_dir: str | Path, description: str | None, *, epochs: int, batch_size: int,
    learning_rate: float, seed: int = 2024, kd: bool = False,
) -> argparse.ArgumentParser:
    """The flags of every first-stage training script (text, audio, video, KD), with the given defaults.

    The reference's names (``--epochs --batch_size --seed --learning_rate --train``)
    plus ours; the script passes its dataset's defaults (docs/METHOD.md §2).
    Precision as the authors (docs/METHOD.md §3): text/audio/video train in fp32
    (``--amp True``: bf16 autocast on CUDA); KD (``kd=True``) runs under fp16
    autocast with a gradient scaler (``--amp False``: fp32), its gradients
    unscaled before clipping unless ``--reference_kd_clip True``.
    """
    parser = paths_parser(spec, script_dir, description)
    parser.add_argument("--epochs", type=positive_int, default=epochs)
    parser.add_argument("--batch_size", type=positive_int, default=batch_size)
    parser.add_argument("--seed", type=int, default=seed)
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="train one model per seed (<name>_seed<S>.bin; the best dev one also as <name>.bin) "
                             "and write <name>_seeds.json/.md; default: the single --seed")
    parser.add_argument("--train", type=str2bool, default=True,
                        help="True: train; False: evaluate the saved checkpoint on test")
    parser.add_argument("--learning_rate", type=positive_float, default=learning_rate)
    parser.add_argument("--per_batch_schedule", type=str2bool, default=False,
                        help="count warmup/total steps in batches instead of the reference's samples")
    if kd:
        parser.add_argument("--amp", type=str2bool, default=True,
                            help="fp16 autocast on CUDA with a gradient scaler, as the authors' KD (the scaler "
                                 "also runs on CPU, where the forward stays fp32)")
        parser.add_argument("--reference_kd_clip", type=str2bool, default=False,
                            help="clip the still-SCALED gradients at 10, as the authors did (the update then sees "
                                 "gradients of norm about 10/scale); default: unscale, then clip")
    else:
        parser.add_argument("--amp", type=str2bool, default=False,
                            help="bf16 autocast on CUDA; default fp32, as the authors (CPU always runs fp32)")
    add_determinism_flag(parser)
    add_loop_flags(parser, checkpointing=True)
    return parser


def add_loop_flags(parser: argparse.ArgumentParser, checkpointing: bool) -> argparse.ArgumentParser:
    """Memory and restart flags of every training loop (`fit`, `fit_fusion`)."""
    parser.add_argument("--grad_accum", type=int, default=1,
                        help="accumulate gradients over N batches per update (an N times larger batch)")
    if checkpointing:
        parser.add_argument("--grad_checkpointing", type=str2bool, default=False,
                            help="recompute the Hugging Face backbone's activations in backward (less memory)")
    parser.add_argument("--resume", type=str2bool, default=False,
                        help="continue from the training state saved after the last completed epoch")
    return parser


def add_determinism_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--deterministic", type=str2bool, default=True,
                        help="cudnn.deterministic=True, benchmark=False, as the authors; False trades "
                             "run-to-run reproducibility for speed")


def add_audio_cache_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--audio_cache``/``--audio_cache_dir`` of the stages that decode audio (`audio_cache_dir`)."""
    parser.add_argument("--audio_cache", type=str2bool, default=True,
                        help="store each clip's decoded 16 kHz samples the first time (keyed by the source "
                             "file's path, size and mtime; identical samples) and read them in later epochs "
                             "and stages; False: decode every time")
    parser.add_argument("--audio_cache_dir", type=Path, default=None,
                        help="the audio cache folder; None: <feature_dir>/audio_cache")
    return parser


def audio_cache_dir(args: argparse.Namespace) -> Path | None:
    """The audio cache folder the flags name (`add_audio_cache_flags`); None when caching is off."""
    if not args.audio_cache:
        return None
    return Path(args.audio_cache_dir) if args.audio_cache_dir is not None else Path(args.feature_dir) / "audio_cache"


def resolve_device(name: str | None) -> torch.device:
    """The device of this process; under ``torchrun`` also joins the process group (`init_distributed`)."""
    if name is None or name == "":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except (RuntimeError, ValueError):
            raise UserError(f"--device {name}: not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} requested but CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                        f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda devices are supported")
    return init_distributed(device)


# --------------------------------------------------------------------------- several processes (torchrun)

def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes artifacts, logs and progress bars."""
    return rank() == 0


def init_distributed(device: torch.device) -> torch.device:
    """Join the process group ``torchrun`` describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT).

    One process per device: CUDA processes take ``cuda:LOCAL_RANK`` and NCCL, CPU
    processes gloo. Without ``torchrun`` (WORLD_SIZE unset or 1) the device is
    returned unchanged. Ranks other than 0 log warnings only.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if not is_main():
        logging.getLogger().setLevel(logging.WARNING)
    return device


def progress(iterable, **kwargs) -> tqdm:
    """A tqdm bar on rank 0 only (and only on a terminal, tqdm's ``disable=None``)."""
    options = {"leave": False, "dynamic_ncols": True, **kwargs}
    return tqdm(iterable, disable=None if is_main() else True, **options)


def shard(items: Sequence[Any]) -> list[Any]:
    """This rank's share of ``items`` (every ``world_size``-th item from ``rank``); all of them on one process."""
    return list(items)[rank()::world_size()]


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` on one process)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


class EvalShardSampler(torch.utils.data.Sampler):
    """Every ``world_size``-th index from ``rank``, in order: each item on exactly one rank, no padding
    (a DistributedSampler would repeat items to even out the shards and count them twice)."""

    def __init__(self, n: int) -> None:
        self.indices = list(range(n))[rank()::world_size()]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def train_sampler(dataset, seed: int) -> torch.utils.data.DistributedSampler | None:
    """The training split's sampler under torchrun: a DistributedSampler shuffled by ``seed`` + epoch
    (`fit` calls ``set_epoch`` every epoch); ``None`` on one process (the loader shuffles itself)."""
    if world_size() == 1:
        return None
    return torch.utils.data.DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=False)


def set_seed(seed: int, deterministic: bool = True) -> None:
    """Seed Python, numpy and torch, as the authors' scripts do (docs/METHOD.md §7).

    ``PYTHONHASHSEED`` is exported for child processes (data-loading workers,
    subprocesses); the running interpreter's hash seed was fixed at its start.
    ``deterministic`` sets ``cudnn.deterministic = True`` and ``cudnn.benchmark = False``
    (the authors' setting); False lets cuDNN pick the fastest, non-deterministic kernels.
    """
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def setup_logging() -> None:
    """One console format for all stages; safe to call more than once."""
    root = logging.getLogger()
    if not any(getattr(h, "_magtkd", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        handler._magtkd = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    # One tqdm bar per epoch is ours; transformers' per-load "Loading weights" bars are noise.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def log_start(stage: str, args: argparse.Namespace, device: torch.device,
              sizes: Mapping[str, int] | None = None) -> None:
    """Log resolved arguments, device and dataset sizes at the start of a stage."""
    log.info("%s: arguments %s", stage, {k: str(v) for k, v in sorted(vars(args).items())})
    log.info("%s: device %s world_size=%d", stage, device, world_size())
    if sizes:
        log.info("%s: sizes %s", stage, dict(sizes))


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    return parser.parse_args(None if argv is None else list(argv))


# --------------------------------------------------------------------------- atomic artifact I/O

@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give artifacts the usual umask-based mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
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


# --------------------------------------------------------------------------- complete outputs, locks

def remove_stale_temps(folder: str | os.PathLike, names: Sequence[str]) -> None:
    """Delete the temp files `atomic_path` leaves when a write of one of ``names`` was killed.

    Only this stage's names are touched (other stages may be writing into the same folder).
    """
    for name in names:
        for stray in Path(folder).glob(f".{name}.*.tmp"):
            log.info("removing %s, left by an interrupted write", stray)
            stray.unlink(missing_ok=True)


def begin_outputs(record: str | os.PathLike, stage: str, args: argparse.Namespace | Mapping[str, Any],
                  **facts: Any) -> None:
    """Mark an artifact set as being rewritten: its completion record says ``complete: false``.

    Written BEFORE any artifact of the set changes, so a run killed midway
    leaves a set that says it is incomplete (and `run.sh` redoes the stage).
    """
    write_json(record, {"stage": stage, "complete": False, **facts, "args": _args_doc(args)})


def finish_outputs(record: str | os.PathLike, stage: str, args: argparse.Namespace | Mapping[str, Any],
                   **facts: Any) -> None:
    """Publish an artifact set: the completion record is written last, naming the stage and its arguments."""
    write_json(record, {"stage": stage, "complete": True, **facts, "args": _args_doc(args)})


def _args_doc(args: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    items = vars(args).items() if isinstance(args, argparse.Namespace) else args.items()
    return {k: str(v) if isinstance(v, Path) else v for k, v in items}


def read_record(record: str | os.PathLike) -> dict[str, Any] | None:
    """A completion record (or metrics JSON) as a dict; None when absent or unreadable."""
    try:
        doc = json.loads(Path(record).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


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
def output_lock(folder: str | os.PathLike, name: str) -> Iterator[Path]:
    """Hold ``<folder>/.<name>.lock`` (holding the owner's PID) while a stage writes its artifact set.

    A second run writing the same set into the same folder stops with a clear
    message; a lock left by a process that no longer runs is taken over (logged).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / f".{name}.lock"
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                text = lock.read_text().strip()
                age = time.time() - lock.stat().st_mtime
            except OSError:
                continue  # released meanwhile: try again
            owner = int(text) if text.isdigit() else None
            if (owner is not None and _pid_alive(owner)) or (owner is None and age < 10):
                raise UserError(
                    f"{folder} is in use: another run (PID {owner if owner is not None else '?'}) is writing "
                    f"{name} there (lock {lock}); wait for it to finish, or write elsewhere (--save_dir/--feature_dir)"
                )
            log.warning("taking over the stale lock %s of PID %s, which is no longer running", lock, owner)
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{os.getpid()}\n")
        break
    try:
        yield lock
    finally:
        with contextlib.suppress(OSError):
            if lock.read_text().strip() == str(os.getpid()):
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


# --------------------------------------------------------------------------- checkpoints

class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing or does not fit the model it is loaded into."""


def read_state_dict(path: str | Path, produced_by: str) -> dict[str, torch.Tensor]:
    """``torch.load`` (tensors only) a plain state_dict; a missing or unreadable file names the stage that writes it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found: it is written by {produced_by}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, not a checkpoint, refused global, ...
        message = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(
            f"cannot read checkpoint {path} ({type(exc).__name__}: {message[:200]}); it is truncated or "
            f"not a checkpoint: re-run {produced_by}"
        ) from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a state_dict (got {type(state).__name__})")
    return state


def mismatch(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """Missing / unexpected keys and shape mismatches of ``state`` against ``model`` ('' if it fits)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state) if tuple(state[k].shape) != tuple(own[k].shape)
    )

    def show(keys: list[str]) -> str:
        return ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8} more)" if len(keys) > 8 else "")

    problems = [f"missing keys: {show(missing)}" if missing else "",
                f"unexpected keys: {show(unexpected)}" if unexpected else "",
                f"shape mismatches: {show(shapes)}" if shapes else ""]
    return "; ".join(p for p in problems if p)


def check_checkpoint_record(path: Path, produced_by: str, labels: Sequence[str] | None = None) -> None:
    """Refuse a checkpoint whose metrics JSON says its run did not finish or that it belongs to another
    dataset / label list (both sides named). Checkpoints without a JSON (the authors') are accepted."""
    path = Path(path)
    record = path.with_suffix(".json")
    doc = check_complete(record, f"checkpoint {path}", produced_by)
    if doc is None:
        return
    expected = produced_by.split("/", 1)[0] if "/" in produced_by else None
    if expected and doc.get("dataset") not in (None, expected):
        raise CheckpointError(f"checkpoint {path} was trained on {doc['dataset']} ({record}) but this run "
                              f"needs a {expected} checkpoint written by {produced_by}")
    if labels is not None and doc.get("labels") is not None and list(doc["labels"]) != list(labels):
        raise CheckpointError(f"checkpoint {path} has labels {doc['labels']} ({record}); this run needs "
                              f"{list(labels)}: use the checkpoint {produced_by} writes for this dataset")


def check_fusion_record(save_dir: Path, dataset: str, checkpoint: Path) -> dict[str, Any] | None:
    """The fusion's metrics JSON (its completion record) must say complete and name ``dataset``;
    a checkpoint without one (the authors') is accepted."""
    producer = f"{dataset}/multimodal_fusion.py"
    doc = check_complete(Path(save_dir) / FUSION_METRICS, f"the fusion checkpoint {checkpoint}", producer)
    if doc is not None and doc.get("dataset") not in (None, dataset):
        raise CheckpointError(
            f"fusion checkpoint {checkpoint} was trained on {doc['dataset']} features "
            f"({Path(save_dir) / FUSION_METRICS}) but this is {producer}: pass the --save_dir of a {dataset} run"
        )
    return doc


# The authors' first-stage modules (docs/METHOD.md §7): the pretrained encoder is ``text_model``
# (a RobertaModel WITH its pooler, which the representation never uses) or ``model``
# (data2vec / TimeSformer), the classifier ``W``; ours are ``backbone`` and ``classifier``
# (+ the text ``project``). Entries of theirs that our modules lack and nothing reads.
AUTHORS_BACKBONES = ("text_model.", "model.")
AUTHORS_UNUSED = (".pooler.", "embeddings.position_ids")


def from_authors_layout(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path
                        ) -> dict[str, torch.Tensor]:
    """A first-stage state_dict as the authors' code writes it, renamed onto ``model``'s names.

    ``text_model.*`` / ``model.*`` -> ``backbone.*``; the pooler (and a stored
    ``position_ids`` buffer) are dropped; each other top-level Linear (``W``, and
    the text projection whatever its name) goes to the one head Linear of ours
    with its weight's shape. Anything that fits nowhere keeps its name, so the
    strict check in `load_checkpoint` reports it. Our own checkpoints pass unchanged.
    """
    if any(k.startswith("backbone.") for k in state) or not any(k.startswith(AUTHORS_BACKBONES) for k in state):
        return dict(state)
    own = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    heads: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        prefix = next((p for p in AUTHORS_BACKBONES if key.startswith(p)), None)
        if prefix is None:
            module, _, leaf = key.rpartition(".")
            heads.setdefault(module, {})[leaf] = value
            continue
        ours = "backbone." + key[len(prefix):]
        if ours not in own and any(part in key for part in AUTHORS_UNUSED):
            dropped.append(key)
        else:
            mapped[ours] = value
    our_heads = {k.rpartition(".")[0] for k in own if not k.startswith("backbone.")}
    renamed = []
    for module, params in heads.items():
        weight = params.get("weight")
        fits = [h for h in our_heads if weight is not None and set(params) == {"weight", "bias"}
                and tuple(own[f"{h}.weight"].shape) == tuple(weight.shape)]
        if module and len(fits) == 1:
            our_heads.discard(fits[0])
            mapped.update({f"{fits[0]}.{leaf}": v for leaf, v in params.items()})
            renamed.append(f"{module} -> {fits[0]}")
        else:  # unknown to us: left under its own name for the error message
            mapped.update({f"{module}.{leaf}" if module else leaf: v for leaf, v in params.items()})
    log.info("%s: laid out as the authors' code writes it; backbone renamed, heads %s, %d unused entries "
             "dropped (%s)", path, ", ".join(renamed) or "none", len(dropped),
             ", ".join(sorted({k.split(".pooler.")[0] + ".pooler" if ".pooler." in k else k for k in dropped})))
    return mapped


def load_checkpoint(model: nn.Module, path: Path, produced_by: str, labels: Sequence[str] | None = None) -> nn.Module:
    """Load a plain state_dict strictly (ours, or the authors' layout, `from_authors_layout`);
    errors name the file and the mismatched keys; a metrics JSON beside it must say complete and
    name this dataset and ``labels`` (`check_checkpoint_record`)."""
    check_checkpoint_record(path, produced_by, labels)
    state = from_authors_layout(model, read_state_dict(path, produced_by), Path(path))
    problems = mismatch(model, state)
    if problems:
        raise CheckpointError(
            f"checkpoint {path} does not match the model ({problems}); "
            f"was it written by {produced_by} with the same pretrained folder?"
        )
    model.load_state_dict(state)
    return model


# --------------------------------------------------------------------------- metrics

def summary(labels: Sequence[int], preds: Sequence[int]) -> dict[str, float]:
    """Accuracy and weighted F1 as fractions in [0, 1]."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    if labels.size == 0:
        return {"accuracy": 0.0, "weighted_f1": 0.0}
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "weighted_f1": float(f1_score(labels, preds, average="weighted", zero_division=0)),
    }


def per_class(labels: Sequence[int], preds: Sequence[int], names: Sequence[str]) -> dict:
    """Per-class precision / recall / F1 / support (sklearn's dict report)."""
    return classification_report(
        labels, preds, labels=list(range(len(names))), target_names=list(names),
        output_dict=True, zero_division=0,
    )


def report_text(labels: Sequence[int], preds: Sequence[int], names: Sequence[str]) -> str:
    return classification_report(
        labels, preds, labels=list(range(len(names))), target_names=list(names),
        digits=4, zero_division=0,
    )


def confusion(labels: Sequence[int], preds: Sequence[int], n_classes: int) -> list[list[int]]:
    return confusion_matrix(labels, preds, labels=list(range(n_classes))).tolist()


def majority_weighted_f1(train_labels: Sequence[int], test_labels: Sequence[int]) -> float:
    """Weighted F1 of always predicting the most frequent training class."""
    majority = int(np.bincount(np.asarray(train_labels)).argmax())
    return summary(test_labels, [majority] * len(test_labels))["weighted_f1"]


# --------------------------------------------------------------------------- learning-rate schedule

def linear_warmup_decay(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Linear warmup to the base rate over ``warmup_steps``, then linear decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return float(step) / float(max(1, warmup_steps))
        return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))

    return LambdaLR(optimizer, factor)


def reference_schedule(
    optimizer: torch.optim.Optimizer, n_train: int, batches_per_epoch: int, epochs: int,
    per_batch: bool = False,
) -> LambdaLR:
    """The schedule the stages step once per batch.

    By default this reproduces the reference: warmup and total are counted in
    training SAMPLES (warmup = n_train, total = n_train * epochs) while the
    scheduler is stepped once per BATCH, so with batch 4 the peak is reached
    after 4 of 10 epochs and the rate never decays far (docs/METHOD.md §2).
    ``per_batch=True`` counts both in batches instead (warmup = one epoch).
    """
    if per_batch:
        return linear_warmup_decay(optimizer, batches_per_epoch, batches_per_epoch * epochs)
    return linear_warmup_decay(optimizer, n_train, n_train * epochs)


# --------------------------------------------------------------------------- first-stage training loop


# step(batch, train) -> (loss or None, logits); batch is already on the device.
StepFn = Callable[[dict, bool], tuple[torch.Tensor | None, torch.Tensor]]


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def autocast(device: torch.device, amp: bool, dtype: torch.dtype = torch.bfloat16):
    """Autocast to ``dtype`` on CUDA (when enabled); plain fp32 on CPU."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def note_problems(batch: Mapping[str, Any], dataset, report: SubstitutionReport | None,
                  replacement: str = "silence") -> None:
    """Record media substitutions carried by a batch (``*_problems`` lists) in the report."""
    if report is None:
        return
    for name, problems in batch.items():
        if not name.endswith("_problems"):
            continue
        for index, problem in zip(batch["index"].tolist(), problems):
            if problem is not None:
                utt = dataset.samples[index].utterance
                report.add_problem(f"{utt.split}/{utt.key}", problem, replacement)


@torch.inference_mode()
def predict(step: StepFn, loader, device: torch.device, amp: bool,
            report: SubstitutionReport | None = None, desc: str = "eval",
            amp_dtype: torch.dtype = torch.bfloat16) -> tuple[np.ndarray, np.ndarray]:
    """Gold labels and argmax predictions over a loader, in dataset (CSV) order.

    Under torchrun each rank scores its shard (`magtkd.dataset.make_loader`) and the
    ranks' outputs are gathered and put back in order by sample index, each sample once.
    """
    index, labels, preds = [], [], []
    for batch in progress(loader, desc=desc):
        note_problems(batch, loader.dataset, report)
        index.append(batch["index"])
        batch = to_device(batch, device)
        with autocast(device, amp, amp_dtype):
            _, logits = step(batch, False)
        labels.append(batch["labels"].cpu())
        preds.append(logits.float().argmax(-1).cpu())
    local = {"labels": _cat(labels), "preds": _cat(preds)}
    ordered = in_dataset_order(_cat(index), local)
    return ordered["labels"], ordered["preds"]


def _cat(chunks: list) -> np.ndarray:
    if not chunks:
        return np.zeros(0, dtype=np.int64)
    if torch.is_tensor(chunks[0]):
        return torch.cat(chunks).numpy()
    return np.concatenate(chunks)


def in_dataset_order(index: np.ndarray, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Gather per-sample ``outputs`` (rows aligned with ``index``) from every rank and sort them by index."""
    # A rank with an empty shard (more ranks than samples) contributes nothing.
    parts = [p for p in gather_objects((np.asarray(index), dict(outputs))) if len(p[0])] or [(index, outputs)]
    index = np.concatenate([p[0] for p in parts])
    order = np.argsort(index, kind="stable")
    if len(np.unique(index)) != len(index):
        raise RuntimeError("evaluation shards overlap: a sample was scored on more than one rank")
    return {key: np.concatenate([p[1][key] for p in parts])[order] for key in outputs}


@torch.inference_mode()
def representations(models: Mapping[str, nn.Module], loader, device: torch.device, amp: bool,
                    report: SubstitutionReport | None = None) -> dict[str, np.ndarray]:
    """(N, D) float32 representations of each encoder (``encoder.encode(batch)``), in dataset order
    (gathered from every rank under torchrun).

    All encoders run on the same batches, so encoders sharing an input decode each clip once.
    """
    outputs: dict[str, list[np.ndarray]] = {key: [] for key in models}
    index = []
    for batch in progress(loader, desc="batches"):
        note_problems(batch, loader.dataset, report)
        index.append(batch["index"])
        batch = to_device(batch, device)
        for key, encoder in models.items():
            with autocast(device, amp):
                rep, _ = encoder.encode(batch)
            outputs[key].append(rep.float().cpu().numpy())
    local = {key: np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
             for key, chunks in outputs.items()}
    return in_dataset_order(_cat(index), local)


def substitution_report_path(checkpoint: Path, train: bool) -> Path:
    """``<name>_substitutions.tsv`` beside the checkpoint; evaluation-only runs keep their own
    (``<name>_eval_substitutions.tsv``), so the training run's report stays intact."""
    return checkpoint.parent / f"{checkpoint.stem}{'_substitutions' if train else '_eval_substitutions'}.tsv"


def test_report(labels: np.ndarray, preds: np.ndarray, names: Sequence[str]) -> dict:
    out = summary(labels, preds)
    out["per_class"] = per_class(labels, preds, names)
    out["confusion"] = confusion(labels, preds, len(names))  # rows = gold, columns = predicted
    return out


# --------------------------------------------------------------------------- updates, memory knobs, resume

class StepModule(nn.Module):
    """``step`` as a module over ``model``, so DistributedDataParallel sees the forward pass that
    produces the loss (its gradient hooks sit on ``model``'s parameters)."""

    def __init__(self, model: nn.Module, step: Callable[..., Any]) -> None:
        super().__init__()
        self.model = model
        self.step = step

    def forward(self, *args: Any) -> Any:
        return self.step(*args)


def wrap_for_training(model: nn.Module, step: Callable[..., Any], device: torch.device) -> nn.Module:
    """``StepModule(model, step)``, inside DistributedDataParallel under torchrun.

    ``find_unused_parameters``: data2vec's mask embedding only gets a gradient when a
    time mask was drawn for the batch.
    """
    runner: nn.Module = StepModule(model, step)
    if world_size() > 1:
        runner = nn.parallel.DistributedDataParallel(
            runner, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    return runner


def enable_grad_checkpointing(model: nn.Module) -> list[str]:
    """``--grad_checkpointing True``: the Hugging Face backbones inside ``model`` recompute their layers'
    activations during backward (less memory, about a third more compute); returns their class names."""
    found = [m for m in model.modules() if getattr(m, "supports_gradient_checkpointing", False)
             and hasattr(m, "gradient_checkpointing_enable")]
    if not found:
        raise SystemExit(f"--grad_checkpointing True: {type(model).__name__} has no Hugging Face backbone")
    for module in found:
        # Non-reentrant checkpointing restores the RNG state, so dropout masks match the plain run.
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return [type(m).__name__ for m in found]


def groups(batches: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive batches in groups of ``size`` (the last group may be shorter): one update each."""
    group: list[Any] = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def update(runner: nn.Module, group: Sequence[Any], loss_of: Callable[[Any], torch.Tensor],
           optimizer: torch.optim.Optimizer, scheduler, params: Sequence[nn.Parameter],
           grad_clip: float, scaler: torch.amp.GradScaler | None = None, clip_scaled: bool = False) -> torch.Tensor:
    """One optimizer update over the micro-batches of ``group`` (``--grad_accum``); returns its loss
    (a detached scalar on the device: reading it is the caller's host round trip).

    ``loss_of(batch)`` is the mean loss over the batch's items. Each micro-batch's
    loss is weighted by its share of the group's items (`_count`), so the
    accumulated gradient is that of the mean loss over the whole group: the same
    update as one batch holding all of them, for losses that are means over items
    (cross-entropy). Loss terms that relate the items of a batch to each other (the
    KD correlation/relation terms, docs/METHOD.md §3) are computed per micro-batch.
    Under DDP the gradients are all-reduced once, at the last micro-batch. With a
    gradient ``scaler`` (fp16 KD, docs/METHOD.md §3) the gradients are unscaled
    before clipping, or clipped while still scaled with ``clip_scaled`` (the
    authors' order).
    """
    optimizer.zero_grad(set_to_none=True)
    counts = [_count(batch) for batch in group]
    total = sum(counts)
    value = torch.zeros((), dtype=torch.float64)
    for i, (batch, count) in enumerate(zip(group, counts)):
        last = i == len(group) - 1
        with contextlib.nullcontext() if last or not hasattr(runner, "no_sync") else runner.no_sync():
            loss = loss_of(batch)
            # A single batch backpropagates its loss as is: the plain update, bit for bit.
            share = loss if len(group) == 1 else loss * (count / total)
            (share if scaler is None else scaler.scale(share)).backward()
        value = value.to(loss.device) + loss.detach() * (count / total)
    if scaler is not None and not clip_scaled:
        scaler.unscale_(optimizer)  # clip the true gradients (a no-op when the scaler is disabled)
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)  # unscales first if not done above; skips steps with inf/nan gradients
        scaler.update()
    scheduler.step()
    return value


def _count(batch: Any) -> float:
    """Items of a batch the loss averages over: real utterances of a fusion batch, else samples."""
    return float(len(batch["labels"]) if isinstance(batch, Mapping) else len(batch))


def state_path(checkpoint: Path) -> Path:
    """The training state beside a checkpoint: ``text.bin`` -> ``text.state.pt``."""
    return checkpoint.with_name(f"{checkpoint.stem}.state.pt")


def _rng_state(generators: Sequence[torch.Generator]) -> dict[str, Any]:
    name, key, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": [g.get_state() for g in generators],
    }


def _set_rng_state(state: Mapping[str, Any], generators: Sequence[torch.Generator]) -> None:
    random.setstate(state["python"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for generator, saved in zip(generators, state["generators"]):
        generator.set_state(saved)


def _plain(obj: Any) -> Any:
    """JSON-like copy (numpy scalars -> floats), loadable by ``torch.load(weights_only=True)``."""
    return json.loads(json.dumps(obj, default=_json_default))


# Flags that must match between the run that saved a training state and the run resuming it.
RESUME_MUST_MATCH = ("epochs", "batch_size", "learning_rate", "lr", "l2", "seed", "grad_accum",
                     "per_batch_schedule", "dropout", "student", "teacher")


def save_training_state(path: Path, *, stage: str, epoch: int, model: nn.Module, optimizer, scheduler,
                        generators: Sequence[torch.Generator], args: argparse.Namespace, **progress_: Any) -> None:
    """Everything needed to continue after ``epoch``, written atomically by rank 0 (every rank's RNG
    states are gathered into it)."""
    rngs = gather_objects(_rng_state(generators))
    if not is_main():
        return
    state = {
        "stage": stage, "epoch": epoch, "world_size": world_size(),
        "args": {k: str(v) for k, v in vars(args).items() if k in RESUME_MUST_MATCH},
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rngs,
        "progress": _plain(progress_),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_training_state(path: Path, *, stage: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """The saved state when ``args.resume`` (``None`` if there is none yet: training starts at epoch 1).

    Without ``--resume`` an existing state file is never used: the log says it is
    ignored and will be overwritten. A state saved with other training flags or
    another number of processes is refused with a message naming them.
    """
    if not getattr(args, "resume", False):
        if path.exists():
            log.warning("%s: ignoring the training state %s of an earlier run (pass --resume True to continue "
                        "it); it is overwritten after this run's first epoch", stage, path)
        return None
    if not path.is_file():
        log.info("%s: --resume True but no training state at %s yet: starting at epoch 1", stage, path)
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    now = {k: str(v) for k, v in vars(args).items() if k in RESUME_MUST_MATCH}
    differ = {k: (state["args"].get(k), now[k]) for k in now if state["args"].get(k) != now[k]}
    if state["world_size"] != world_size():
        differ["world_size"] = (str(state["world_size"]), str(world_size()))
    if differ:
        raise SystemExit(f"{path} was saved with different settings ("
                         + ", ".join(f"--{k} {old} then, {new} now" for k, (old, new) in sorted(differ.items()))
                         + "); resume with the same flags, or delete the file to start over")
    return state


def restore_training_state(state: Mapping[str, Any], *, model: nn.Module, optimizer, scheduler,
                           generators: Sequence[torch.Generator]) -> None:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"][rank()], generators)


# --------------------------------------------------------------------------- first-stage loop

def fit(
    *,
    stage: str,
    model: nn.Module,
    step: StepFn,
    loaders: Mapping[str, Any],
    args: argparse.Namespace,
    device: torch.device,
    checkpoint: Path,
    producer: str,
    label_names: Sequence[str],
    report: SubstitutionReport | None = None,
    grad_clip: float = 10.0,
    amp_dtype: torch.dtype = torch.bfloat16,
) -> dict:
    """Train ``model`` (its trainable parameters) with dev selection, or evaluate its saved checkpoint.

    ``args`` holds the training flags of `training_parser`. With ``args.train``
    False the checkpoint (written by ``producer``) is loaded and scored on the
    ``test`` loader only. Otherwise: AdamW at ``args.learning_rate``, grad-norm
    clip 10, the reference's warmup schedule (docs/METHOD.md §2), one update per
    ``args.grad_accum`` batches, and after each epoch the dev weighted F1; each new
    best saves ``checkpoint`` and reports test. The metrics JSON beside the
    checkpoint is rewritten every epoch, and the training state
    (`state_path`) after it, which ``--resume True`` continues from. Under
    torchrun the model trains in DistributedDataParallel and only rank 0 writes.

    Precision (docs/METHOD.md §3): with ``args.amp`` the forward runs under
    ``amp_dtype`` autocast on CUDA. For ``torch.float16`` (KD) a gradient scaler
    scales the loss (on CPU too, where the forward stays fp32); the gradients are
    unscaled before clipping, or clipped while still scaled with
    ``args.reference_kd_clip`` (the authors' order: the update then sees
    gradients of norm at most ``grad_clip / scale``).
    """
    if not args.train:
        load_checkpoint(model, checkpoint, producer, label_names)
        model.to(device).eval()
        return evaluate(stage=stage, step=step, loader=loaders["test"], device=device, amp=args.amp,
                        label_names=label_names, report=report, amp_dtype=amp_dtype)
    if args.grad_accum < 1:
        raise UserError(f"--grad_accum must be at least 1, got {args.grad_accum}")
    with output_lock(checkpoint.parent, checkpoint.stem) if is_main() else contextlib.nullcontext():
        return _train(stage=stage, model=model, step=step, loaders=loaders, args=args, device=device,
                      checkpoint=checkpoint, label_names=label_names, report=report, grad_clip=grad_clip,
                      amp_dtype=amp_dtype)


def _train(*, stage: str, model: nn.Module, step: StepFn, loaders: Mapping[str, Any], args: argparse.Namespace,
           device: torch.device, checkpoint: Path, label_names: Sequence[str], report: SubstitutionReport | None,
           grad_clip: float, amp_dtype: torch.dtype) -> dict:
    """`fit`'s training, holding the checkpoint's lock. The metrics JSON is the set's completion record:
    it says ``complete: false`` before the first write of the checkpoint and true only after the last epoch."""
    metrics_path = checkpoint.with_suffix(".json")
    facts = {"dataset": stage.split()[0], "labels": list(label_names),
             "width": int(getattr(getattr(model, "classifier", None), "in_features", 0)) or None}
    if is_main():
        remove_stale_temps(checkpoint.parent, (checkpoint.name, metrics_path.name, state_path(checkpoint).name,
                                               substitution_report_path(checkpoint, True).name,
                                               *(plot_path(checkpoint, kind).name for kind in PLOT_KINDS)))
        begin_outputs(metrics_path, stage, args, checkpoint=checkpoint.name, **facts)
    model.to(device)
    if args.grad_checkpointing:
        log.info("%s: gradient checkpointing in %s", stage, ", ".join(enable_grad_checkpointing(model)))
    epochs, amp = args.epochs, args.amp
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate)
    scaler = torch.amp.GradScaler(device.type, enabled=bool(amp and amp_dtype == torch.float16))
    clip_scaled = bool(getattr(args, "reference_kd_clip", False))
    train_loader = loaders["train"]
    updates_per_epoch = math.ceil(len(train_loader) / args.grad_accum)
    scheduler = reference_schedule(
        optimizer, len(train_loader.dataset), updates_per_epoch, epochs, per_batch=args.per_batch_schedule
    )
    runner = wrap_for_training(model, step, device)
    generators = [loader.generator for loader in loaders.values() if loader.generator is not None]
    saved_state = state_path(checkpoint)
    history: list[dict] = []
    best = {"epoch": 0, "dev_weighted_f1": -math.inf, "test": None}
    first = 1
    state = load_training_state(saved_state, stage=stage, args=args)
    if state is not None:
        restore_training_state(state, model=model, optimizer=optimizer, scheduler=scheduler, generators=generators)
        history, best, first = state["progress"]["history"], state["progress"]["best"], state["epoch"] + 1
        log.info("%s: resuming from epoch %d of %d (%s)", stage, state["epoch"], epochs, saved_state)

    def loss_of(batch: dict) -> torch.Tensor:
        note_problems(batch, train_loader.dataset, report)
        batch = to_device(batch, device)
        with autocast(device, amp, amp_dtype):
            loss, _ = runner(batch, True)
        return loss

    for epoch in range(first, epochs + 1):
        if isinstance(train_loader.sampler, torch.utils.data.DistributedSampler):
            train_loader.sampler.set_epoch(epoch)  # a new shuffle of the shards every epoch
        model.train()
        started, losses = time.time(), []
        bar = progress(groups(train_loader, args.grad_accum), total=updates_per_epoch,
                       desc=f"{stage} epoch {epoch}/{epochs}")
        for group in bar:
            losses.append(float(update(runner, group, loss_of, optimizer, scheduler, params, grad_clip,
                                       scaler, clip_scaled)))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        model.eval()
        dev = summary(*predict(step, loaders["dev"], device, amp, report, "dev", amp_dtype))
        row: dict[str, Any] = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else 0.0,
                               "dev": dev, "seconds": round(time.time() - started, 2)}
        improved = dev["weighted_f1"] > best["dev_weighted_f1"]
        if improved:
            if is_main():
                save_state_dict(checkpoint, model)
            test = test_report(*predict(step, loaders["test"], device, amp, report, "test", amp_dtype), label_names)
            row["test"] = {k: test[k] for k in ("accuracy", "weighted_f1")}
            best = {"epoch": epoch, "dev_weighted_f1": dev["weighted_f1"], "test": test}
        history.append(row)
        log.info(
            "%s epoch %d/%d: train loss %.4f | dev acc %.4f wF1 %.4f%s", stage, epoch, epochs,
            row["train_loss"], dev["accuracy"], dev["weighted_f1"],
            (f" | new best, saved; test acc {row['test']['accuracy']:.4f} wF1 {row['test']['weighted_f1']:.4f}"
             if improved else ""),
        )
        if is_main():
            write_json(metrics_path, _metrics_doc(stage, vars(args), history, best, checkpoint, facts, False))
        save_training_state(saved_state, stage=stage, epoch=epoch, model=model, optimizer=optimizer,
                            scheduler=scheduler, generators=generators, args=args, history=history, best=best)
    if best["test"] is not None:
        log.info("%s: selected epoch %d (dev wF1 %.4f); test report:\n%s", stage, best["epoch"],
                 best["dev_weighted_f1"], _report_text(best["test"], label_names))
        if is_main():
            write_plots(checkpoint.with_suffix(""), f"{stage}, seed {args.seed}", [r["epoch"] for r in history],
                        [r["train_loss"] for r in history], [r["dev"]["weighted_f1"] for r in history],
                        [r["test"]["weighted_f1"] if "test" in r else None for r in history], best["epoch"],
                        best["test"]["confusion"], label_names, "test (scored at each new best dev)")
    doc = _metrics_doc(stage, vars(args), history, best, checkpoint, facts, True)
    if is_main():
        write_json(metrics_path, doc)  # last: publishes checkpoint + JSON as one complete set
    return doc


def _metrics_doc(stage: str, args: Mapping[str, Any], history: list[dict], best: dict, checkpoint: Path,
                 facts: Mapping[str, Any], complete: bool) -> dict:
    return {
        "stage": stage,
        "complete": complete,
        **facts,
        "checkpoint": checkpoint.name,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in args.items()},
        "selection": "best dev weighted F1",
        "selected_epoch": best["epoch"],
        "dev_weighted_f1": best["dev_weighted_f1"] if best["epoch"] else None,
        "test": best["test"],
        "epochs": history,
    }


def _report_text(test: Mapping[str, Any], names: Sequence[str]) -> str:
    lines = [f"accuracy {test['accuracy']:.4f}  weighted F1 {test['weighted_f1']:.4f}"]
    per = test["per_class"]
    lines.append(f"{'class':>10} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}")
    for name in names:
        c = per[name]
        lines.append(f"{name:>10} {c['precision']:9.4f} {c['recall']:9.4f} {c['f1-score']:9.4f} {int(c['support']):8d}")
    return "\n".join(lines)


def evaluate(*, stage: str, step: StepFn, loader, device: torch.device, amp: bool,
             label_names: Sequence[str], report: SubstitutionReport | None = None,
             amp_dtype: torch.dtype = torch.bfloat16) -> dict:
    """``--train False``: test metrics of the loaded checkpoint."""
    test = test_report(*predict(step, loader, device, amp, report, "test", amp_dtype), label_names)
    log.info("%s: test report of the saved checkpoint:\n%s", stage, _report_text(test, label_names))
    return test


# --------------------------------------------------------------------------- fusion training loop

FUSION_CHECKPOINT = "multimodal_fusion_best.bin"
FUSION_PREDICTIONS = "multimodal_fusion_best.json"
FUSION_METRICS = "multimodal_fusion_metrics.json"
FUSION_STATE = "multimodal_fusion.state.pt"


def fusion_files(save_dir: Path, tag: str = "") -> dict[str, Path]:
    """The fusion's artifacts; ``tag`` (`seed_tag`) names one seed's among several
    (``multimodal_fusion_best_seed<S>.bin``, ...)."""
    return {"checkpoint": save_dir / FUSION_CHECKPOINT.replace(".bin", f"{tag}.bin"),
            "predictions": save_dir / FUSION_PREDICTIONS.replace(".json", f"{tag}.json"),
            "metrics": save_dir / FUSION_METRICS.replace(".json", f"{tag}.json"),
            **{kind: save_dir / f"multimodal_fusion{tag}_{kind}.png" for kind in PLOT_KINDS}}


def recorded_fusion_args(save_dir: str | Path) -> dict[str, Any]:
    """The arguments ``multimodal_fusion.py`` recorded in ``multimodal_fusion_metrics.json`` in ``save_dir``
    (``{}`` when there is no such file): the settings a checkpoint does not show, such as ``n_head``."""
    path = Path(save_dir) / FUSION_METRICS
    if not path.is_file():
        return {}
    try:
        recorded = json.loads(path.read_text(encoding="utf-8")).get("args")
    except (ValueError, AttributeError) as err:
        log.warning("%s is not a metrics file (%s); using the default fusion settings", path, err)
        return {}
    return recorded if isinstance(recorded, dict) else {}


# objective(model output, labels), both as rows of the real utterances (N, ...) -> scalar loss
FusionObjective = Callable[[Any, torch.Tensor], torch.Tensor]


@torch.no_grad()
def dialogue_logits(model: nn.Module, data: Any, batch_size: int, progress: bool = False,
                    packed: bool | None = None) -> torch.Tensor:
    """(N, classes) text-anchor logits ``t_logits`` of every real utterance of a
    :class:`~magtkd.dataset.DialogueSet`, flattened in the pickle's dialogue order (model in eval mode).

    Their argmax is the prediction; their softmax the class probabilities. ``packed``
    False computes on the padded grid, as the authors' code did (same values); ``None``
    packs the batches where it pays (:meth:`~magtkd.dataset.DialogueSet.collate`).
    """
    model.eval()
    chunks: list[torch.Tensor] = []
    batches = data.batches(batch_size)
    if progress:
        batches = tqdm(batches, total=math.ceil(len(data) / batch_size), desc="dialogues", leave=False, disable=None)
    for idx in batches:
        batch = data.collate(idx, model.padding_speaker, packed)
        chunks.append(batch.rows(model(*batch.inputs).t_logits).float())
    return torch.cat(chunks) if chunks else torch.zeros(0, model.n_classes)


def predict_dialogues(model: nn.Module, data: Any, batch_size: int, packed: bool | None = None) -> list[int]:
    """Predictions (argmax of :func:`dialogue_logits`) for every real utterance, in the pickle's order."""
    return dialogue_logits(model, data, batch_size, packed=packed).argmax(-1).tolist()


def fusion_train_epoch(model: nn.Module, data: Any, objective: FusionObjective,
                       optimizer: torch.optim.Optimizer, scheduler, batch_size: int,
                       generator: torch.Generator, epoch: int, grad_clip: float = 10.0, grad_accum: int = 1,
                       packed: bool | None = None) -> float:
    """One pass over shuffled training dialogues, one update per ``grad_accum`` batches; returns the
    mean update loss.

    Batches are packed where it pays (docs/METHOD.md §5, "Speed"; ``packed`` True/False forces it,
    False is the authors' padded grid: same results) and the loss stays on the device until the epoch ends: no host round trip per step.
    """
    model.train()
    total, count = torch.zeros((), dtype=torch.float64), 0
    n_updates = math.ceil(math.ceil(len(data) / batch_size) / grad_accum)
    batches = (data.collate(idx, model.padding_speaker, packed) for idx in data.batches(batch_size, generator))

    def loss_of(batch: Any) -> torch.Tensor:
        out = model(*batch.inputs)
        return objective(type(out)(*map(batch.rows, out)), batch.rows(batch.labels))

    bar = progress(groups(batches, grad_accum), total=n_updates, desc=f"fusion epoch {epoch}")
    params = list(model.parameters())
    for group in bar:
        loss = update(model, group, loss_of, optimizer, scheduler, params, grad_clip)
        total, count = total.to(loss.device) + loss, count + 1
        if count % 10 == 0 or count == n_updates:  # the running loss costs a host round trip: show it now and then
            bar.set_postfix(loss=f"{float(total) / count:.4f}")
    return float(total) / max(count, 1)


def fusion_summary(stage: str, args: argparse.Namespace, sizes: dict, curve: list[dict], best: dict,
                   test_labels: list[int], names: list[str], complete: bool) -> dict[str, Any]:
    """Content of ``multimodal_fusion_metrics.json``: dev drives selection; test is reported at it."""
    return {
        "stage": stage, "complete": complete, "dataset": stage.split()[0], "labels": list(names),
        "width": sizes.get("hidden"), "args": vars(args), "sizes": sizes,
        "selection": "best dev weighted F1", "selected_epoch": best["epoch"],
        "dev_at_selected": best["dev"], "test_at_selected": best["test"],
        "test_per_class": per_class(test_labels, best["preds"], names),
        "test_confusion": {"labels": names, "matrix": confusion(test_labels, best["preds"], len(names))},
        "curve": curve,
    }


def fit_fusion(*, stage: str, model: nn.Module, objective: FusionObjective, data: Mapping[str, Any],
               args: argparse.Namespace, sizes: dict, label_names: Sequence[str], save_dir: Path,
               tag: str = "") -> dict[str, Any]:
    """Train the fusion model and keep the epoch with the best DEV weighted F1 (docs/METHOD.md §5).

    AdamW (``args.lr``, weight decay ``args.l2``), grad clip 10, the reference
    schedule counted in dialogues (``args.per_batch_schedule`` counts batches),
    the training dialogues shuffled by a generator seeded with ``args.seed``, one
    update per ``args.grad_accum`` batches. Writes ``multimodal_fusion_best.bin``
    and ``.json`` (test labels and predictions) at each new best,
    ``multimodal_fusion_metrics.json`` after every epoch and then the training
    state ``multimodal_fusion<tag>.state.pt``, which ``args.resume`` continues from. The curves /
    confusion plots are drawn at the end (``tag``,
    e.g. ``_seed2025``, goes into every name: `fusion_files`).
    """
    if args.epochs < 1 or args.batch_size < 1 or args.grad_accum < 1:
        raise UserError(f"--epochs ({args.epochs}), --batch_size ({args.batch_size}) and --grad_accum "
                        f"({args.grad_accum}) must be at least 1")
    if world_size() > 1:
        raise UserError("the fusion stage trains in one process (it takes minutes): run it with python, not torchrun")
    with output_lock(save_dir, f"multimodal_fusion{tag}"):
        files = fusion_files(save_dir, tag)
        # Every file of the set, the training state (the largest write, so the likeliest to be killed) included.
        remove_stale_temps(save_dir, [*(Path(f).name for f in files.values()),
                                      FUSION_STATE.replace(".state.pt", f"{tag}.state.pt")])
        # The metrics JSON is the set's completion record: incomplete before the .bin/.json change.
        begin_outputs(files["metrics"], stage, args, dataset=stage.split()[0], labels=list(label_names),
                      width=sizes.get("hidden"))
        return _train_fusion(stage=stage, model=model, objective=objective, data=data, args=args, sizes=sizes,
                             label_names=label_names, save_dir=save_dir, tag=tag)


def _train_fusion(*, stage: str, model: nn.Module, objective: FusionObjective, data: Mapping[str, Any],
                  args: argparse.Namespace, sizes: dict, label_names: Sequence[str], save_dir: Path,
                  tag: str) -> dict[str, Any]:
    names = list(label_names)
    files = fusion_files(save_dir, tag)
    # The fused AdamW kernel: the same update in one pass over each tensor (several times faster on CPU
    # than the per-tensor loop for the model's ~35M weights at width 768; docs/METHOD.md §5, "Speed").
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.l2,
                                  fused=next(model.parameters()).device.type in ("cpu", "cuda"))
    n_updates = math.ceil(math.ceil(len(data["train"]) / args.batch_size) / args.grad_accum)
    scheduler = reference_schedule(optimizer, len(data["train"]), n_updates, args.epochs, args.per_batch_schedule)
    generator = torch.Generator().manual_seed(args.seed)
    labels = {split: data[split].flat_labels() for split in ("dev", "test")}
    curve: list[dict[str, Any]] = []
    best: dict[str, Any] = {}
    # One state file per seed (``tag``), so --resume never continues another seed's run.
    saved_state, first = save_dir / FUSION_STATE.replace(".state.pt", f"{tag}.state.pt"), 1
    state = load_training_state(saved_state, stage=stage, args=args)
    if state is not None:
        restore_training_state(state, model=model, optimizer=optimizer, scheduler=scheduler, generators=[generator])
        curve, best, first = state["progress"]["curve"], state["progress"]["best"], state["epoch"] + 1
        log.info("%s: resuming from epoch %d of %d (%s)", stage, state["epoch"], args.epochs, saved_state)
    # A resumed run that had already finished trains no epoch: its summary comes from the saved state.
    doc = fusion_summary(stage, args, sizes, curve, best, labels["test"], names, complete=True) if best else {}
    for epoch in range(first, args.epochs + 1):
        start = time.perf_counter()
        train_loss = fusion_train_epoch(model, data["train"], objective, optimizer, scheduler, args.batch_size,
                                        generator, epoch, grad_accum=args.grad_accum, packed=args.packed)
        train_seconds = time.perf_counter() - start
        preds = {split: predict_dialogues(model, data[split], args.batch_size, args.packed) for split in ("dev", "test")}
        scores = {split: summary(labels[split], preds[split]) for split in ("dev", "test")}
        curve.append({"epoch": epoch, "train_loss": train_loss, "dev": scores["dev"],
                      "test_not_used_for_selection": scores["test"],
                      "train_seconds": round(train_seconds, 3),
                      "eval_seconds": round(time.perf_counter() - start - train_seconds, 3)})
        improved = not best or scores["dev"]["weighted_f1"] > best["dev"]["weighted_f1"]
        log.info("%s epoch %d/%d: train loss %.4f | dev acc %.4f wF1 %.4f | test acc %.4f wF1 %.4f%s",
                 stage, epoch, args.epochs, train_loss, scores["dev"]["accuracy"], scores["dev"]["weighted_f1"],
                 scores["test"]["accuracy"], scores["test"]["weighted_f1"], " | best dev so far, saved" if improved else "")
        if improved:
            # Selection on DEV weighted F1; the reference selected on test (leakage, docs/METHOD.md §7).
            best = {"epoch": epoch, "dev": scores["dev"], "test": scores["test"], "preds": preds["test"]}
            save_state_dict(files["checkpoint"], model)
            write_json(files["predictions"], {"labels": labels["test"], "preds": preds["test"]})
        # Rewritten every epoch, so an interrupted run still documents what it selected.
        doc = fusion_summary(stage, args, sizes, curve, best, labels["test"], names, complete=epoch == args.epochs)
        write_json(files["metrics"], doc)
        save_training_state(saved_state, stage=stage, epoch=epoch, model=model, optimizer=optimizer,
                            scheduler=scheduler, generators=[generator], args=args, curve=curve, best=best)

    if first > args.epochs:  # nothing left to train: publish the finished run's summary again (complete)
        write_json(files["metrics"], doc)
    matrix = doc["test_confusion"]["matrix"]
    log.info("%s: selected epoch %d (best dev weighted F1 %.4f); test accuracy %.4f, weighted F1 %.4f\n%s\n"
             "confusion matrix (rows = gold %s):\n%s", stage, best["epoch"], best["dev"]["weighted_f1"],
             best["test"]["accuracy"], best["test"]["weighted_f1"], report_text(labels["test"], best["preds"], names),
             names, "\n".join(" ".join(f"{c:5d}" for c in row) for row in matrix))
    write_plots(save_dir / f"multimodal_fusion{tag}", f"{stage}, seed {args.seed}", [c["epoch"] for c in curve],
                [c["train_loss"] for c in curve], [c["dev"]["weighted_f1"] for c in curve],
                [c["test_not_used_for_selection"]["weighted_f1"] for c in curve], best["epoch"], matrix, names,
                "test (not used for selection)")
    return {**doc, "labels": labels["test"], "preds": best["preds"],
            "paths": {k: str(files[k]) for k in ("checkpoint", "predictions", "metrics")}}


# --------------------------------------------------------------------------- several seeds: one summary

SEED_SUMMARY_NOTE = ("Per seed, the epoch with the best dev weighted F1 is selected and test is scored at it. "
                     "Mean ± sample standard deviation (n - 1) over seeds.")
TEST_SELECTED_NOTE = ("test-selected weighted F1 = the best test weighted F1 over all epochs: the authors' "
                      "protocol (the epoch chosen on test), shown only to compare with papers like for like.")


def seed_list(args: argparse.Namespace) -> list[int]:
    """The seeds to train: ``--seeds``, or the single ``--seed``."""
    seeds = list(args.seeds) if getattr(args, "seeds", None) else [args.seed]
    duplicates = sorted({s for s in seeds if seeds.count(s) > 1})
    if duplicates:
        raise SystemExit(f"--seeds lists {duplicates} more than once")
    if len(seeds) > 1 and not getattr(args, "train", True):
        raise SystemExit("--seeds with several seeds trains one model per seed; --train False evaluates the "
                         "single saved checkpoint (give no --seeds)")
    return seeds


def seed_tag(seed: int, seeds: Sequence[int]) -> str:
    """``_seed<S>`` for the files of one seed among several; '' for a single seed (the usual names)."""
    return f"_seed{seed}" if len(seeds) > 1 else ""


def seed_args(args: argparse.Namespace, seed: int) -> argparse.Namespace:
    """``args`` with ``--seed`` set to this run's seed (it is recorded in the metrics JSON)."""
    return argparse.Namespace(**{**vars(args), "seed": seed})


def seeds_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``{"seeds": rows, "mean": ..., "std": ...}``: mean and sample standard deviation (n - 1; 0 for one
    seed) over the rows of every numeric key but ``seed`` itself; nested dicts (per-class F1) key by key."""

    def stats(values: list[Any]) -> tuple[Any, Any]:
        if isinstance(values[0], Mapping):
            pairs = {k: stats([v[k] for v in values]) for k in values[0]}
            return {k: m for k, (m, _) in pairs.items()}, {k: s for k, (_, s) in pairs.items()}
        array = np.asarray(values, dtype=np.float64)
        return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0

    mean: dict[str, Any] = {}
    std: dict[str, Any] = {}
    for key, value in rows[0].items():
        if key == "seed" or isinstance(value, bool) or not isinstance(value, (int, float, Mapping)):
            continue
        mean[key], std[key] = stats([row[key] for row in rows])
    return {"seeds": [dict(row) for row in rows], "mean": mean, "std": std}


def seeds_markdown(title: str, summary_doc: Mapping[str, Any], label_names: Sequence[str],
                   selected_seed: int | None = None, kept_as: str | None = None) -> str:
    """The seeds summary as a markdown table: one row per seed, then mean ± std."""
    rows, mean, std = summary_doc["seeds"], summary_doc["mean"], summary_doc["std"]
    keys = ["selected_epoch", "dev_weighted_f1", "test_accuracy", "test_weighted_f1"]
    head = ["seed", "selected epoch (dev)", "dev wF1", "test accuracy", "test wF1"]
    if "test_selected_weighted_f1" in rows[0]:
        keys.append("test_selected_weighted_f1")
        head.append("test-selected wF1 (authors' protocol, comparison only)")
    head += [f"test F1 {name}" for name in label_names]

    def values(doc: Mapping[str, Any]) -> list[float]:
        return [doc[k] for k in keys] + [doc["test_per_class_f1"][name] for name in label_names]

    lines = [f"# {title}: {len(rows)} seeds", "", SEED_SUMMARY_NOTE]
    if "test_selected_weighted_f1" in keys:
        lines.append(TEST_SELECTED_NOTE)
    if selected_seed is not None and kept_as:
        lines.append(f"The seed with the best dev weighted F1 ({selected_seed}) is also saved as `{kept_as}`.")
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        epoch, *scores = values(row)
        lines.append(f"| {row['seed']} | {epoch} | " + " | ".join(f"{v:.4f}" for v in scores) + " |")
    (epoch_mean, *means), (epoch_std, *stds) = values(mean), values(std)
    lines.append(f"| **mean ± std** | {epoch_mean:.1f} ± {epoch_std:.1f} | "
                 + " | ".join(f"{m:.4f} ± {s:.4f}" for m, s in zip(means, stds)) + " |")
    return "\n".join(lines) + "\n"


def copy_file(src: Path, dst: Path) -> None:
    """Copy ``src`` onto ``dst`` atomically (streamed: checkpoints can be gigabytes)."""
    import shutil

    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def keep_best_seed(title: str, rows: Sequence[Mapping[str, Any]], label_names: Sequence[str],
                   summary_stem: Path, copies: Mapping[int, Sequence[tuple[Path, Path]]]) -> dict[str, Any]:
    """Write ``<summary_stem>_seeds.json`` / ``.md`` and copy the best-dev seed's files to the usual names.

    ``copies[seed]`` lists (seed file, usual file) pairs; the last pair should be the checkpoint, so a
    pipeline that checks the checkpoint's time sees it only once the rest is in place. A file of the
    seed that is missing (a plot that could not be drawn) is logged and skipped. The best seed is the
    first with the highest dev weighted F1.
    """
    doc = seeds_summary(rows)
    best = max(rows, key=lambda r: r["dev_weighted_f1"])  # max keeps the first of equal scores
    summary_names = [f"{summary_stem.name}_seeds.json", f"{summary_stem.name}_seeds.md"]
    remove_stale_temps(summary_stem.parent, summary_names + sorted({dst.name for pairs in copies.values()
                                                                    for _, dst in pairs}))
    for src, dst in copies[best["seed"]]:
        if src.is_file():
            copy_file(src, dst)
        else:
            log.warning("%s: %s was not written, so %s is not updated", title, src, dst)
    kept_as = copies[best["seed"]][-1][1].name if copies[best["seed"]] else None
    write_json(summary_stem.with_name(summary_names[0]), doc)
    write_text(summary_stem.with_name(summary_names[1]), seeds_markdown(title, doc, label_names, best["seed"], kept_as))
    mean, std = doc["mean"], doc["std"]
    log.info("%s: %d seeds, best dev seed %d; test accuracy %.4f ± %.4f, weighted F1 %.4f ± %.4f%s", title, len(rows),
             best["seed"], mean["test_accuracy"], std["test_accuracy"], mean["test_weighted_f1"],
             std["test_weighted_f1"],
             (f" (test-selected, authors' protocol: {mean['test_selected_weighted_f1']:.4f} ± "
              f"{std['test_selected_weighted_f1']:.4f})" if "test_selected_weighted_f1" in mean else ""))
    return {**doc, "best_seed": best["seed"]}


def finish_seeds(results: Mapping[int, dict], checkpoint: Path, label_names: Sequence[str]) -> dict:
    """After one `fit` per seed (checkpoints ``<name>_seed<S>.bin``): the seeds summary beside
    ``checkpoint`` and the best-dev seed's checkpoint, metrics JSON and plots under the usual names.

    With a single seed nothing is added: its result is returned as it is.
    """
    seeds = list(results)
    if len(seeds) == 1:
        return results[seeds[0]]
    rows, copies = [], {}
    for seed, result in results.items():
        if result.get("test") is None:
            raise SystemExit(f"{result['stage']} seed {seed}: no epoch was selected "
                             f"(--epochs {result['args']['epochs']})")
        test = result["test"]
        rows.append({"seed": seed, "selected_epoch": result["selected_epoch"],
                     "dev_weighted_f1": result["dev_weighted_f1"], "test_accuracy": test["accuracy"],
                     "test_weighted_f1": test["weighted_f1"],
                     "test_per_class_f1": {n: test["per_class"][n]["f1-score"] for n in label_names}})
        own = checkpoint.with_name(f"{checkpoint.stem}{seed_tag(seed, seeds)}.bin")
        copies[seed] = [(plot_path(own, kind), plot_path(checkpoint, kind)) for kind in PLOT_KINDS]
        copies[seed] += [(own.with_suffix(".json"), checkpoint.with_suffix(".json")), (own, checkpoint)]
    stage = next(iter(results.values()))["stage"]
    summary_doc = keep_best_seed(stage, rows, label_names, checkpoint.with_suffix(""), copies)
    return {**results[summary_doc["best_seed"]], "seeds": summary_doc}


def finish_fusion_seeds(results: Mapping[int, dict], save_dir: Path, label_names: Sequence[str]) -> dict:
    """`finish_seeds` for the fusion: rows also carry ``test_selected_weighted_f1`` (the best test weighted
    F1 over epochs, the authors' selection), and the best-dev seed's checkpoint, predictions, metrics and
    plots are copied to ``multimodal_fusion_best.{bin,json}``, ``multimodal_fusion_metrics.json``, ...."""
    seeds = list(results)
    if len(seeds) == 1:
        return results[seeds[0]]
    rows, copies = [], {}
    usual = fusion_files(save_dir, "")
    for seed, result in results.items():
        test = result["test_at_selected"]
        rows.append({"seed": seed, "selected_epoch": result["selected_epoch"],
                     "dev_weighted_f1": result["dev_at_selected"]["weighted_f1"], "test_accuracy": test["accuracy"],
                     "test_weighted_f1": test["weighted_f1"],
                     "test_per_class_f1": {n: result["test_per_class"][n]["f1-score"] for n in label_names},
                     "test_selected_weighted_f1": max(c["test_not_used_for_selection"]["weighted_f1"]
                                                      for c in result["curve"])})
        own = fusion_files(save_dir, seed_tag(seed, seeds))
        copies[seed] = [(own[key], usual[key]) for key in
                        ("curves", "confusion", "metrics", "predictions", "checkpoint")]
    stage = next(iter(results.values()))["stage"]
    summary_doc = keep_best_seed(stage, rows, label_names, save_dir / "multimodal_fusion", copies)
    best = results[summary_doc["best_seed"]]
    return {**best, "seeds": summary_doc, "paths": {**best["paths"], **{k: str(v) for k, v in usual.items()}}}


# --------------------------------------------------------------------------- plots

PLOT_KINDS = ("curves", "confusion")


def plot_path(checkpoint: Path, kind: str) -> Path:
    """``<name>_curves.png`` / ``<name>_confusion.png`` beside ``<name>.bin`` and its metrics JSON."""
    return checkpoint.with_name(f"{checkpoint.stem}_{kind}.png")


def write_plots(stem: Path, title: str, epochs: Sequence[int], train_loss: Sequence[float],
                dev_f1: Sequence[float], test_f1: Sequence[float | None], selected_epoch: int,
                matrix: Sequence[Sequence[int]], label_names: Sequence[str], test_label: str) -> None:
    """``<stem>_curves.png`` (train loss; dev and test weighted F1 per epoch; the selected epoch marked) and
    ``<stem>_confusion.png`` (row-normalised test confusion matrix at the selected epoch).

    Drawn with the Agg canvas (no display, no pyplot state). A plot that cannot be drawn is logged and
    skipped: it never fails a training run.
    """
    for kind in PLOT_KINDS:
        path = stem.with_name(f"{stem.name}_{kind}.png")
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure

            # Fixed margins: a layout engine would double the drawing time (a run draws many plots)
            figure = Figure(figsize=(10, 4) if kind == "curves" else (6, 5.4), dpi=100)
            FigureCanvasAgg(figure)
            if kind == "curves":
                _draw_curves(figure, title, epochs, train_loss, dev_f1, test_f1, selected_epoch, test_label)
            else:
                _draw_confusion(figure, title, selected_epoch, matrix, label_names)
            with atomic_path(path) as tmp:
                figure.savefig(tmp, format="png")
        except Exception as err:  # noqa: BLE001 - a plot is a convenience, never a reason to lose a run
            log.warning("could not draw %s: %s: %s", path, type(err).__name__, err)


def _draw_curves(figure: Any, title: str, epochs: Sequence[int], train_loss: Sequence[float],
                 dev_f1: Sequence[float], test_f1: Sequence[float | None], selected_epoch: int,
                 test_label: str) -> None:
    from matplotlib.ticker import MaxNLocator

    loss_ax, f1_ax = figure.subplots(1, 2)
    loss_ax.plot(epochs, train_loss, marker="o", markersize=3, color="tab:gray")
    loss_ax.set(title="train loss", xlabel="epoch", ylabel="mean batch loss")
    f1_ax.plot(epochs, dev_f1, marker="o", markersize=3, label="dev (selects the epoch)", color="tab:blue")
    measured = [(e, f) for e, f in zip(epochs, test_f1) if f is not None]
    if measured:
        f1_ax.plot(*zip(*measured), marker="s", markersize=4, label=test_label, color="tab:orange",
                   linestyle="-" if len(measured) == len(epochs) else "none")
    f1_ax.set(title="weighted F1", xlabel="epoch", ylabel="weighted F1")
    for ax in (loss_ax, f1_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.axvline(selected_epoch, color="tab:green", linestyle="--", label=f"selected epoch {selected_epoch}")
        ax.grid(alpha=0.3)
    f1_ax.legend(loc="best", fontsize="small")
    figure.suptitle(title)
    figure.subplots_adjust(left=0.07, right=0.98, bottom=0.12, top=0.85, wspace=0.22)


def _draw_confusion(figure: Any, title: str, selected_epoch: int, matrix: Sequence[Sequence[int]],
                    label_names: Sequence[str]) -> None:
    counts = np.asarray(matrix, dtype=np.float64)
    support = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, support, out=np.zeros_like(counts), where=support > 0)
    ax = figure.subplots()
    image = ax.imshow(rates, vmin=0.0, vmax=1.0, cmap="Blues")
    figure.colorbar(image, ax=ax, label="fraction of the gold class")
    ticks = range(len(label_names))
    ax.set_xticks(ticks, labels=list(label_names), rotation=45, ha="right")
    ax.set_yticks(ticks, labels=list(label_names))
    ax.set(xlabel="predicted", ylabel="gold", title=f"{title}\ntest, epoch {selected_epoch} (row-normalised)")
    for i in range(rates.shape[0]):
        for j in range(rates.shape[1]):
            ax.text(j, i, f"{rates[i, j]:.2f}", ha="center", va="center", fontsize="small",
                    color="white" if rates[i, j] > 0.6 else "black")
    figure.subplots_adjust(left=0.14, right=0.97, bottom=0.16, top=0.88)
