"""fp16's gradient scaler in the training loop (docs/METHOD.md §3, "fp16 and its gradient scaler"): the
updates it skips, counted on the device, logged and bounded, and the inputs checked first, since the scaler
would otherwise skip their updates silently.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch

from .utils import NonFiniteError

log = logging.getLogger("magtkd")

MAX_SKIPPED_IN_A_ROW = 20  # fp16: consecutive skipped updates that stop a run (from 2**16 the scale is then 2**-4)


class ScalerSkips:
    """fp16 KD's skipped updates in an epoch (docs/METHOD.md §3, "fp16 and its gradient scaler"): an update
    whose gradients are not finite (their norm is not: an overflow, or a non-finite loss) is skipped by the
    gradient scaler, which halves its scale. The flags stay on the device and are read with the loss; the
    skips are logged there, and `MAX_SKIPPED_IN_A_ROW` of them in a row stop the run: gradients that stay
    non-finite while the scale shrinks to 2**-4 are no overflow."""

    def __init__(self, stage: str, epoch: int) -> None:
        self.stage, self.epoch = stage, epoch
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.skipped, self.in_a_row = 0, 0

    def note(self, update: int, grad_norm: torch.Tensor) -> torch.Tensor:
        skipped = ~torch.isfinite(grad_norm)
        self.pending.append((update, skipped))
        return skipped

    def read(self, scaler: torch.amp.GradScaler, updates: int) -> None:
        flags = torch.stack([flag for _, flag in self.pending]).tolist() if self.pending else []
        skipped = [update for (update, _), flag in zip(self.pending, flags) if flag]
        for (update, _), flag in zip(self.pending, flags):
            self.in_a_row = self.in_a_row + 1 if flag else 0
            if self.in_a_row >= MAX_SKIPPED_IN_A_ROW:
                raise NonFiniteError(
                    f"{self.stage}: {MAX_SKIPPED_IN_A_ROW} updates in a row skipped by the fp16 gradient "
                    f"scaler at epoch {self.epoch} (up to update {update} of {updates}): the gradients stay "
                    f"non-finite while the scale shrinks (now {scaler.get_scale():g}), which no overflow explains; "
                    "stopped before publishing anything (a previous complete set is kept). Check the loss flags "
                    "(learning rate, --tau), or try --amp False")
        self.pending = []
        if skipped:
            self.skipped += len(skipped)
            log.warning("%s epoch %d: update(s) %s of %d skipped by the fp16 gradient scaler (gradients not finite); "
                        "scale now %g", self.stage, self.epoch, ", ".join(map(str, skipped)), updates,
                        scaler.get_scale())


def check_finite_inputs(group: Sequence[Any], stage: str, epoch: int, update: int) -> None:
    """fp16 KD: the batches' floating-point inputs must be finite, since the scaler would skip their
    updates silently. They come from the loaders on the host, so this costs no device round trip."""
    for batch in group:
        if not isinstance(batch, Mapping):
            continue
        for name, value in batch.items():
            if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                rows = (~torch.isfinite(value)).reshape(len(value), -1).any(1).nonzero().flatten()
                where = batch["index"][rows].tolist() if "index" in batch else rows.tolist()
                raise NonFiniteError(f"{stage}: {name} of training sample(s) {where} (0-based, CSV order) "
                                     f"holds NaN/inf at epoch {epoch}, update {update}; stopped before "
                                     "publishing anything (a previous complete set is kept)")
