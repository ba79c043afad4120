"""The training engine: one `fit` for every training stage, first stage and fusion alike
(docs/METHOD.md §0, "The engine").

A stage script builds its data, its model, its ``objective``, its optimizer and its
schedule, and hands them to `fit` with a `FitConfig`. The engine runs the epochs
(one update per ``grad_accum`` batches, gradient clipping, the gradient scaler of
fp16 KD), scores dev after each epoch and selects the epoch with the best dev
weighted F1, saves the checkpoint at each new best, rewrites the metrics document
(`magtkd.results.metrics_document`) every epoch, and saves the training state that
``--resume True`` continues from. Until the last epoch the checkpoint, predictions and
metrics live under in-progress names (`StageFiles.in_progress`); `publish` puts them in
place at the end, so a previous complete set survives a failed or interrupted re-run.

What differs between the two kinds of data is behind the `Batches` protocol:
`magtkd.loaders.SampleBatches` (first stage: DataLoaders of samples) and
`magtkd.fusion_data.DialogueBatches` (fusion: whole dialogues as tensors).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import torch
from torch import nn

from .artifacts import (StageFiles, WriteError, begin_outputs, output_lock, remove_stale_temps, save_state_dict,
                        write_json)
from .checkpoints import load_checkpoint
from .monitor import Watch, watch_line
from .plots import write_plots
from .predictions import SplitOutputs, write_split_outputs
from .results import (AUTHORS_PROTOCOL, SELECTED_ON, SELECTIONS, authors_score, format_test_report, metrics_document,
                      summary, test_report)
from .runtime import GlobalBatch, is_main, progress, set_precision
from .scaler_skips import ScalerSkips, check_finite_inputs
from .training_state import TrainingState
from .utils import NonFiniteError, UserError

log = logging.getLogger("magtkd")

# The training flags a `FitConfig` takes from a script's parsed flags when they are there (`FitConfig.from_flags`).
LOOP_FLAGS = ("grad_accum", "resume", "save_state", "amp", "grad_checkpointing", "tf32", "tensorboard",
              "per_batch_schedule", "schedule_epochs", "selection")


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
    grad_accum: int = 1  # --grad_accum: micro-batches per update (the one place it lives)
    grad_clip: float = 10.0  # the authors' clip_grad_norm_ bound
    resume: bool = False
    save_state: bool | None = None  # --save_state: write the training state every epoch; None: as ``resume``
    amp: bool = False  # autocast on CUDA (bf16, or fp16 with ``amp_dtype``)
    amp_dtype: torch.dtype = torch.bfloat16
    clip_scaled: bool = False  # fp16: clip the still-scaled gradients (the authors' KD order)
    grad_checkpointing: bool = False
    test_every_epoch: bool = False  # the fusion scores test every epoch (never used for selection)
    width: int | None = None  # the representation width, recorded for the readers of the checkpoint
    sizes: Mapping[str, Any] = field(default_factory=dict)
    tf32: bool = False  # --tf32: TF32 matrix products on CUDA (`magtkd.runtime.set_precision`)
    tensorboard: Path | None = None  # --tensorboard DIR: event files under DIR/<checkpoint stem>/
    authors_batch: int | None = None  # the authors' global batch, the schedule's reference (`magtkd.schedule`)
    per_batch_schedule: bool = False  # --per_batch_schedule
    schedule_epochs: bool = True  # --schedule_epochs: the authors' curve over epochs at any global batch
    selection: str = "dev"  # --selection (fusion): "dev", or "test", the authors' protocol (`improves`)

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any], *, seed: int, **fields: Any) -> "FitConfig":
        """A training script's configuration: ``flags`` (its parsed flags, ``vars(args)``, recorded with this
        run's ``seed``) give ``epochs`` and the `LOOP_FLAGS` they hold; ``fields`` sets the rest."""
        taken = {name: flags[name] for name in LOOP_FLAGS if name in flags and name not in fields}
        return cls(epochs=flags["epochs"], seed=seed, args={**flags, "seed": seed}, **taken, **fields)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.grad_accum < 1:
            raise UserError(f"--epochs ({self.epochs}) and --grad_accum ({self.grad_accum}) must be at least 1")
        if self.selection not in SELECTIONS:
            raise UserError(f"--selection {self.selection}: expected one of {', '.join(SELECTIONS)}")


class Batches(Protocol):
    """The data `fit` trains on: `magtkd.loaders.SampleBatches` or `magtkd.fusion_data.DialogueBatches`."""

    runner: nn.Module  # what computes a micro-batch's loss (``no_sync`` under DDP)
    n_train: int  # training items (samples or dialogues)

    def prepare(self, model: nn.Module, objective: Callable[..., torch.Tensor], seed: int) -> None: ...
    def micro_batches(self, epoch: int) -> Iterable[Any]: ...
    def loss(self, batch: Any, config: FitConfig) -> torch.Tensor: ...
    def updates_per_epoch(self, grad_accum: int) -> int: ...
    def global_batch(self, grad_accum: int) -> GlobalBatch: ...
    def generators(self) -> list[torch.Generator]: ...
    def evaluate(self, model: nn.Module, split: str, config: FitConfig) -> SplitOutputs: ...


# --------------------------------------------------------------------------- one update

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


def batch_items(batch: Any) -> float:
    """Items of a batch the loss averages over: real utterances of a fusion batch, else samples."""
    return float(len(batch["labels"]) if isinstance(batch, Mapping) else len(batch))


@dataclass
class Step:
    """The state every update of a run shares: the optimizer, its schedule, the fp16 gradient scaler, the
    parameters clipped and how, and the ``--tensorboard`` watch."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    params: Sequence[nn.Parameter]
    grad_clip: float
    scaler: torch.amp.GradScaler | None = None
    clip_scaled: bool = False
    watch: Watch | None = None

    def update(self, runner: nn.Module, group: Sequence[Any],
               loss_of: Callable[[Any], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer update over the micro-batches of ``group`` (``--grad_accum``); returns its loss and
        the gradient norm before clipping (detached scalars on the device: reading them is the caller's
        host round trip).

        ``loss_of(batch)`` is the mean loss over the batch's items. Each micro-batch's
        loss is weighted by its share of the group's items (`batch_items`), so the
        accumulated gradient is that of the mean loss over the whole group: the same
        update as one batch holding all of them, for losses that are means over items
        (cross-entropy). Loss terms that relate the items of a batch to each other (the
        KD correlation/relation terms, docs/METHOD.md §3) are computed per micro-batch (over
        every process's micro-batch: `magtkd.runtime.gather_rows`).
        Under DDP the gradients are all-reduced once, at the last micro-batch. With a
        gradient ``scaler`` (fp16 KD, docs/METHOD.md §3) the gradients are unscaled
        before clipping, or clipped while still scaled with ``clip_scaled`` (the
        authors' order).

        Nothing here waits for the device: the loss is summed where it was computed (no host scalar is
        made and copied over), the weights are Python floats, and the norm stays a tensor.
        """
        self.optimizer.zero_grad(set_to_none=True)
        counts = [batch_items(batch) for batch in group]
        total = sum(counts)
        value: torch.Tensor | None = None
        for i, (batch, count) in enumerate(zip(group, counts)):
            last = i == len(group) - 1
            with contextlib.nullcontext() if last or not hasattr(runner, "no_sync") else runner.no_sync():
                loss = loss_of(batch)
                # A single batch backpropagates its loss as is: the plain update, bit for bit.
                share = loss if len(group) == 1 else loss * (count / total)
                (share if self.scaler is None else self.scaler.scale(share)).backward()
            part = loss.detach() * (count / total)
            value = part.double() if value is None else value + part
        if self.scaler is not None and not self.clip_scaled:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients (a no-op when the scaler is disabled)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)  # unscales first if not done above; skips steps with inf/nan gradients
            self.scaler.update()
        self.scheduler.step()
        assert value is not None, "an update needs at least one micro-batch"
        return value, grad_norm.detach()


LOG_EVERY = 10  # updates between two reads of the loss on the host
def train_one_epoch(data: Batches, step: Step, config: FitConfig, epoch: int) -> float:
    """The updates of one epoch; returns the mean update loss. The loss stays on the device and is
    read every `LOG_EVERY` updates for the bar and once at the end (no host round trip per step);
    the watch (``--tensorboard``) gets every update's figures and writes them at the same moments.

    The running sum is non-finite from the first non-finite update loss on, so reading it also
    checks every loss; the first such update is kept on the device (docs/METHOD.md §6). With fp16's
    gradient scaler an update whose gradients are not finite is skipped instead (`ScalerSkips`: logged,
    left out of the mean, bounded), while non-finite inputs and an epoch whose every update was skipped
    stop the run.
    """
    n_updates = data.updates_per_epoch(config.grad_accum)
    bar = progress(groups(data.micro_batches(epoch), config.grad_accum), total=n_updates,
                   desc=f"{config.stage} epoch {epoch}")
    # Made on the device by the first update (no host tensor copied over, docs/METHOD.md §6).
    total: torch.Tensor | None = None
    first_bad: torch.Tensor | None = None
    count = 0
    skips = ScalerSkips(config.stage, epoch) if step.scaler is not None and step.scaler.is_enabled() else None
    for group in bar:
        if skips is not None:
            check_finite_inputs(group, config.stage, epoch, count + 1)
        lr = step.optimizer.param_groups[0]["lr"]  # the rate this update uses (the scheduler steps after it)
        loss, grad_norm = step.update(data.runner, group, lambda batch: data.loss(batch, config))
        count += 1
        applied = loss if skips is None else torch.where(skips.note(count, grad_norm), 0.0, loss)
        if total is None:
            total = torch.zeros_like(applied, dtype=torch.float64)  # float64: the host sum it replaces
            first_bad = torch.full_like(applied, -1, dtype=torch.long)
        total = total + applied
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(applied), count, first_bad)
        if step.watch is not None:
            step.watch.update(step.scheduler.last_epoch, loss, grad_norm, lr)
        if count % LOG_EVERY == 0 or count == n_updates:
            if skips is not None:
                skips.read(step.scaler, n_updates)
            mean = float(total) / max(count - (skips.skipped if skips else 0), 1)
            if not math.isfinite(mean):
                raise NonFiniteError(
                    f"{config.stage}: the training loss is not finite (mean {mean}) at epoch {epoch}, update "
                    f"{int(first_bad)} of {n_updates}; stopped before publishing anything (a previous complete "
                    f"set is kept). Check the inputs for NaN/inf and the loss flags (learning rate, --tau)")
            bar.set_postfix(loss=f"{mean:.4f}")
            if step.watch is not None:
                step.watch.flush(step.scaler)
    if skips is not None and count and skips.skipped == count:
        raise NonFiniteError(f"{config.stage}: every update of epoch {epoch} ({count}) was skipped by the fp16 "
                             "gradient scaler (gradients not finite); stopped before publishing anything (a "
                             "previous complete set is kept). Check the inputs and the loss flags, or try --amp False")
    return float(total) / max(count - (skips.skipped if skips else 0), 1) if total is not None else 0.0


def check_finite_logits(finite: torch.Tensor | bool, stage: str, split: str, where: str = "") -> None:
    """Refuse NaN/inf logits at evaluation: their argmax would be an arbitrary class (docs/METHOD.md §6)."""
    if not bool(finite):
        raise NonFiniteError(f"{stage}: the model's {split} logits are not finite{where}; the checkpoint or its "
                             "inputs hold NaN/inf (re-train, or check the inputs)")


def enable_grad_checkpointing(model: nn.Module) -> list[str]:
    """``--grad_checkpointing True``: the Hugging Face backbones inside ``model`` recompute their layers'
    activations during backward (less memory, about a third more compute); returns their class names."""
    found = [m for m in model.modules() if getattr(m, "supports_gradient_checkpointing", False)
             and hasattr(m, "gradient_checkpointing_enable")]
    if not found:
        raise UserError(f"--grad_checkpointing True: {type(model).__name__} has no Hugging Face backbone")
    for module in found:
        # Non-reentrant checkpointing restores the RNG state, so dropout masks match the plain run.
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return [type(m).__name__ for m in found]


# --------------------------------------------------------------------------- the loop

def fit(model: nn.Module, objective: Callable[..., torch.Tensor], data: Batches,
        optimizer: torch.optim.Optimizer, scheduler: Any, config: FitConfig,
        scaler: torch.amp.GradScaler | None = None) -> dict[str, Any]:
    """Train ``model`` with dev selection (``config.selection`` "test": the authors' protocol, `improves`);
    returns the metrics document (`magtkd.results.metrics_document`).

    After each epoch dev is scored; each new best dev weighted F1 saves the checkpoint
    (under its in-progress name) and scores test (every epoch with ``config.test_every_epoch``,
    used for selection only with ``config.selection`` "test"). The in-progress metrics document follows each
    epoch, and so does the training state; after the last epoch `publish` replaces the previous set. A non-finite
    training loss stops the run (`NonFiniteError`) before anything is published. Under torchrun only rank 0
    writes. Holds the checkpoint's lock (a second run into the same folder stops).
    """
    watch = Watch(config.tensorboard, config.files.checkpoint.stem) if config.tensorboard and is_main() else None
    try:
        with output_lock(config.files.checkpoint.parent, config.files.lock_name) if is_main() \
                else contextlib.nullcontext():
            # A model may name the order its authors' clipping summed the gradient norms in (the fusion's)
            ordered = model.clip_order() if hasattr(model, "clip_order") else model.parameters()
            step = Step(optimizer, scheduler, [p for p in ordered if p.requires_grad], config.grad_clip,
                        scaler, config.clip_scaled, watch)
            return _fit(model, objective, data, step, config)
    finally:
        if watch is not None:
            watch.close()


@dataclass
class Progress:
    """The run so far: one row per finished epoch and the selected (best dev) epoch, as the metrics
    document and the training state hold them."""

    epochs: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)  # wall time of the epochs run in this process


def _fit(model: nn.Module, objective: Callable[..., torch.Tensor], data: Batches, step: Step,
         config: FitConfig) -> dict[str, Any]:
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
    data.prepare(model, objective, config.seed)
    if config.selection == "test":
        log.warning("%s: --selection test keeps the epoch with the best TEST weighted F1 (%s)", config.stage,
                    AUTHORS_PROTOCOL)
    run, first = Progress(), 1
    # The resume state only when asked (--save_state, default: as --resume), written in the background.
    saved = TrainingState(files.state, config.stage, config.args, model, step.optimizer, step.scheduler, step.scaler,
                          data.generators(), device, enabled=config.resume if config.save_state is None
                          else config.save_state)
    state = saved.load(config.resume)
    if state is not None:
        saved.restore(state)
        run.epochs, run.best, first = state["progress"]["epochs"], state["progress"]["best"], state["epoch"] + 1
        log.info("%s: resuming from epoch %d of %d (%s)", config.stage, state["epoch"], config.epochs, files.state)
    with saved.writing():  # the last state is on disk (or its write error raised) before anything is published
        for epoch in range(first, config.epochs + 1):
            _epoch(model, data, step, config, epoch, run, device)
            if is_main():
                write_json(files.in_progress(files.metrics), _document(config, run, complete=False))
            saved.save(epoch, {"epochs": run.epochs, "best": run.best})
    doc = _document(config, run, complete=True)
    log.info("%s: selected epoch %d (%s; dev wF1 %.4f); test report:\n%s", config.stage, run.best["epoch"],
             SELECTIONS[config.selection], run.best["dev"]["weighted_f1"], format_test_report(run.best["test"], names))
    if is_main():
        publish(files, config, doc, names)
        saved.discard_stale()
    return doc


def improves(selection: str, best: Mapping[str, Any], dev: Mapping[str, Any], test: Mapping[str, Any] | None) -> bool:
    """Whether this epoch replaces the selected one ``best`` (empty before the first epoch). ``dev``: the
    best dev weighted F1, strictly greater. ``test``, the authors' protocol (docs/METHOD.md §5, §7): the test
    weighted F1 in % rounded to 2 decimals (`magtkd.results.authors_score`) strictly greater, so the first
    of tied epochs stays."""
    if not best:
        return True
    if selection == "test":
        return authors_score(test["weighted_f1"]) > authors_score(best["test"]["weighted_f1"])
    return dev["weighted_f1"] > best["dev"]["weighted_f1"]


def _epoch(model: nn.Module, data: Batches, step: Step, config: FitConfig, epoch: int, run: Progress,
           device: torch.device) -> None:
    """Train one epoch, score dev (and test at a new best, or every epoch), keep a new best checkpoint."""
    files, names = config.files, list(config.labels)
    started = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    train_loss = train_one_epoch(data, step, config, epoch)
    train_seconds = time.perf_counter() - started
    model.eval()
    dev_out = data.evaluate(model, "dev", config)
    dev = summary(dev_out.labels, dev_out.preds)
    # The learning rate at the epoch's end: the rate the next update would use (the schedule in epochs, §2).
    row: dict[str, Any] = {"epoch": epoch, "train_loss": train_loss, "lr": step.optimizer.param_groups[0]["lr"],
                           "dev": dev}
    test = test_out = None
    if config.test_every_epoch or config.selection == "test":
        test_out = data.evaluate(model, "test", config)
        test = test_report(test_out.labels, test_out.preds, names)
    improved = improves(config.selection, run.best, dev, test)
    if improved and test is None:
        test_out = data.evaluate(model, "test", config)
        test = test_report(test_out.labels, test_out.preds, names)
    if test is not None:
        row["test"] = {k: test[k] for k in ("accuracy", "weighted_f1")}
    if improved:
        # Selection on DEV weighted F1 by default; --selection test is the authors' rule (docs/METHOD.md §7).
        run.best = {"epoch": epoch, "dev": dev, "test": test}
        if is_main():
            save_state_dict(files.in_progress(files.checkpoint), model)
            if files.predictions is not None:
                write_json(files.in_progress(files.predictions), {"labels": test_out.labels.tolist(),
                                                                  "preds": test_out.preds.tolist()})
            # Every prediction of the selected epoch as a row, published with the checkpoint (docs/METHOD.md §0)
            write_split_outputs(files, {"dev": dev_out, "test": test_out}, names, in_progress=True)
    row.update(train_seconds=round(train_seconds, 3),
               eval_seconds=round(time.perf_counter() - started - train_seconds, 3),
               samples_per_second=round(data.n_train / max(train_seconds, 1e-9), 2))
    run.epochs.append(row)
    run.seconds.append(time.perf_counter() - started)
    log.info("%s epoch %d/%d: train loss %.4f | dev acc %.4f wF1 %.4f%s%s | %.1f s, %.1f samples/s%s",
             config.stage, epoch, config.epochs, train_loss, dev["accuracy"], dev["weighted_f1"],
             f" | test acc {row['test']['accuracy']:.4f} wF1 {row['test']['weighted_f1']:.4f}"
             if "test" in row else "", f" | new best {SELECTED_ON[config.selection]}, saved" if improved else "",
             train_seconds, row["samples_per_second"], watch_line(device, run.seconds, config.epochs - epoch))
    if step.watch is not None:
        step.watch.epoch(row, step.scheduler.last_epoch)


def _document(config: FitConfig, run: Progress, complete: bool) -> dict[str, Any]:
    return metrics_document(stage=config.stage, script=config.script, dataset=config.dataset,
                            labels=list(config.labels), width=config.width, args=config.args, sizes=config.sizes,
                            files=config.files, epochs=run.epochs, best=run.best, complete=complete,
                            test_every_epoch=config.test_every_epoch, selection=config.selection)


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
    for path in (files.checkpoint, files.predictions, *files.tables()):
        if path is not None and files.in_progress(path).is_file():
            try:
                os.replace(files.in_progress(path), path)
            except OSError as err:
                raise WriteError(f"cannot write {path}: {os.strerror(err.errno or 0)}") from err
    write_plots(files, f"{config.stage}, seed {config.seed}", doc, names)
    write_json(files.metrics, doc)  # last: publishes checkpoint + document as one complete set
    files.in_progress(files.metrics).unlink(missing_ok=True)


def evaluate_checkpoint(model: nn.Module, data: Batches, config: FitConfig,
                        checkpoint_loaded: bool = False) -> dict[str, Any]:
    """``--train False``: the saved checkpoint's test report (`magtkd.results.test_report`).

    First-stage checkpoints are loaded here (ours or the authors' layout, their record checked);
    a fusion model comes loaded (``checkpoint_loaded``).
    """
    if not checkpoint_loaded:
        load_checkpoint(model, config.files.checkpoint, config.script, config.dataset, config.labels)
    model.eval()
    out = data.evaluate(model, "test", config)
    test = test_report(out.labels, out.preds, list(config.labels))
    log.info("%s: test report of the saved checkpoint %s:\n%s", config.stage, config.files.checkpoint,
             format_test_report(test, list(config.labels)))
    if is_main():
        write_split_outputs(config.files, {"test": out}, list(config.labels))
    return {**test, "labels": out.labels.tolist(), "preds": out.preds.tolist(),
            "paths": {"predictions_test": str(config.files.predictions_csv("test"))}}
