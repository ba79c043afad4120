"""The training state ``--resume True`` continues from: weights, optimizer, schedule, gradient scaler,
every random-number generator and the progress so far, saved atomically after every epoch
(docs/METHOD.md §6, "Restarts").
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .artifacts import atomic_path, json_default
from .runtime import gather_objects, is_main, rank, world_size
from .utils import UserError

log = logging.getLogger("magtkd")


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
                     "reference_kd_clip", "paper_attention", "padding_speaker", "selection")


def _resume_args(args: Mapping[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in args.items() if k in RESUME_MUST_MATCH}


@dataclass
class TrainingState:
    """A run's resumable state (``--resume True``, docs/METHOD.md §6): where it lives, the flags that must
    match to resume it, and the objects it saves after every epoch and restores."""

    path: Path
    stage: str
    args: Mapping[str, Any]  # the run's flags; those of `RESUME_MUST_MATCH` are compared on resume
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    generators: Sequence[torch.Generator]
    device: torch.device

    def save(self, epoch: int, progress: Mapping[str, Any]) -> None:
        """Everything needed to continue after ``epoch``, written atomically by rank 0: every rank's random
        states are gathered into it (on CUDA each its own device's) and the gradient scaler's state
        (fp16 KD: its scale and growth tracker), all loadable with ``weights_only=True``."""
        rngs = gather_objects(_rng_state(self.generators, self.device))
        if not is_main():
            return
        state = {
            "stage": self.stage, "epoch": epoch, "world_size": world_size(), "device_type": self.device.type,
            "args": _resume_args(self.args),
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "rng": rngs,
            "scaler": _plain(self.scaler.state_dict()) if self.scaler is not None else {},
            "progress": _plain(progress),
        }
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)

    def load(self, resume: bool) -> dict[str, Any] | None:
        """The saved state when ``resume`` (``None`` if there is none yet: training starts at epoch 1).

        Without ``--resume`` an existing state file is never used: the log says it is
        ignored and will be overwritten. A state saved with other training flags or
        another number of processes is refused with a message naming them.
        """
        path = self.path
        if not resume:
            if path.exists():
                log.warning("%s: ignoring the training state %s of an earlier run (pass --resume True to continue "
                            "it); it is overwritten after this run's first epoch", self.stage, path)
            return None
        if not path.is_file():
            log.info("%s: --resume True but no training state at %s yet: starting at epoch 1", self.stage, path)
            return None
        state = torch.load(path, map_location="cpu", weights_only=True)
        now = _resume_args(self.args)
        differ = {k: (state["args"].get(k), now[k]) for k in now if state["args"].get(k) != now[k]}
        if state["world_size"] != world_size():
            # Each rank's data shard and random streams belong to the world size they were drawn under.
            raise UserError(f"{path} was saved by {state['world_size']} process(es) and this run has "
                            f"{world_size()}: resume with torchrun --nproc_per_node {state['world_size']} (or python "
                            "for 1), or delete the file to start over")
        if differ:
            raise UserError(f"{path} was saved with different settings ("
                            + ", ".join(f"--{k} {old} then, {new} now" for k, (old, new) in sorted(differ.items()))
                            + "); resume with the same flags, or delete the file to start over")
        return state

    def restore(self, state: Mapping[str, Any]) -> None:
        """Load a state from `load` into this run's objects.

        Saved on another kind of device (cuda then, cpu now, or the reverse): the weights, optimizer,
        schedule and scaler carry over, but the device's random stream cannot, so training continues
        correctly but not bit-identically to an uninterrupted run; the log says so.
        """
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        saved_scaler = state.get("scaler") or {}
        if self.scaler is not None and self.scaler.is_enabled():
            if saved_scaler:
                self.scaler.load_state_dict(saved_scaler)
            else:
                log.warning("%s: the training state holds no gradient-scaler state: the scale restarts at %g",
                            self.stage, self.scaler.get_scale())
        saved_type = state.get("device_type", self.device.type)
        if saved_type != self.device.type:
            log.warning("%s: the training state was saved on %s and this run is on %s: training continues, but "
                        "the %s random stream is not restored (not bit-identical to an uninterrupted run)",
                        self.stage, saved_type, self.device.type, "cuda")
        _set_rng_state(state["rng"][rank()], self.generators, self.device)
