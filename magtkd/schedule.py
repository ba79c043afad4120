"""The authors' learning-rate schedule: linear warmup then linear decay, their curve over epochs at any
global batch (their counts in training items rescaled to this run's updates), logged in epochs
(docs/METHOD.md §2, "Schedule").
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch
from torch.optim.lr_scheduler import LambdaLR

from .runtime import GlobalBatch

if TYPE_CHECKING:  # for the annotations only: this module takes the engine's types, the engine nothing of it
    from .engine import Batches, FitConfig

log = logging.getLogger("magtkd")


class WarmupDecay:
    """LR factor: linear warmup to 1 over ``warmup`` steps, then linear decay to 0 at ``total`` steps."""

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup, self.total = int(warmup), int(total)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return float(step) / float(max(1, self.warmup))
        return max(0.0, float(self.total - step) / float(max(1, self.total - self.warmup)))


def schedule_steps(n_train: int, updates_per_epoch: int, epochs: int, per_batch: bool = False,
                   anchor_batch: int | None = None) -> tuple[int, int]:
    """(warmup, total) in scheduler steps (one per update) of the authors' schedule (docs/METHOD.md §2).

    The authors count both in training SAMPLES (warmup = ``n_train``, total = ``n_train * epochs``)
    while stepping once per batch of theirs, so in steps of another global batch the curve's length in
    epochs would grow with that batch. ``anchor_batch`` (the authors' global batch; the default of every
    training stage, ``--schedule_epochs True``) rescales their counts to this run's updates per epoch: the
    learning rate at each fraction of training is theirs whatever the global batch (processes,
    ``--grad_accum``, ``--batch_size``). ``None`` takes their counts as steps of this run (``--schedule_epochs
    False``); ``per_batch`` counts in updates (warmup = one epoch).
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


def reference_schedule(optimizer: torch.optim.Optimizer, data: Batches, config: FitConfig) -> LambdaLR:
    """The authors' schedule, stepped once per update (`schedule_steps`, docs/METHOD.md §2), for ``data``
    (`magtkd.engine.Batches`) trained as ``config`` (`magtkd.engine.FitConfig`) says: its epochs, its
    ``--grad_accum``, ``--per_batch_schedule``, ``--schedule_epochs`` and the authors' global batch.

    By default (``--schedule_epochs True``) the curve over epochs is the authors' at any global batch. The
    curve is logged in epochs; with ``--schedule_epochs False`` at a global batch that is not the authors',
    a warning says how long warmup then lasts and names the two ways back to their curve.
    """
    per_batch, authors_batch = config.per_batch_schedule, config.authors_batch
    # A stage without a reference batch (none of the scripts; tests' toys) counts in steps.
    anchor = authors_batch if config.schedule_epochs and not per_batch else None
    updates_per_epoch, global_batch = data.updates_per_epoch(config.grad_accum), data.global_batch(config.grad_accum)
    warmup, total = schedule_steps(data.n_train, updates_per_epoch, config.epochs, per_batch, anchor)
    how = ("counted in updates (--per_batch_schedule)" if per_batch else
           f"the authors' curve in epochs (their global batch {authors_batch}, --schedule_epochs True)" if anchor
           else "the authors' counts taken as steps of this run (--schedule_epochs False)")
    log.info("schedule: global batch %s, %s, %d updates per epoch: %s", global_batch, how, updates_per_epoch,
             describe_schedule(warmup, total, updates_per_epoch, config.epochs))
    if authors_batch is not None and global_batch.size != authors_batch and not per_batch and not anchor:
        log.warning("schedule: the global batch %d is not the authors' %d, so their warmup (counted in steps) "
                    "ends after %.2f epochs instead of about %d: %s", global_batch.size, authors_batch,
                    warmup / updates_per_epoch, authors_batch, schedule_choices(global_batch, authors_batch))
    return LambdaLR(optimizer, WarmupDecay(warmup, total))


def schedule_choices(global_batch: GlobalBatch, authors_batch: int) -> str:
    """The two ways to the authors' curve over epochs, for `reference_schedule`'s warning."""
    others = global_batch.processes * global_batch.grad_accum
    batch = (f"--batch_size {authors_batch // others} gives their global batch" if authors_batch % others == 0
             else f"no --batch_size gives their global batch with {others} processes x accumulation")
    return f"{batch}, or --schedule_epochs True (the default) keeps their curve over epochs at this batch " \
           "(docs/METHOD.md §2)"
