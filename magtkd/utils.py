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
    parser.add_argument("--num_workers", type=int, default=0, help="data-loading worker processes")
    return parser


def training_parser(
    spec: DatasetSpec, script_dir: str | Path, description: str | None, *, epochs: int, batch_size: int,
    learning_rate: float, seed: int = 2024,
) -> argparse.ArgumentParser:
    """The flags of every first-stage training script (text, audio, video, KD), with the given defaults.

    The reference's names (``--epochs --batch_size --seed --learning_rate --train``)
    plus ours; the script passes its dataset's defaults (docs/METHOD.md §2).
    """
    parser = paths_parser(spec, script_dir, description)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--batch_size", type=int, default=batch_size)
    parser.add_argument("--seed", type=int, default=seed)
    parser.add_argument("--train", type=str2bool, default=True,
                        help="True: train; False: evaluate the saved checkpoint on test")
    parser.add_argument("--learning_rate", type=float, default=learning_rate)
    parser.add_argument("--per_batch_schedule", type=str2bool, default=False,
                        help="count warmup/total steps in batches instead of the reference's samples")
    parser.add_argument("--amp", type=str2bool, default=True, help="bf16 autocast on CUDA (CPU runs fp32)")
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


def resolve_device(name: str | None) -> torch.device:
    """The device of this process; under ``torchrun`` also joins the process group (`init_distributed`)."""
    if name is None or name == "":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name} requested but CUDA is not available on this machine")
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


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


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
                log.warning("unreadable media %s (%s): using %s", path, reason, replacement)

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

class CheckpointError(RuntimeError):
    """A checkpoint that is missing or does not fit the model it is loaded into."""


def read_state_dict(path: str | Path, produced_by: str) -> dict[str, torch.Tensor]:
    """``torch.load`` (tensors only) a plain state_dict; a missing file names the stage that writes it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found: it is written by {produced_by}")
    state = torch.load(path, map_location="cpu", weights_only=True)
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


def load_checkpoint(model: nn.Module, path: Path, produced_by: str) -> nn.Module:
    """Load a plain state_dict strictly; errors name the file and the mismatched keys."""
    state = read_state_dict(path, produced_by)
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


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA (when enabled); plain fp32 on CPU."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
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
                report.add(f"{utt.split}/{utt.key}", problem[0], problem[1], replacement)


@torch.inference_mode()
def predict(step: StepFn, loader, device: torch.device, amp: bool,
            report: SubstitutionReport | None = None, desc: str = "eval") -> tuple[np.ndarray, np.ndarray]:
    """Gold labels and argmax predictions over a loader, in dataset (CSV) order.

    Under torchrun each rank scores its shard (`magtkd.dataset.make_loader`) and the
    ranks' outputs are gathered and put back in order by sample index, each sample once.
    """
    index, labels, preds = [], [], []
    for batch in progress(loader, desc=desc):
        note_problems(batch, loader.dataset, report)
        index.append(batch["index"])
        batch = to_device(batch, device)
        with autocast(device, amp):
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
           grad_clip: float) -> float:
    """One optimizer update over the micro-batches of ``group`` (``--grad_accum``); returns its loss.

    ``loss_of(batch)`` is the mean loss over the batch's items. Each micro-batch's
    loss is weighted by its share of the group's items (`_count`), so the
    accumulated gradient is that of the mean loss over the whole group: the same
    update as one batch holding all of them, for losses that are means over items
    (cross-entropy). Loss terms that relate the items of a batch to each other (the
    KD correlation/relation terms, docs/METHOD.md §3) are computed per micro-batch.
    Under DDP the gradients are all-reduced once, at the last micro-batch.
    """
    optimizer.zero_grad(set_to_none=True)
    counts = [_count(batch) for batch in group]
    total = sum(counts)
    value = 0.0
    for i, (batch, count) in enumerate(zip(group, counts)):
        last = i == len(group) - 1
        with contextlib.nullcontext() if last or not hasattr(runner, "no_sync") else runner.no_sync():
            loss = loss_of(batch)
            # A single batch backpropagates its loss as is: the plain update, bit for bit.
            (loss if len(group) == 1 else loss * (count / total)).backward()
        value += loss.item() * (count / total)
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    scheduler.step()
    return value


def _count(batch: Any) -> float:
    """Items of a batch the loss averages over: real utterances of a fusion batch, else samples."""
    mask = getattr(batch, "mask", None)
    if mask is not None:
        return float(mask.sum())
    return float(len(batch["labels"]))


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
    """
    if not args.train:
        load_checkpoint(model, checkpoint, producer)
        model.to(device).eval()
        return evaluate(stage=stage, step=step, loader=loaders["test"], device=device, amp=args.amp,
                        label_names=label_names, report=report)
    if args.grad_accum < 1:
        raise SystemExit(f"--grad_accum must be at least 1, got {args.grad_accum}")
    model.to(device)
    if args.grad_checkpointing:
        log.info("%s: gradient checkpointing in %s", stage, ", ".join(enable_grad_checkpointing(model)))
    epochs, amp = args.epochs, args.amp
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate)
    train_loader = loaders["train"]
    updates_per_epoch = math.ceil(len(train_loader) / args.grad_accum)
    scheduler = reference_schedule(
        optimizer, len(train_loader.dataset), updates_per_epoch, epochs, per_batch=args.per_batch_schedule
    )
    runner = wrap_for_training(model, step, device)
    generators = [loader.generator for loader in loaders.values() if loader.generator is not None]
    metrics_path, saved_state = checkpoint.with_suffix(".json"), state_path(checkpoint)
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
        with autocast(device, amp):
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
            losses.append(update(runner, group, loss_of, optimizer, scheduler, params, grad_clip))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        model.eval()
        dev = summary(*predict(step, loaders["dev"], device, amp, report, "dev"))
        row: dict[str, Any] = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else 0.0,
                               "dev": dev, "seconds": round(time.time() - started, 2)}
        improved = dev["weighted_f1"] > best["dev_weighted_f1"]
        if improved:
            if is_main():
                save_state_dict(checkpoint, model)
            test = test_report(*predict(step, loaders["test"], device, amp, report, "test"), label_names)
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
            write_json(metrics_path, _metrics_doc(stage, vars(args), history, best, checkpoint))
        save_training_state(saved_state, stage=stage, epoch=epoch, model=model, optimizer=optimizer,
                            scheduler=scheduler, generators=generators, args=args, history=history, best=best)
    if best["test"] is not None:
        log.info("%s: selected epoch %d (dev wF1 %.4f); test report:\n%s", stage, best["epoch"],
                 best["dev_weighted_f1"], _report_text(best["test"], label_names))
    return _metrics_doc(stage, vars(args), history, best, checkpoint)


def _metrics_doc(stage: str, args: Mapping[str, Any], history: list[dict], best: dict, checkpoint: Path) -> dict:
    return {
        "stage": stage,
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
             label_names: Sequence[str], report: SubstitutionReport | None = None) -> dict:
    """``--train False``: test metrics of the loaded checkpoint."""
    test = test_report(*predict(step, loader, device, amp, report, "test"), label_names)
    log.info("%s: test report of the saved checkpoint:\n%s", stage, _report_text(test, label_names))
    return test


# --------------------------------------------------------------------------- fusion training loop

FUSION_CHECKPOINT = "multimodal_fusion_best.bin"
FUSION_PREDICTIONS = "multimodal_fusion_best.json"
FUSION_METRICS = "multimodal_fusion_metrics.json"
FUSION_STATE = "multimodal_fusion.state.pt"

# objective(model output, labels (B, L), mask (B, L)) -> scalar loss over real utterances
FusionObjective = Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def predict_dialogues(model: nn.Module, data: Any, batch_size: int) -> list[int]:
    """Predictions for every real utterance of a :class:`~magtkd.dataset.DialogueSet`, flattened in
    the pickle's dialogue order."""
    model.eval()
    preds: list[int] = []
    for idx in data.batches(batch_size):
        batch = data.collate(idx, model.padding_speaker)
        # Boolean indexing walks (dialogue, utterance) row-major: the flattened order.
        preds.extend(model(*batch.inputs).t_logits.argmax(-1)[batch.mask].tolist())
    return preds


def fusion_train_epoch(model: nn.Module, data: Any, objective: FusionObjective,
                       optimizer: torch.optim.Optimizer, scheduler, batch_size: int,
                       generator: torch.Generator, epoch: int, grad_clip: float = 10.0, grad_accum: int = 1) -> float:
    """One pass over shuffled training dialogues, one update per ``grad_accum`` batches; returns the
    mean update loss."""
    model.train()
    total, count = 0.0, 0
    n_updates = math.ceil(math.ceil(len(data) / batch_size) / grad_accum)
    batches = (data.collate(idx, model.padding_speaker) for idx in data.batches(batch_size, generator))

    def loss_of(batch: Any) -> torch.Tensor:
        return objective(model(*batch.inputs), batch.labels, batch.mask)

    bar = progress(groups(batches, grad_accum), total=n_updates, desc=f"fusion epoch {epoch}")
    for group in bar:
        loss = update(model, group, loss_of, optimizer, scheduler, list(model.parameters()), grad_clip)
        total, count = total + loss, count + 1
        bar.set_postfix(loss=f"{total / count:.4f}")
    return total / max(count, 1)


def fusion_summary(stage: str, args: argparse.Namespace, sizes: dict, curve: list[dict], best: dict,
                   test_labels: list[int], names: list[str], complete: bool) -> dict[str, Any]:
    """Content of ``multimodal_fusion_metrics.json``: dev drives selection; test is reported at it."""
    return {
        "stage": stage, "complete": complete, "args": vars(args), "sizes": sizes,
        "selection": "best dev weighted F1", "selected_epoch": best["epoch"],
        "dev_at_selected": best["dev"], "test_at_selected": best["test"],
        "test_per_class": per_class(test_labels, best["preds"], names),
        "test_confusion": {"labels": names, "matrix": confusion(test_labels, best["preds"], len(names))},
        "curve": curve,
    }


def fit_fusion(*, stage: str, model: nn.Module, objective: FusionObjective, data: Mapping[str, Any],
               args: argparse.Namespace, sizes: dict, label_names: Sequence[str], save_dir: Path) -> dict[str, Any]:
    """Train the fusion model and keep the epoch with the best DEV weighted F1 (docs/METHOD.md §5).

    AdamW (``args.lr``, weight decay ``args.l2``), grad clip 10, the reference
    schedule counted in dialogues (``args.per_batch_schedule`` counts batches),
    the training dialogues shuffled by a generator seeded with ``args.seed``, one
    update per ``args.grad_accum`` batches. Writes ``multimodal_fusion_best.bin``
    and ``.json`` (test labels and predictions) at each new best,
    ``multimodal_fusion_metrics.json`` after every epoch and then the training
    state ``multimodal_fusion.state.pt``, which ``args.resume`` continues from.
    """
    if args.epochs < 1 or args.batch_size < 1 or args.grad_accum < 1:
        raise SystemExit(f"--epochs ({args.epochs}), --batch_size ({args.batch_size}) and --grad_accum "
                         f"({args.grad_accum}) must be at least 1")
    if world_size() > 1:
        raise SystemExit("the fusion stage trains in one process (it takes minutes): run it with python, not torchrun")
    names = list(label_names)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.l2)
    n_updates = math.ceil(math.ceil(len(data["train"]) / args.batch_size) / args.grad_accum)
    scheduler = reference_schedule(optimizer, len(data["train"]), n_updates, args.epochs, args.per_batch_schedule)
    generator = torch.Generator().manual_seed(args.seed)
    labels = {split: data[split].flat_labels() for split in ("dev", "test")}
    curve: list[dict[str, Any]] = []
    best: dict[str, Any] = {}
    saved_state, first = save_dir / FUSION_STATE, 1
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
                                        generator, epoch, grad_accum=args.grad_accum)
        train_seconds = time.perf_counter() - start
        preds = {split: predict_dialogues(model, data[split], args.batch_size) for split in ("dev", "test")}
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
            save_state_dict(save_dir / FUSION_CHECKPOINT, model)
            write_json(save_dir / FUSION_PREDICTIONS, {"labels": labels["test"], "preds": preds["test"]})
        # Rewritten every epoch, so an interrupted run still documents what it selected.
        doc = fusion_summary(stage, args, sizes, curve, best, labels["test"], names, complete=epoch == args.epochs)
        write_json(save_dir / FUSION_METRICS, doc)
        save_training_state(saved_state, stage=stage, epoch=epoch, model=model, optimizer=optimizer,
                            scheduler=scheduler, generators=[generator], args=args, curve=curve, best=best)

    matrix = doc["test_confusion"]["matrix"]
    log.info("%s: selected epoch %d (best dev weighted F1 %.4f); test accuracy %.4f, weighted F1 %.4f\n%s\n"
             "confusion matrix (rows = gold %s):\n%s", stage, best["epoch"], best["dev"]["weighted_f1"],
             best["test"]["accuracy"], best["test"]["weighted_f1"], report_text(labels["test"], best["preds"], names),
             names, "\n".join(" ".join(f"{c:5d}" for c in row) for row in matrix))
    return {**doc, "labels": labels["test"], "preds": best["preds"],
            "paths": {k: str(save_dir / v) for k, v in
                      (("checkpoint", FUSION_CHECKPOINT), ("predictions", FUSION_PREDICTIONS),
                       ("metrics", FUSION_METRICS))}}
