"""Where and how a stage runs: the device (and why CUDA may be missing), precision, seeds, logging,
and the torchrun process group with its sharding helpers (docs/METHOD.md §0, §3, §7).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from .utils import UserError

log = logging.getLogger("magtkd")

DIST_TIMEOUT_MIN = 30.0  # --dist_timeout: minutes a collective waits for the slowest rank (torch: 10 on NCCL)


def resolve_device(name: str | None, dist_timeout: float = DIST_TIMEOUT_MIN) -> torch.device:
    """The device of this process; under ``torchrun`` also joins the process group (`init_distributed`,
    collectives time out after ``dist_timeout`` minutes, ``--dist_timeout``).

    The default (``name`` None) is CUDA when available, else the CPU; but when an NVIDIA driver is present
    and CUDA is not available, that is a mismatch between the driver and the torch wheel, not a choice:
    one line names both and the install command that fits (`CudaMismatch`). ``--device cpu`` stays a
    deliberate choice.
    """
    if name is None or name == "":
        if not torch.cuda.is_available() and gpu_present():
            raise CudaMismatch(f"an NVIDIA GPU is present but this torch cannot use it{cuda_unavailable_hint()}")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except (RuntimeError, ValueError):
            raise UserError(f"--device {name}: not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CudaMismatch(f"--device {name} requested but CUDA is not available{cuda_unavailable_hint()}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                        f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda devices are supported")
    return init_distributed(device, dist_timeout)


class CudaMismatch(UserError):
    """CUDA is not available where a GPU was asked for or an NVIDIA driver is present (README, Installation)."""


def gpu_present() -> bool:
    """An NVIDIA driver is installed (its device nodes or ``nvidia-smi`` exist); says nothing of CUDA."""
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidia0").exists() \
        or shutil.which("nvidia-smi") is not None


def driver_version() -> str | None:
    """The NVIDIA kernel driver's version (``580.65.06``), from /proc or ``nvidia-smi``; None if unknown."""
    proc = Path("/proc/driver/nvidia/version")
    with contextlib.suppress(OSError):
        found = re.search(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)", proc.read_text())
        if found:
            return found.group(1)
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.split()
            if out and re.fullmatch(r"\d+\.\d+(\.\d+)?", out[0]):
                return out[0]
    return None


# The oldest Linux driver each CUDA wheel of torch 2.11 runs on (NVIDIA's CUDA compatibility tables: a
# CUDA 12.x runtime also runs on any 525+ driver through minor-version compatibility), newest first.
WHEELS_BY_DRIVER = ((580, "cu130"), (570, "cu128"), (525, "cu126"))
INSTALL = ("pip install torch=={torch} torchvision=={vision} torchaudio=={torch} "
           "--index-url https://download.pytorch.org/whl/{wheel}")


def install_command(driver: str | None) -> str | None:
    """The pip command that installs this torch for ``driver`` (README, Installation); None when no wheel
    of it runs on that driver (older than 525) or the driver is unknown."""
    if driver is None:
        return None
    major = int(driver.split(".")[0])
    wheel = next((w for oldest, w in WHEELS_BY_DRIVER if major >= oldest), None)
    if wheel is None:
        return None
    torch_version = torch.__version__.split("+")[0]
    try:
        from importlib.metadata import version

        vision = version("torchvision").split("+")[0]
    except Exception:  # torchvision missing: the pin of requirements.txt
        vision = "0.26.0"
    return INSTALL.format(torch=torch_version, vision=vision, wheel=wheel)


def cuda_unavailable_hint() -> str:
    """Why CUDA is likely unavailable, for the one-line error: with a driver present, most often a torch
    wheel built for a newer CUDA than the driver supports (README, Installation)."""
    if not gpu_present():
        return " on this machine (no NVIDIA driver found); use --device cpu"
    built = torch.version.cuda or "none (a CPU-only build)"
    driver = driver_version()
    command = install_command(driver)
    if command is not None and torch.version.cuda and command.endswith(f"cu{torch.version.cuda.replace('.', '')}"):
        fix = ("the wheel fits this driver, so check that the GPU is visible (`nvidia-smi`, CUDA_VISIBLE_DEVICES) "
               "and that the driver is loaded")
    elif command is not None:
        fix = f"install the wheel for this driver: {command}"
    elif driver is not None:
        fix = "this driver is older than any CUDA wheel of this torch supports (525): update the driver"
    else:
        fix = ("see the header of `nvidia-smi` for the driver's CUDA version and install the matching wheel "
               "(README, Installation)")
    return (f": driver {driver or 'version unknown'}, this torch {torch.__version__} was built for CUDA {built}; "
            f"{fix}; or run on the CPU deliberately with --device cpu (README, Installation)")


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


def init_distributed(device: torch.device, dist_timeout: float = DIST_TIMEOUT_MIN) -> torch.device:
    """Join the process group ``torchrun`` describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT).

    One process per device: CUDA processes take ``cuda:LOCAL_RANK`` and NCCL, CPU
    processes gloo. A collective waits at most ``dist_timeout`` minutes for the slowest rank
    (``--dist_timeout``); the group is destroyed when the process exits. Without ``torchrun``
    (WORLD_SIZE unset or 1) the device is returned unchanged. Ranks other than 0 log warnings only.
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
        if not dist_timeout > 0:
            raise UserError(f"--dist_timeout {dist_timeout}: expected minutes > 0")
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             timeout=datetime.timedelta(minutes=dist_timeout))
        atexit.register(destroy_distributed)
    if not is_main():
        logging.getLogger().setLevel(logging.WARNING)
    return device


def destroy_distributed() -> None:
    """Leave the process group (at exit: NCCL's resources are released, no warning about a group left open)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        with contextlib.suppress(Exception):  # exiting anyway: a peer already gone must not turn exit into an error
            torch.distributed.destroy_process_group()


def loader_workers(requested: int | None, device: torch.device) -> int:
    """``--num_workers``: as given, or by default 4 worker processes per training process on CUDA (capped by
    the CPUs each of this machine's processes gets), so batches are prefetched while the GPU computes; 0 on
    the CPU, where workers would take the cores the model computes on (docs/METHOD.md §2, "Input")."""
    if requested is not None:
        return requested
    if device.type != "cuda":
        return 0
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(DEFAULT_CUDA_WORKERS, cpus // max(per_node, 1) - 1))


DEFAULT_CUDA_WORKERS = 4


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
