"""Learning-rate schedules (SPEC section 2, "Schedule")."""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LambdaLR


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
    after 4 of 10 epochs and the rate never decays far (SPEC section 2).
    ``per_batch=True`` counts both in batches instead (warmup = one epoch).
    """
    if per_batch:
        return linear_warmup_decay(optimizer, batches_per_epoch, batches_per_epoch * epochs)
    return linear_warmup_decay(optimizer, n_train, n_train * epochs)
