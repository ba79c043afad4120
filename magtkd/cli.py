"""What every stage script shares: flags, device choice, seeding, logging."""

from __future__ import annotations

import argparse
import logging
import random
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from .recipes import DatasetSpec

log = logging.getLogger("magtkd")


def str2bool(value: str | bool) -> bool:
    """Parse ``--train False`` properly (the reference's ``type=bool`` made any value True)."""
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in {"true", "1", "yes", "y", "t"}:
        return True
    if lowered in {"false", "0", "no", "n", "f"}:
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults, and keep the stage docstring's layout (it holds the exact command)."""


def paths_parser(spec: DatasetSpec, script_dir: str | Path, description: str | None) -> argparse.ArgumentParser:
    """Flags every stage has: folders (defaulting relative to the script's folder), device, workers."""
    script_dir = Path(script_dir)
    parser = argparse.ArgumentParser(
        description=description, formatter_class=HelpFormatter
    )
    parser.add_argument("--data_dir", type=Path, default=spec.default_data_dir(script_dir),
                        help="the dataset folder (release + prepared CSVs)")
    parser.add_argument("--pretrained_dir", type=Path, default=spec.default_pretrained_dir(script_dir),
                        help="folder holding the four pretrained model folders")
    parser.add_argument("--save_dir", type=Path, default=spec.default_save_dir(script_dir),
                        help="checkpoints (.bin) and their metrics JSON")
    parser.add_argument("--feature_dir", type=Path, default=spec.default_feature_dir(script_dir),
                        help="stored frames and first-stage feature pickles")
    parser.add_argument("--device", default=None, help="cuda, cuda:1 or cpu; None = CUDA when available, else CPU")
    parser.add_argument("--num_workers", type=int, default=0, help="data-loading worker processes")
    return parser


def base_parser(
    spec: DatasetSpec, script_dir: str | Path, description: str | None, *, epochs: int,
    batch_size: int, seed: int = 2024,
) -> argparse.ArgumentParser:
    """Flags of every training stage: the reference's names plus the folder flags."""
    parser = paths_parser(spec, script_dir, description)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--batch_size", type=int, default=batch_size)
    parser.add_argument("--seed", type=int, default=seed)
    parser.add_argument("--train", type=str2bool, default=True,
                        help="True: train; False: evaluate the saved checkpoint on test")
    return parser


def resolve_device(name: str | None) -> torch.device:
    if name is None or name == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name} requested but CUDA is not available on this machine")
    return device


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def setup_logging() -> None:
    """One console format for all stages; safe to call more than once."""
    root = logging.getLogger()
    if not any(getattr(h, "_magtkd", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        handler._magtkd = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    # One tqdm bar per epoch is ours; transformers' per-load "Loading weights" bars are noise.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def log_start(stage: str, args: argparse.Namespace, device: torch.device,
              sizes: Mapping[str, int] | None = None) -> None:
    """Log resolved arguments, device and dataset sizes at the start of a stage."""
    log.info("%s: arguments %s", stage, {k: str(v) for k, v in sorted(vars(args).items())})
    log.info("%s: device %s", stage, device)
    if sizes:
        log.info("%s: sizes %s", stage, dict(sizes))


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    return parser.parse_args(None if argv is None else list(argv))
