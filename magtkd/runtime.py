"""Where and how a stage runs: the device (and why CUDA may be missing), precision, seeds, logging,
and the torchrun process group with its sharding helpers (docs/METHOD.md §0, §3, §7).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from .utils import UserError

log = logging.getLogger("magtkd")


def resolve_device(name: str | None) -> torch.device:
    """The device of this process; under ``torchrun`` also joins the process group (`init_distributed`)."""
    if name is None or name == "":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except (RuntimeError, ValueError):
            raise UserError(f"--device {name}: not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} requested but CUDA is not available{cuda_unavailable_hint()}")
    if name is None and device.type == "cpu" and gpu_present():
        log.warning("a GPU seems present but CUDA is not available, so this run uses the CPU%s",
                    cuda_unavailable_hint())
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                        f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda devices are supported")
    return init_distributed(device)


def gpu_present() -> bool:
    """An NVIDIA driver is installed (its device nodes or ``nvidia-smi`` exist); says nothing of CUDA."""
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidia0").exists() \
        or shutil.which("nvidia-smi") is not None


def cuda_unavailable_hint() -> str:
    """Why CUDA is likely unavailable, for the error or warning: with a GPU present, most often a torch
    wheel built for a newer CUDA than the driver supports (README, Installation)."""
    if not gpu_present():
        return " on this machine (no NVIDIA driver found); use --device cpu"
    built = torch.version.cuda or "none (a CPU-only build)"
    return (f": a GPU seems present, but this torch {torch.__version__} was built for CUDA {built}; the driver's "
            "CUDA version is in the header of `nvidia-smi` and must be at least that. Install a torch wheel for "
            "your driver (https://pytorch.org/get-started/locally/, e.g. pip install torch --index-url "
            "https://download.pytorch.org/whl/cu126) or update the driver; or use --device cpu")


def set_precision(device: torch.device, tf32: bool) -> None:
    """``--tf32``: fp32 matrix products on CUDA in TF32 (True) or in full fp32 (False, the default, as the
    authors' fp32 runs: PyTorch's default); cuDNN convolutions keep PyTorch's default (docs/METHOD.md §3,
    precision table). Nothing is set on CPU."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32


def autocast(device: torch.device, amp: bool, dtype: torch.dtype = torch.bfloat16):
    """Autocast to ``dtype`` on CUDA (when enabled); plain fp32 on CPU."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def set_seed(seed: int, deterministic: bool = True, fixed_shapes: bool = False) -> None:
    """Seed Python, numpy and torch, as the authors' scripts do (docs/METHOD.md §7).

    ``PYTHONHASHSEED`` is exported for child processes (data-loading workers,
    subprocesses); the running interpreter's hash seed was fixed at its start.
    ``deterministic`` sets ``cudnn.deterministic = True`` and ``cudnn.benchmark = False``
    (the authors' setting); False lets cuDNN pick non-deterministic kernels, and tune them
    (``benchmark``) only for a stage whose input shapes never change (``fixed_shapes``: the video
    encoder's 8 frames): text, audio and dialogue lengths vary batch to batch, and benchmark mode
    would re-tune for every new length.
    """
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic and fixed_shapes


def setup_logging() -> None:
    """One console format for all stages; safe to call more than once."""
    root = logging.getLogger()
    if not any(getattr(h, "_magtkd", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        handler._magtkd = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.INFO)


def log_start(stage: str, flags: Mapping[str, Any], device: torch.device,
              sizes: Mapping[str, Any] | None = None) -> None:
    """Log the resolved flags (``vars(args)``), device and dataset sizes at the start of a stage."""
    log.info("%s: arguments %s", stage, {k: str(v) for k, v in sorted(flags.items())})
    log.info("%s: device %s world_size=%d", stage, device, world_size())
    if sizes:
        log.info("%s: sizes %s", stage, dict(sizes))



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
        local_rank, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local_rank >= count:
            raise UserError(f"torchrun started more processes per node ({os.environ.get('LOCAL_WORLD_SIZE', '?')}) "
                            f"than this machine has GPUs ({count}): use --nproc_per_node {count} or fewer")
        device = torch.device("cuda", local_rank)
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


def barrier() -> None:
    """Wait until every rank arrives here (nothing on one process)."""
    if world_size() > 1:
        torch.distributed.barrier()


def one_process(stage: str) -> None:
    """A one-process stage (the fusion: minutes) under torchrun: rank 0 leaves the process group and runs it
    alone; the other processes exit at once with status 0 and print nothing, so ``torchrun ...
    multimodal_fusion.py`` does what ``python`` does, without a launcher error (docs/METHOD.md §5, §6)."""
    if world_size() <= 1:
        return
    own = rank()
    if own == 0:
        log.warning("%s runs in one process (it takes minutes): under torchrun rank 0 runs it alone and the "
                    "other %d process(es) exit", stage, world_size() - 1)
    torch.distributed.destroy_process_group()
    if own != 0:
        sys.exit(0)


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


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """The rows of ``tensor`` of every rank, rank after rank, in the autograd graph (``tensor`` itself on
    one process). Every rank must pass as many rows (the DistributedSampler pads the shards to one length).

    The backward pass sums every rank's gradient for this rank's rows
    (`torch.distributed.nn.functional.all_gather`). So a loss term computed from the gathered rows, the
    same on every rank, gets under DistributedDataParallel's averaging the gradient it has in one process
    holding all the rows: the relational KD terms over the global batch (docs/METHOD.md §3).
    """
    if world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor))


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
