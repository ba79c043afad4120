"""The training state ``--resume True`` continues from: weights, optimizer, schedule, gradient scaler,
every random-number generator and the progress so far, saved atomically after every epoch when asked
(``--save_state``, default: as ``--resume``), in the background (docs/METHOD.md §3, "Resume state").
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

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


def _to_host(obj: Any) -> Any:
    """A copy of ``obj`` whose tensors are fresh CPU copies (on CPU too): the training goes on changing the
    originals in place while the background thread writes the copy."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_host(v) for v in obj)
    return obj


def _resume_args(args: Mapping[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in args.items() if k in RESUME_MUST_MATCH}


@dataclass
class TrainingState:
    """A run's resumable state (``--resume True``, docs/METHOD.md §6): where it lives, the flags that must
    match to resume it, and the objects it saves after every epoch (when ``enabled``) and restores."""

    path: Path
    stage: str
    args: Mapping[str, Any]  # the run's flags; those of `RESUME_MUST_MATCH` are compared on resume
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    generators: Sequence[torch.Generator]
    device: torch.device
    enabled: bool = True  # --save_state: write it after every epoch (False: a plain run writes nothing)
    _writer: threading.Thread | None = field(default=None, init=False, repr=False)
    _error: BaseException | None = field(default=None, init=False, repr=False)

    def save(self, epoch: int, progress: Mapping[str, Any]) -> None:
        """Everything needed to continue after ``epoch`` (nothing unless ``enabled``): every rank's random
        states are gathered into it (on CUDA each its own device's) and the gradient scaler's state
        (fp16 KD: its scale and growth tracker), all loadable with ``weights_only=True``.

        Rank 0 copies it to host memory here and writes it atomically in a background thread, so the
        next epoch (and the other ranks) do not wait for the disk: RoBERTa-large's state is 4.3 GB. The
        previous epoch's write is finished first; `writing` waits for the last one.
        """
        if not self.enabled:
            return
        rngs = gather_objects(_rng_state(self.generators, self.device))
        if not is_main():
            return
        self.wait()
        state = {
            "stage": self.stage, "epoch": epoch, "world_size": world_size(), "device_type": self.device.type,
            "args": _resume_args(self.args), "model": _to_host(self.model.state_dict()),
            "optimizer": _to_host(self.optimizer.state_dict()), "scheduler": _to_host(self.scheduler.state_dict()),
            "rng": rngs, "scaler": _plain(self.scaler.state_dict()) if self.scaler is not None else {},
            "progress": _plain(progress),
        }
        self._writer = threading.Thread(target=self._write, args=(state,), name="training-state")
        self._writer.start()

    def _write(self, state: Mapping[str, Any]) -> None:
        try:
            with atomic_path(self.path) as tmp:
                torch.save(state, tmp)
        except BaseException as err:  # raised in the training thread by `wait`
            self._error = err

    def wait(self) -> None:
        """Until the background write has ended; raises its error (a `WriteError` naming the file)."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """The epochs that save: on leaving, the last write has ended (its error raised, unless an error is
        already on its way, which the write's then only joins in the log)."""
        try:
            yield
        except BaseException:
            try:
                self.wait()
            except Exception as err:  # the first error is the one to report
                log.error("%s: the training state was not written either: %s", self.stage, err)
            raise
        self.wait()

    def discard_stale(self) -> None:
        """After a run that saved no state has published: an earlier run's state no longer belongs to the
        published set (resuming it would train the old run over the new one), so it is removed."""
        if not self.enabled and self.path.is_file():
            self.path.unlink()
            log.info("%s: removed the training state %s of an earlier run (this run saved none: --save_state "
                     "False)", self.stage, self.path)

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
                            "it); %s", self.stage, path,
                            "it is overwritten after this run's first epoch" if self.enabled else
                            "it is removed when this run publishes its outputs")
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
                log.info("%s: gradient scaler restored at scale %g", self.stage, self.scaler.get_scale())
            else:
                log.warning("%s: the training state holds no gradient-scaler state: the scale restarts at %g",
                            self.stage, self.scaler.get_scale())
        saved_type = state.get("device_type", self.device.type)
        if saved_type != self.device.type:
            log.warning("%s: the training state was saved on %s and this run is on %s: training continues, but "
                        "the %s random stream is not restored (not bit-identical to an uninterrupted run)",
                        self.stage, saved_type, self.device.type, "cuda")
        _set_rng_state(state["rng"][rank()], self.generators, self.device)
