"""Pieces the first-stage scripts share: their flags, their data, their step functions."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..cli import base_parser, str2bool
from ..data import Sample, build_samples, load_split
from ..loaders import SampleDataset, make_loader
from ..modalities import Forward
from ..recipes import SPLITS, DatasetSpec


def training_parser(spec: DatasetSpec, script_dir: Path, description: str | None,
                    lr_key: str) -> argparse.ArgumentParser:
    """The reference's first-stage flags (SPEC section 2 defaults) plus ours."""
    parser = base_parser(spec, script_dir, description, epochs=10, batch_size=4)
    parser.add_argument("--learning_rate", type=float, default=spec.learning_rates[lr_key])
    parser.add_argument("--per_batch_schedule", type=str2bool, default=False,
                        help="count warmup/total steps in batches instead of the reference's samples")
    parser.add_argument("--amp", type=str2bool, default=True, help="bf16 autocast on CUDA (CPU runs fp32)")
    return parser


def load_samples(spec: DatasetSpec, data_dir: Path) -> dict[str, list[Sample]]:
    """Dialogue-prefix samples per split, in CSV order (SPEC section 1)."""
    return {split: build_samples(load_split(spec, data_dir, split)) for split in SPLITS}


def loaders_for(samples: dict[str, list[Sample]], fields: list, args: argparse.Namespace,
                splits: tuple[str, ...] = SPLITS) -> dict:
    return {
        split: make_loader(SampleDataset(samples[split], fields), args.batch_size,
                           shuffle=(split == "train"), num_workers=args.num_workers, seed=args.seed)
        for split in splits
    }


def classification_step(model: nn.Module, forward: Forward):
    """step(batch, train) -> (cross-entropy loss, logits) for a single encoder."""

    def step(batch: dict, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        _, logits = forward(model, batch)
        return F.cross_entropy(logits.float(), batch["labels"]), logits

    return step


def report_suffix(train: bool) -> str:
    """Evaluation-only runs keep their own report, so the training run's stays intact."""
    return "_substitutions.tsv" if train else "_eval_substitutions.tsv"
