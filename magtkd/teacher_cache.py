"""The KD teacher computed once (docs/METHOD.md §3, "The teacher computed once"): the frozen text model's
representation and logits for every training utterance, from one pass at the run's precision and with
its prompt, cached beside its checkpoint and keyed by that checkpoint, the prompt, the precision and the
data; the KD steps then read them instead of running RoBERTa-large on every batch.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from . import runtime
from .artifacts import atomic_path, teacher_outputs_path
from .dataset import Sample
from .engine import FitConfig
from .loaders import SampleBatches, SampleDataset, in_dataset_order, make_loader, to_device
from .utils import NonFiniteError

log = logging.getLogger("magtkd")

FORMAT = 1  # what the cache file holds; a file of another format is computed again


class TeacherOutputs:
    """The teacher's outputs for every training sample, on the device. ``encode(batch)`` gives the frozen
    teacher's ``(representation, logits)`` for the batch's samples (rows ``batch["index"]``), so the KD
    ``objective`` reads them as it would call the teacher."""

    def __init__(self, rep: torch.Tensor, logits: torch.Tensor) -> None:
        self.rep, self.logits = rep, logits

    def encode(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        index = batch["index"]
        return self.rep[index], self.logits[index]


def cache_key(checkpoint: Path, field: Any, samples: Sequence[Sample], device: torch.device, amp: bool,
              amp_dtype: torch.dtype) -> dict[str, Any]:
    """What the outputs depend on: the teacher checkpoint (resolved path, size, modification time), its
    tokenizer folder and prompt variant (``field``, a `magtkd.loaders.TextField`), the precision of the
    pass (as `magtkd.runtime.autocast` applies it) and every training sample's text and speakers."""
    stat = checkpoint.stat()
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(repr((sample.utterance.key, sample.texts, sample.speakers)).encode("utf-8", "surrogatepass"))
    autocast = amp and device.type == "cuda"
    return {"format": FORMAT, "checkpoint": str(checkpoint.resolve()), "checkpoint_bytes": stat.st_size,
            "checkpoint_mtime_ns": stat.st_mtime_ns, "tokenizer": str(getattr(field.tokenizer, "name_or_path", "")),
            "prompt": field.prompt, "precision": f"{device.type} " + (f"{amp_dtype} autocast" if autocast else "fp32"),
            "samples": len(samples), "samples_sha256": digest.hexdigest()}


def teacher_outputs(teacher: nn.Module, field: Any, samples: Sequence[Sample], checkpoint: Path,
                    data: SampleBatches, config: FitConfig) -> TeacherOutputs:
    """The outputs of ``teacher`` (frozen, eval mode; loaded from ``checkpoint``) for every sample of
    ``samples`` (the training split, in the order of ``data``'s training loader), read from the cache
    (`magtkd.artifacts.teacher_outputs_path`) when its key matches, else computed in one pass over
    ``field``'s prompts at ``data``'s batch size and workers and ``config``'s precision, then cached.

    Under torchrun each rank computes its shard and every rank gets all outputs; rank 0 writes the file,
    and the cache counts as found only when every rank found it. Non-finite outputs (an fp16 overflow in
    the teacher) are an error naming the first utterance.
    """
    path, device = teacher_outputs_path(checkpoint), data.device
    key = cache_key(checkpoint, field, samples, device, config.amp, config.amp_dtype)
    saved = _read(path, key, config.stage)
    if all(runtime.gather_objects(saved is not None)):
        log.info("%s: the teacher's outputs for the %d training utterances read from %s", config.stage,
                 len(samples), path)
        rep, logits = saved
    else:
        loader = data.loaders["train"]
        rep, logits = _compute(teacher, field, samples, loader.batch_size, loader.num_workers, device, config)
        _check_finite(rep, logits, samples, config.stage)
        if runtime.is_main():
            with atomic_path(path) as tmp:
                torch.save({"key": key, "rep": rep, "logits": logits}, tmp)
            log.info("%s: the teacher's outputs for the %d training utterances computed once and cached in %s",
                     config.stage, len(samples), path)
    return TeacherOutputs(rep.to(device), logits.to(device))


@torch.inference_mode()
def _compute(teacher: nn.Module, field: Any, samples: Sequence[Sample], batch_size: int, num_workers: int | None,
             device: torch.device, config: FitConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of the teacher over ``samples`` (this rank's shard under torchrun), as fp32 on the host.

    The loader draws from its own generator and the teacher in eval mode draws nothing, so the run's
    random streams are those of the steps that ran the teacher themselves.
    """
    loader = make_loader(SampleDataset(samples, [field]), batch_size, shuffle=False, num_workers=num_workers,
                         device=device)
    index, reps, logits = [], [], []
    for batch in runtime.progress(loader, desc=f"{config.stage}: teacher outputs"):
        index.append(batch["index"])
        batch = to_device(batch, device)
        with runtime.autocast(device, config.amp, config.amp_dtype):
            rep, logit = teacher.encode(batch)
        reps.append(rep.float())
        logits.append(logit.float())
    empty = np.zeros((0,), dtype=np.float32)  # a rank whose shard is empty (more ranks than samples)
    ordered = in_dataset_order(torch.cat(index).numpy() if index else np.zeros(0, dtype=np.int64),
                               {"rep": torch.cat(reps).cpu().numpy() if reps else empty,
                                "logits": torch.cat(logits).cpu().numpy() if logits else empty})
    return torch.from_numpy(ordered["rep"]), torch.from_numpy(ordered["logits"])


def _check_finite(rep: torch.Tensor, logits: torch.Tensor, samples: Sequence[Sample], stage: str) -> None:
    bad = ~(torch.isfinite(rep).all(1) & torch.isfinite(logits).all(1))
    if bool(bad.any()):
        first = samples[int(bad.nonzero()[0])].utterance
        raise NonFiniteError(f"{stage}: the teacher's outputs are not finite for {int(bad.sum())} training "
                             f"utterance(s), the first {first.split} {first.key} ({first.source or 'CSV'} row "
                             f"{first.row}); the teacher overflows (fp16: try --amp False) or text.bin holds NaN/inf")


def _read(path: Path, key: Mapping[str, Any], stage: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached outputs when ``path`` holds them for ``key``; None (logged) when it does not, or holds
    something unreadable, of the wrong shape or not finite: a cache is computed again, never trusted."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        log.warning("%s: the teacher cache %s cannot be read (%s): computing it again", stage, path, err)
        return None
    if not isinstance(saved, dict) or saved.get("key") != dict(key):
        log.info("%s: the teacher cache %s was computed for another teacher checkpoint, prompt, precision or "
                 "data: computing it again", stage, path)
        return None
    rep, logits = saved.get("rep"), saved.get("logits")
    n = key["samples"]
    if not (torch.is_tensor(rep) and torch.is_tensor(logits) and rep.dim() == logits.dim() == 2
            and len(rep) == len(logits) == n and bool(torch.isfinite(rep).all() & torch.isfinite(logits).all())):
        log.warning("%s: the teacher cache %s does not hold finite outputs for %d utterances: computing it again",
                    stage, path, n)
        return None
    return rep, logits
