"""Plain state_dict checkpoints: read them safely and say exactly how one does not fit a model."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import nn


class CheckpointError(RuntimeError):
    """A checkpoint that is missing or does not fit the model it is loaded into."""


def read_state_dict(path: str | Path, produced_by: str) -> dict[str, torch.Tensor]:
    """``torch.load`` (tensors only) a plain state_dict; a missing file names the stage that writes it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found: it is written by {produced_by}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a state_dict (got {type(state).__name__})")
    return state


def mismatch(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """Missing / unexpected keys and shape mismatches of ``state`` against ``model`` ('' if it fits)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state) if tuple(state[k].shape) != tuple(own[k].shape)
    )

    def show(keys: list[str]) -> str:
        return ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8} more)" if len(keys) > 8 else "")

    problems = [f"missing keys: {show(missing)}" if missing else "",
                f"unexpected keys: {show(unexpected)}" if unexpected else "",
                f"shape mismatches: {show(shapes)}" if shapes else ""]
    return "; ".join(p for p in problems if p)
