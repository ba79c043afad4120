"""The training engine: one `fit` for every training stage, first stage and fusion alike
(docs/METHOD.md §0, "Engine").

A stage script builds its data, its model, its ``objective``, its optimizer and its
schedule, and hands them to `fit` with a `FitConfig`. The engine runs the epochs
(one update per ``grad_accum`` batches, gradient clipping, the gradient scaler of
fp16 KD), scores dev after each epoch and selects the epoch with the best dev
weighted F1, saves the checkpoint at each new best, rewrites the metrics document
(`magtkd.results.metrics_document`) every epoch, and saves the training state that
``--resume True`` continues from. Until the last epoch the checkpoint, predictions and
metrics live under in-progress names (`StageFiles.in_progress`); `publish` puts them in
place at the end, so a previous complete set survives a failed or interrupted re-run. What differs between the two kinds of batch lives
in `SampleBatches` (first stage: DataLoaders of samples) and `DialogueBatches`
(fusion: whole dialogues as tensors), each with one ``train_one_epoch`` and one
``evaluate``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from .artifacts import (StageFiles, SubstitutionReport, WriteError, atomic_path, begin_outputs, json_default, output_lock,
                        remove_stale_temps, save_state_dict, write_json)
from .dataset import DatasetSpec
from .pretrained import enable_grad_checkpointing, load_checkpoint
from .results import Watch, format_test_report, metrics_document, summary, test_report, watch_line, write_plots
from .utils import UserError, gather_objects, is_main, progress, rank, set_precision, world_size

log = logging.getLogger("magtkd")


# --------------------------------------------------------------------------- learning-rate schedule

class WarmupDecay:
    """LR factor: linear warmup to 1 over ``warmup`` steps, then linear decay to 0 at ``total`` steps."""

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup, self.total = int(warmup), int(total)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return float(step) / float(max(1, self.warmup))
        return max(0.0, float(self.total - step) / float(max(1, self.total - self.warmup)))


@dataclass(frozen=True)
class GlobalBatch:
    """Items per update: the per-process batch x processes x ``--grad_accum``."""

    per_process: int
    processes: int
    grad_accum: int

    @property
    def size(self) -> int:
        return self.per_process * self.processes * self.grad_accum

    def __str__(self) -> str:
        return f"{self.size} ({self.per_process} per process x {self.processes} processes x {self.grad_accum} accumulated)"


def schedule_steps(n_train: int, updates_per_epoch: int, epochs: int, per_batch: bool = False,
                   anchor_batch: int | None = None) -> tuple[int, int]:
    """(warmup, total) in scheduler steps (one per update) of the authors' schedule (docs/METHOD.md §2).

    The authors count both in training SAMPLES (warmup = ``n_train``, total = ``n_train * epochs``)
    while stepping once per update, so the curve's length in epochs is proportional to the global
    batch. ``per_batch`` counts them in updates (warmup = one epoch). ``anchor_batch`` (the authors'
    global batch, ``--schedule_epochs True``) rescales their counts to this run's updates per epoch:
    the learning rate at each fraction of training is theirs whatever the global batch.
    """
    if per_batch:
        return updates_per_epoch, updates_per_epoch * epochs
    if anchor_batch is None:
        return n_train, n_train * epochs
    scale = updates_per_epoch / math.ceil(n_train / anchor_batch)  # their updates per epoch at their batch
    return max(1, round(n_train * scale)), max(1, round(n_train * epochs * scale))


def describe_schedule(warmup: int, total: int, updates_per_epoch: int, epochs: int) -> str:
    """The curve in epochs: where warmup ends, the peak factor reached, the factor of the last update."""
    curve, last = WarmupDecay(warmup, total), updates_per_epoch * epochs - 1
    # LambdaLR applies factor(k) to update k + 1: the first update runs at factor 0, as the authors'.
    peak, final = curve(min(warmup, last)), curve(last)
    ends = (f"warmup ends after {warmup / updates_per_epoch:.2f} of {epochs} epochs" if warmup <= last + 1
            else f"warmup would end after {warmup / updates_per_epoch:.2f} epochs: it never ends in {epochs}")
    return f"{ends}; peak factor {peak:.3f}; factor at the last update {final:.3f}"


def reference_schedule(optimizer: torch.optim.Optimizer, n_train: int, updates_per_epoch: int, epochs: int,
                       per_batch: bool = False, *, global_batch: GlobalBatch | None = None,
                       authors_batch: int | None = None, epoch_anchored: bool = False) -> LambdaLR:
    """The authors' schedule, stepped once per update (`schedule_steps`, docs/METHOD.md §2).

    With ``global_batch`` (`SampleBatches.global_batch`) the curve is logged in epochs; when that batch is not the
    authors' (``authors_batch``) and the counts are theirs in steps, a warning names the two
    ways back to their curve: the per-process batch that gives their global batch, or
    ``--schedule_epochs True`` (``epoch_anchored``).
    """
    anchor = authors_batch if epoch_anchored and not per_batch else None
    if epoch_anchored and authors_batch is None:
        raise UserError("--schedule_epochs True: this stage has no reference global batch to anchor to")
    warmup, total = schedule_steps(n_train, updates_per_epoch, epochs, per_batch, anchor)
    if global_batch is not None:
        how = ("counted in updates (--per_batch_schedule)" if per_batch else
               f"anchored in epochs to the authors' global batch {authors_batch} (--schedule_epochs)" if anchor
               else "counted in steps as the authors")
        log.info("schedule: global batch %s, %s, %d updates per epoch: %s", global_batch, how, updates_per_epoch,
                 describe_schedule(warmup, total, updates_per_epoch, epochs))
        size = global_batch.size
        if authors_batch is not None and size != authors_batch and not per_batch and not anchor:
            log.warning("schedule: the global batch %d is not the authors' %d, so their warmup (counted in steps) "
                        "ends after %.2f epochs instead of about %d: %s", size, authors_batch,
                        warmup / updates_per_epoch, authors_batch, schedule_choices(global_batch, authors_batch))
    return LambdaLR(optimizer, WarmupDecay(warmup, total))


def schedule_choices(global_batch: GlobalBatch, authors_batch: int) -> str:
    """The two ways to the authors' curve over epochs, for `reference_schedule`'s warning."""
    others = global_batch.processes * global_batch.grad_accum
    batch = (f"--batch_size {authors_batch // others} gives their global batch" if authors_batch % others == 0
             else f"no --batch_size gives their global batch with {others} processes x accumulation")
    return f"{batch}, or --schedule_epochs True keeps their curve over epochs at this batch (docs/METHOD.md §2)"


# --------------------------------------------------------------------------- configuration

@dataclass
class FitConfig:
    """What `fit` needs besides the model, the objective, the data, the optimizer and the schedule."""

    stage: str  # display name for logs and records, e.g. "IEMOCAP text"
    script: str  # the script that writes the artifacts, e.g. "IEMOCAP/text.py"
    dataset: str
    labels: Sequence[str]
    files: StageFiles
    epochs: int
    seed: int
    args: Mapping[str, Any]  # the run's flags: recorded in the metrics document, compared on resume
    grad_accum: int = 1
    grad_clip: float = 10.0  # the authors' clip_grad_norm_ bound
    resume: bool = False
    amp: bool = False  # autocast on CUDA (bf16, or fp16 with ``amp_dtype``)
    amp_dtype: torch.dtype = torch.bfloat16
    clip_scaled: bool = False  # fp16: clip the still-scaled gradients (the authors' KD order)
    grad_checkpointing: bool = False
    test_every_epoch: bool = False  # the fusion scores test every epoch (never used for selection)
    width: int | None = None  # the representation width, recorded for the readers of the checkpoint
    sizes: Mapping[str, Any] = field(default_factory=dict)
    tf32: bool = False  # --tf32: TF32 matrix products on CUDA (`magtkd.utils.set_precision`)
    tensorboard: Path | None = None  # --tensorboard DIR: event files under DIR/<checkpoint stem>/

    @classmethod
    def first_stage(cls, args: argparse.Namespace, spec: DatasetSpec, *, stage: str, script: str, files: StageFiles,
                    seed: int, width: int, **options: Any) -> "FitConfig":
        """The configuration of a first-stage script from `magtkd.utils.training_parser`'s flags; ``options``
        sets the rest (KD: ``amp_dtype``, ``clip_scaled``)."""
        return cls(stage=stage, script=script, dataset=spec.name, labels=spec.labels, files=files,
                   epochs=args.epochs, seed=seed, args={**vars(args), "seed": seed}, grad_accum=args.grad_accum,
                   resume=args.resume, amp=args.amp, grad_checkpointing=args.grad_checkpointing, width=width,
                   tf32=args.tf32, tensorboard=args.tensorboard, **options)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.grad_accum < 1:
            raise UserError(f"--epochs ({self.epochs}) and --grad_accum ({self.grad_accum}) must be at least 1")


# --------------------------------------------------------------------------- batches and updates

def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def autocast(device: torch.device, amp: bool, dtype: torch.dtype = torch.bfloat16):
    """Autocast to ``dtype`` on CUDA (when enabled); plain fp32 on CPU."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def note_problems(batch: Mapping[str, Any], dataset: Any, report: SubstitutionReport | None,
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


def concat_chunks(chunks: list) -> np.ndarray:
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
           optimizer: torch.optim.Optimizer, scheduler: Any, params: Sequence[nn.Parameter],
           grad_clip: float, scaler: torch.amp.GradScaler | None = None,
           clip_scaled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer update over the micro-batches of ``group`` (``--grad_accum``); returns its loss and
    the gradient norm before clipping (detached scalars on the device: reading them is the caller's
    host round trip).

    ``loss_of(batch)`` is the mean loss over the batch's items. Each micro-batch's
    loss is weighted by its share of the group's items (`batch_items`), so the
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
    counts = [batch_items(batch) for batch in group]
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
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)  # unscales first if not done above; skips steps with inf/nan gradients
        scaler.update()
    scheduler.step()
    return value, grad_norm.detach()


def batch_items(batch: Any) -> float:
    """Items of a batch the loss averages over: real utterances of a fusion batch, else samples."""
    return float(len(batch["labels"]) if isinstance(batch, Mapping) else len(batch))


class ObjectiveModule(nn.Module):
    """``objective(model, batch)`` as a module over ``model``, so DistributedDataParallel sees the
    forward pass that produces the loss (its gradient hooks sit on ``model``'s parameters)."""

    def __init__(self, model: nn.Module, objective: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: Any) -> torch.Tensor:
        return self.objective(self.model, batch)


# --------------------------------------------------------------------------- the two kinds of batch

class SampleBatches:
    """First-stage data: one DataLoader per split (`magtkd.dataset.loaders`); ``objective(model, batch)``
    is the training loss, ``model.encode(batch)`` gives ``(representation, logits)`` for scoring.

    Under torchrun the model trains inside DistributedDataParallel; each rank scores its shard
    of dev/test and the predictions are gathered in dataset order.
    """

    def __init__(self, loaders: Mapping[str, Any], device: torch.device,
                 report: SubstitutionReport | None = None) -> None:
        self.loaders, self.device, self.report = loaders, device, report
        self.runner: nn.Module | None = None
        if device.type == "cuda":
            # Page-locked batches: the ``non_blocking`` copies of `to_device` are then truly asynchronous.
            for loader in loaders.values():
                loader.pin_memory = True

    @property
    def n_train(self) -> int:
        return len(self.loaders["train"].dataset)

    def updates_per_epoch(self, grad_accum: int) -> int:
        return math.ceil(len(self.loaders["train"]) / grad_accum)

    def global_batch(self, grad_accum: int) -> GlobalBatch:
        return GlobalBatch(self.loaders["train"].batch_size, world_size(), grad_accum)

    def generators(self) -> list[torch.Generator]:
        return [loader.generator for loader in self.loaders.values() if loader.generator is not None]

    def prepare(self, model: nn.Module, objective: Callable[..., torch.Tensor]) -> None:
        """Wrap ``objective`` over ``model`` for training (in DistributedDataParallel under torchrun).

        ``find_unused_parameters``: data2vec's mask embedding only gets a gradient when a
        time mask was drawn for the batch.
        """
        runner: nn.Module = ObjectiveModule(model, objective)
        if world_size() > 1:
            runner = nn.parallel.DistributedDataParallel(
                runner, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
        self.runner = runner

    def _loss(self, batch: dict, config: FitConfig) -> torch.Tensor:
        note_problems(batch, self.loaders["train"].dataset, self.report)
        batch = to_device(batch, self.device)
        with autocast(self.device, config.amp, config.amp_dtype):
            return self.runner(batch)

    def train_one_epoch(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                        scaler: torch.amp.GradScaler | None, config: FitConfig, epoch: int,
                        watch: Watch | None = None) -> float:
        loader = self.loaders["train"]
        if isinstance(loader.sampler, torch.utils.data.DistributedSampler):
            loader.sampler.set_epoch(epoch)  # a new shuffle of the shards every epoch
        params = [p for p in model.parameters() if p.requires_grad]
        n_updates = self.updates_per_epoch(config.grad_accum)
        bar = progress(groups(loader, config.grad_accum), total=n_updates, desc=f"{config.stage} epoch {epoch}")
        return run_updates(bar, n_updates, functools.partial(self._loss, config=config), self.runner, optimizer,
                           scheduler, params, scaler, config, epoch, watch)

    @torch.inference_mode()
    def evaluate(self, model: nn.Module, split: str, config: FitConfig) -> tuple[np.ndarray, np.ndarray]:
        """Gold labels and argmax predictions of ``split``, in dataset (CSV) order."""
        loader = self.loaders[split]
        index, labels, preds = [], [], []
        finite = torch.ones((), dtype=torch.bool, device=self.device)  # read once, at the end
        for batch in progress(loader, desc=split):
            note_problems(batch, loader.dataset, self.report)
            index.append(batch["index"])
            batch = to_device(batch, self.device)
            with autocast(self.device, config.amp, config.amp_dtype):
                _, logits = model.encode(batch)
            finite = finite & torch.isfinite(logits).all()
            labels.append(batch["labels"].cpu())
            preds.append(logits.float().argmax(-1).cpu())
        check_finite_logits(finite, config.stage, split)
        ordered = in_dataset_order(concat_chunks(index), {"labels": concat_chunks(labels),
                                                          "preds": concat_chunks(preds)})
        return ordered["labels"], ordered["preds"]


class DialogueBatches:
    """Fusion data: the splits as `magtkd.features.DialogueSet` (whole dialogues, on the device);
    ``objective(output, target)`` takes the model's outputs and the labels as rows of the real utterances.

    Training dialogues are shuffled by a generator seeded with the run's seed. Batches are packed
    where it pays (docs/METHOD.md §5, "Speed"; ``packed`` True/False forces it, False is the authors'
    padded grid: the same results). One process only.
    """

    def __init__(self, data: Mapping[str, Any], batch_size: int, packed: bool | None = None) -> None:
        if world_size() > 1:
            raise UserError("the fusion stage trains in one process (it takes minutes): run it with python, "
                            "not torchrun")
        self.data, self.batch_size, self.packed = data, batch_size, packed
        self.generator = torch.Generator()
        self.objective: Callable[..., torch.Tensor] | None = None
        self.model: nn.Module | None = None

    @property
    def n_train(self) -> int:
        return len(self.data["train"])

    def updates_per_epoch(self, grad_accum: int) -> int:
        return math.ceil(math.ceil(len(self.data["train"]) / self.batch_size) / grad_accum)

    def global_batch(self, grad_accum: int) -> GlobalBatch:
        return GlobalBatch(self.batch_size, 1, grad_accum)

    def generators(self) -> list[torch.Generator]:
        return [self.generator]

    def prepare(self, model: nn.Module, objective: Callable[..., torch.Tensor], seed: int) -> None:
        self.model, self.objective = model, objective
        self.generator.manual_seed(seed)

    def _loss(self, batch: Any) -> torch.Tensor:
        out = self.model(*batch.inputs)
        return self.objective(type(out)(*map(batch.rows, out)), batch.rows(batch.labels))

    def train_one_epoch(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                        scaler: torch.amp.GradScaler | None, config: FitConfig, epoch: int,
                        watch: Watch | None = None) -> float:
        train = self.data["train"]
        batches = (train.collate(idx, model.padding_speaker, self.packed)
                   for idx in train.batches(self.batch_size, self.generator))
        n_updates = self.updates_per_epoch(config.grad_accum)
        bar = progress(groups(batches, config.grad_accum), total=n_updates, desc=f"{config.stage} epoch {epoch}")
        return run_updates(bar, n_updates, self._loss, model, optimizer, scheduler, list(model.parameters()),
                           scaler, config, epoch, watch)

    def evaluate(self, model: nn.Module, split: str, config: FitConfig) -> tuple[np.ndarray, np.ndarray]:
        data = self.data[split]
        preds = dialogue_logits(model, data, self.batch_size, packed=self.packed).argmax(-1)
        return np.asarray(data.flat_labels(), dtype=np.int64), preds.numpy()


class NonFiniteError(UserError, FloatingPointError):
    """A training loss or evaluation logits that are NaN or infinite: the run stops before publishing."""


def run_updates(bar: Any, n_updates: int, loss_of: Callable[[Any], torch.Tensor], runner: nn.Module,
                optimizer: torch.optim.Optimizer, scheduler: Any, params: Sequence[nn.Parameter],
                scaler: torch.amp.GradScaler | None, config: FitConfig, epoch: int,
                watch: Watch | None = None) -> float:
    """The updates of one epoch; returns the mean update loss. The loss stays on the device and is
    read every `LOG_EVERY` updates for the bar and once at the end (no host round trip per step);
    ``watch`` (``--tensorboard``) gets every update's figures and writes them at the same moments.

    The running sum is non-finite from the first non-finite update loss on, so reading it also
    checks every loss; the first such update is kept on the device (docs/METHOD.md §6). The fp16
    scaler's skipped steps have inf gradients but a finite loss, and pass.
    """
    total, count = torch.zeros((), dtype=torch.float64), 0
    first_bad = torch.full((), -1, dtype=torch.long)
    for group in bar:
        lr = optimizer.param_groups[0]["lr"]  # the rate this update uses (the scheduler steps after it)
        loss, grad_norm = update(runner, group, loss_of, optimizer, scheduler, params, config.grad_clip, scaler,
                                 config.clip_scaled)
        total, count = total.to(loss.device) + loss, count + 1
        first_bad = first_bad.to(loss.device)
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), count, first_bad)
        if watch is not None:
            watch.update(scheduler.last_epoch, loss, grad_norm, lr)
        if count % LOG_EVERY == 0 or count == n_updates:
            mean = float(total) / count
            if not math.isfinite(mean):
                raise NonFiniteError(
                    f"{config.stage}: the training loss is not finite (mean {mean}) at epoch {epoch}, update "
                    f"{int(first_bad)} of {n_updates}; stopped before publishing anything (a previous complete "
                    f"set is kept). Check the inputs for NaN/inf and the loss flags (learning rate, --tau)")
            bar.set_postfix(loss=f"{mean:.4f}")
            if watch is not None:
                watch.flush(scaler)
    return float(total) / max(count, 1)


LOG_EVERY = 10  # updates between two reads of the loss on the host


def check_finite_logits(finite: torch.Tensor, stage: str, split: str, where: str = "") -> None:
    """Refuse NaN/inf logits at evaluation: their argmax would be an arbitrary class (docs/METHOD.md §6)."""
    if not bool(finite):
        raise NonFiniteError(f"{stage}: the model's {split} logits are not finite{where}; the checkpoint or its "
                             "inputs hold NaN/inf (re-train, or check the inputs)")


@torch.no_grad()
def dialogue_logits(model: nn.Module, data: Any, batch_size: int, show_progress: bool = False,
                    packed: bool | None = None) -> torch.Tensor:
    """(N, classes) text-anchor logits ``t_logits`` of every real utterance of a
    `magtkd.features.DialogueSet`, flattened in the pickle's dialogue order (model in eval mode).

    Their argmax is the prediction; their softmax the class probabilities. ``packed``
    False computes on the padded grid, as the authors' code did (same values); ``None``
    packs the batches where it pays (`magtkd.features.DialogueSet.collate`).
    """
    model.eval()
    chunks: list[torch.Tensor] = []
    batches = data.batches(batch_size)
    if show_progress:
        batches = progress(batches, total=math.ceil(len(data) / batch_size), desc="dialogues")
    for idx in batches:
        batch = data.collate(idx, model.padding_speaker, packed)
        chunks.append(batch.rows(model(*batch.inputs).t_logits).float().cpu())
    logits = torch.cat(chunks) if chunks else torch.zeros(0, model.n_classes)
    finite = torch.isfinite(logits).all(-1)
    if not bool(finite.all()):
        # A NaN input row spreads through attention to its whole dialogue: name the dialogues.
        dialogue = torch.repeat_interleave(torch.arange(len(data)), torch.tensor([len(y) for y in data.labels]))
        bad = sorted(set(data.vids[i] for i in dialogue[~finite].tolist()))
        check_finite_logits(finite.all(), "fusion", "dialogue", f" for dialogue(s) {bad[:5]} of {data.path}")
    return logits


# --------------------------------------------------------------------------- training state (resume)

def _rng_state(generators: Sequence[torch.Generator], device: torch.device) -> dict[str, Any]:
    """This process's random states; on CUDA only its own device's (a run resumed with fewer GPUs
    visible restores them all the same), on CPU none (CUDA is never touched)."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "generators": [g.get_state() for g in generators],
    }


def _set_rng_state(state: Mapping[str, Any], generators: Sequence[torch.Generator], device: torch.device) -> None:
    random.setstate(state["python"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and torch.is_tensor(state["cuda"]):
        torch.cuda.set_rng_state(state["cuda"], device)
    for generator, saved in zip(generators, state["generators"]):
        generator.set_state(saved)


def _plain(obj: Any) -> Any:
    """JSON-like copy (numpy scalars -> floats), loadable by ``torch.load(weights_only=True)``."""
    return json.loads(json.dumps(obj, default=json_default))


# Flags that must match between the run that saved a training state and the run resuming it.
RESUME_MUST_MATCH = ("epochs", "batch_size", "learning_rate", "lr", "l2", "seed", "grad_accum",
                     "per_batch_schedule", "schedule_epochs", "dropout", "student", "teacher", "amp",
                     "reference_kd_clip")


def _resume_args(args: Mapping[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in args.items() if k in RESUME_MUST_MATCH}


def save_training_state(config: FitConfig, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler: Any, generators: Sequence[torch.Generator], progress_: Mapping[str, Any],
                        scaler: torch.amp.GradScaler | None = None, device: torch.device | None = None) -> None:
    """Everything needed to continue after ``epoch``, written atomically by rank 0: every rank's random
    states are gathered into it (on CUDA each its own device's) and the gradient scaler's state
    (fp16 KD: its scale and growth tracker), all loadable with ``weights_only=True``."""
    device = device if device is not None else next(model.parameters()).device
    rngs = gather_objects(_rng_state(generators, device))
    if not is_main():
        return
    state = {
        "stage": config.stage, "epoch": epoch, "world_size": world_size(), "device_type": device.type,
        "args": _resume_args(config.args),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rngs,
        "scaler": _plain(scaler.state_dict()) if scaler is not None else {},
        "progress": _plain(progress_),
    }
    with atomic_path(config.files.state) as tmp:
        torch.save(state, tmp)


def load_training_state(config: FitConfig) -> dict[str, Any] | None:
    """The saved state when ``config.resume`` (``None`` if there is none yet: training starts at epoch 1).

    Without ``--resume`` an existing state file is never used: the log says it is
    ignored and will be overwritten. A state saved with other training flags or
    another number of processes is refused with a message naming them.
    """
    path = config.files.state
    if not config.resume:
        if path.exists():
            log.warning("%s: ignoring the training state %s of an earlier run (pass --resume True to continue "
                        "it); it is overwritten after this run's first epoch", config.stage, path)
        return None
    if not path.is_file():
        log.info("%s: --resume True but no training state at %s yet: starting at epoch 1", config.stage, path)
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    now = _resume_args(config.args)
    differ = {k: (state["args"].get(k), now[k]) for k in now if state["args"].get(k) != now[k]}
    if state["world_size"] != world_size():
        # Each rank's data shard and random streams belong to the world size they were drawn under.
        raise UserError(f"{path} was saved by {state['world_size']} process(es) and this run has {world_size()}: "
                        f"resume with torchrun --nproc_per_node {state['world_size']} (or python for 1), or "
                        "delete the file to start over")
    if differ:
        raise UserError(f"{path} was saved with different settings ("
                        + ", ".join(f"--{k} {old} then, {new} now" for k, (old, new) in sorted(differ.items()))
                        + "); resume with the same flags, or delete the file to start over")
    return state


def restore_training_state(state: Mapping[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                           scheduler: Any, scaler: torch.amp.GradScaler | None, generators: Sequence[torch.Generator],
                           device: torch.device, stage: str) -> None:
    """Load a state from `load_training_state` into this run's objects.

    Saved on another kind of device (cuda then, cpu now, or the reverse): the weights, optimizer,
    schedule and scaler carry over, but the device's random stream cannot, so training continues
    correctly but not bit-identically to an uninterrupted run; the log says so.
    """
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    saved_scaler = state.get("scaler") or {}
    if scaler is not None and scaler.is_enabled():
        if saved_scaler:
            scaler.load_state_dict(saved_scaler)
        else:
            log.warning("%s: the training state holds no gradient-scaler state: the scale restarts at %g",
                        stage, scaler.get_scale())
    saved_type = state.get("device_type", device.type)
    if saved_type != device.type:
        log.warning("%s: the training state was saved on %s and this run is on %s: training continues, but the "
                    "%s random stream is not restored (not bit-identical to an uninterrupted run)", stage,
                    saved_type, device.type, "cuda")
    _set_rng_state(state["rng"][rank()], generators, device)


# --------------------------------------------------------------------------- the loop

def fit(model: nn.Module, objective: Callable[..., torch.Tensor], data: SampleBatches | DialogueBatches,
        optimizer: torch.optim.Optimizer, scheduler: Any, config: FitConfig,
        scaler: torch.amp.GradScaler | None = None) -> dict[str, Any]:
    """Train ``model`` with dev selection; returns the metrics document (`magtkd.results.metrics_document`).

    After each epoch dev is scored; each new best dev weighted F1 saves the checkpoint
    (under its in-progress name) and scores test (every epoch with ``config.test_every_epoch``,
    never used for selection). The in-progress metrics document follows each epoch, and so does
    the training state; after the last epoch `publish` replaces the previous set. A non-finite
    training loss stops the run (`NonFiniteError`) before anything is published. Under torchrun only rank 0
    writes. Holds the checkpoint's lock (a second run into the same folder stops).
    """
    watch = Watch(config.tensorboard, config.files.checkpoint.stem) if config.tensorboard and is_main() else None
    try:
        with output_lock(config.files.checkpoint.parent, config.files.lock_name) if is_main() \
                else contextlib.nullcontext():
            return _fit(model, objective, data, optimizer, scheduler, config, scaler, watch)
    finally:
        if watch is not None:
            watch.close()


def _fit(model: nn.Module, objective: Callable[..., torch.Tensor], data: SampleBatches | DialogueBatches,
         optimizer: torch.optim.Optimizer, scheduler: Any, config: FitConfig,
         scaler: torch.amp.GradScaler | None, watch: Watch | None) -> dict[str, Any]:
    files, names = config.files, list(config.labels)
    device = next(model.parameters()).device
    set_precision(device, config.tf32)
    if is_main():
        remove_stale_temps(files.checkpoint.parent, [p.name for p in files.written()])
        # The run's own record, under its in-progress name: the previous complete set stays as it is.
        begin_outputs(files.in_progress(files.metrics), config.stage, config.args, script=config.script,
                      dataset=config.dataset, labels=names, width=config.width, checkpoint=files.checkpoint.name)
    if config.grad_checkpointing:
        log.info("%s: gradient checkpointing in %s", config.stage, ", ".join(enable_grad_checkpointing(model)))
    if isinstance(data, DialogueBatches):
        data.prepare(model, objective, config.seed)
    else:
        data.prepare(model, objective)
    generators = data.generators()
    epochs: list[dict[str, Any]] = []
    best: dict[str, Any] = {}
    first = 1
    state = load_training_state(config)
    if state is not None:
        restore_training_state(state, model, optimizer, scheduler, scaler, generators, device, config.stage)
        epochs, best, first = state["progress"]["epochs"], state["progress"]["best"], state["epoch"] + 1
        log.info("%s: resuming from epoch %d of %d (%s)", config.stage, state["epoch"], config.epochs, files.state)

    def document(complete: bool) -> dict[str, Any]:
        return metrics_document(stage=config.stage, script=config.script, dataset=config.dataset, labels=names,
                                width=config.width, args=config.args, sizes=config.sizes, files=files,
                                epochs=epochs, best=best, complete=complete,
                                test_every_epoch=config.test_every_epoch)

    n_items, epoch_seconds = data.n_train, []
    for epoch in range(first, config.epochs + 1):
        started = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        model.train()
        train_loss = data.train_one_epoch(model, optimizer, scheduler, scaler, config, epoch, watch)
        train_seconds = time.perf_counter() - started
        model.eval()
        dev = summary(*data.evaluate(model, "dev", config))
        improved = not best or dev["weighted_f1"] > best["dev"]["weighted_f1"]
        row: dict[str, Any] = {"epoch": epoch, "train_loss": train_loss, "dev": dev}
        if improved or config.test_every_epoch:
            labels, preds = data.evaluate(model, "test", config)
            test = test_report(labels, preds, names)
            row["test"] = {k: test[k] for k in ("accuracy", "weighted_f1")}
        if improved:
            # Selection on DEV weighted F1; the reference selected the fusion's epoch on test (docs/METHOD.md §7).
            best = {"epoch": epoch, "dev": dev, "test": test}
            if is_main():
                save_state_dict(files.in_progress(files.checkpoint), model)
                if files.predictions is not None:
                    write_json(files.in_progress(files.predictions), {"labels": labels.tolist(),
                                                                      "preds": preds.tolist()})
        row.update(train_seconds=round(train_seconds, 3),
                   eval_seconds=round(time.perf_counter() - started - train_seconds, 3),
                   samples_per_second=round(n_items / max(train_seconds, 1e-9), 2))
        epochs.append(row)
        epoch_seconds.append(time.perf_counter() - started)
        log.info("%s epoch %d/%d: train loss %.4f | dev acc %.4f wF1 %.4f%s%s | %.1f s, %.1f samples/s%s",
                 config.stage, epoch, config.epochs, train_loss, dev["accuracy"], dev["weighted_f1"],
                 f" | test acc {row['test']['accuracy']:.4f} wF1 {row['test']['weighted_f1']:.4f}"
                 if "test" in row else "", " | new best dev, saved" if improved else "",
                 train_seconds, row["samples_per_second"], watch_line(device, epoch_seconds, config.epochs - epoch))
        if watch is not None:
            watch.epoch(row, scheduler.last_epoch)
        if is_main():
            write_json(files.in_progress(files.metrics), document(complete=False))
        save_training_state(config, epoch, model, optimizer, scheduler, generators, {"epochs": epochs, "best": best},
                            scaler, device)
    doc = document(complete=True)
    log.info("%s: selected epoch %d (dev wF1 %.4f); test report:\n%s", config.stage, best["epoch"],
             best["dev"]["weighted_f1"], format_test_report(best["test"], names))
    if is_main():
        publish(files, config, doc, names)
    return doc


def publish(files: StageFiles, config: FitConfig, doc: Mapping[str, Any], names: Sequence[str]) -> None:
    """Replace the previous set by this run's: its record says incomplete while the files change, the
    in-progress checkpoint (and predictions) are renamed onto the published names, the plots are drawn,
    and the complete document is written last (docs/METHOD.md §6)."""
    partial = files.in_progress(files.checkpoint)
    if not partial.is_file() and not files.checkpoint.is_file():
        raise UserError(f"{config.stage}: the best checkpoint {partial} of this run is missing (deleted?); "
                        f"re-run without --resume")
    begin_outputs(files.metrics, config.stage, config.args, script=config.script, dataset=config.dataset,
                  labels=list(names), width=config.width, checkpoint=files.checkpoint.name)
    # A --resume of a run that had already published finds nothing in progress: its set is in place.
    for path in (files.checkpoint, files.predictions):
        if path is not None and files.in_progress(path).is_file():
            try:
                os.replace(files.in_progress(path), path)
            except OSError as err:
                raise WriteError(f"cannot write {path}: {os.strerror(err.errno or 0)}") from err
    write_plots(files, f"{config.stage}, seed {config.seed}", doc, names)
    write_json(files.metrics, doc)  # last: publishes checkpoint + document as one complete set
    files.in_progress(files.metrics).unlink(missing_ok=True)


def evaluate_checkpoint(model: nn.Module, data: SampleBatches | DialogueBatches, config: FitConfig,
                        checkpoint_loaded: bool = False) -> dict[str, Any]:
    """``--train False``: the saved checkpoint's test report (`magtkd.results.test_report`).

    First-stage checkpoints are loaded here (ours or the authors' layout, their record checked);
    a fusion model comes loaded (``checkpoint_loaded``).
    """
    if not checkpoint_loaded:
        load_checkpoint(model, config.files.checkpoint, config.script, config.dataset, config.labels)
    model.eval()
    labels, preds = data.evaluate(model, "test", config)
    test = test_report(labels, preds, list(config.labels))
    log.info("%s: test report of the saved checkpoint %s:\n%s", config.stage, config.files.checkpoint,
             format_test_report(test, list(config.labels)))
    return {**test, "labels": labels.tolist(), "preds": preds.tolist()}
