"""Watching a run: ``--tensorboard DIR`` event files and the end of each epoch's log line (ETA, peak
memory on CUDA).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch


class Watch:
    """``--tensorboard DIR``: a SummaryWriter on rank 0 under ``DIR/<checkpoint stem>`` (one folder per
    stage and seed). Per update: ``train/loss``, ``train/learning_rate``, ``train/grad_norm`` (before
    clipping) and, with a scaler, ``train/grad_scale``; per epoch: ``epoch/train_loss``, ``dev/*``,
    ``test/*`` and ``epoch/samples_per_second``. The step is the scheduler's update count, which a
    resumed run continues. Device scalars are buffered and read in one transfer when `magtkd.engine.run_updates` reads the loss (every 10 updates).
    """

    def __init__(self, folder: Path, name: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(folder) / name))
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor, float]] = []

    def update(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float) -> None:
        self.pending.append((step, loss, grad_norm, lr))

    def flush(self, scaler: torch.amp.GradScaler | None) -> None:
        if not self.pending:
            return
        values = torch.stack([torch.stack([loss.double(), norm.double().to(loss.device)])
                              for _, loss, norm, _ in self.pending]).tolist()
        for (step, _, _, lr), (loss, norm) in zip(self.pending, values):
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/grad_norm", norm, step)
            self.writer.add_scalar("train/learning_rate", lr, step)
        if scaler is not None and scaler.is_enabled():
            self.writer.add_scalar("train/grad_scale", scaler.get_scale(), self.pending[-1][0])
        self.pending = []

    def epoch(self, row: Mapping[str, Any], step: int) -> None:
        epoch = int(row["epoch"])
        self.writer.add_scalar("epoch/train_loss", row["train_loss"], epoch)
        self.writer.add_scalar("epoch/samples_per_second", row["samples_per_second"], epoch)
        self.writer.add_scalar("epoch/update", step, epoch)
        for split in ("dev", "test"):
            for key in ("accuracy", "weighted_f1"):
                if split in row:
                    self.writer.add_scalar(f"{split}/{key}", row[split][key], epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def watch_line(device: torch.device, epoch_seconds: Sequence[float], remaining: int) -> str:
    """The end of an epoch's log line: the stage's ETA (remaining epochs x mean epoch time of this run)
    and, on CUDA, the epoch's peak memory."""
    line = f" | ETA {remaining * sum(epoch_seconds) / len(epoch_seconds) / 60:.1f} min" if remaining else ""
    if device.type == "cuda":
        line += f" | peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return line
