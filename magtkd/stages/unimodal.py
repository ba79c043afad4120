"""Stages 1, 2 and 4: fine-tune one encoder (text, audio or video) on emotion labels.

Reads the split CSVs (and, for video, the stored frames), writes
``<save_dir>/<modality>.bin`` (plain state_dict) and ``<modality>.json`` (arguments,
per-epoch metrics, selected epoch, test report). ``--train False`` evaluates the
saved checkpoint on test only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from .. import modalities
from ..cli import log_start, parse, resolve_device, set_seed, setup_logging
from ..models.build import load_checkpoint
from ..recipes import DatasetSpec
from ..report import SubstitutionReport
from ..train import evaluate, fit
from .common import report_suffix, classification_step, load_samples, loaders_for, training_parser

log = logging.getLogger("magtkd")


def main(modality: str, spec: DatasetSpec, script_dir: Path, argv: Sequence[str] | None = None,
         description: str | None = None) -> dict:
    # Arguments
    args = parse(training_parser(spec, script_dir, description, modality), argv)
    setup_logging()
    device = resolve_device(args.device)
    set_seed(args.seed)
    info = modalities.MODALITIES[modality]
    checkpoint = Path(args.save_dir) / info.checkpoint

    # Data
    samples = load_samples(spec, args.data_dir)
    log_start(f"{spec.name} {modality}", args, device, {s: len(v) for s, v in samples.items()})

    # Model
    model, field = modalities.build(modality, spec.num_classes, args)
    step = classification_step(model, info.forward)
    report = SubstitutionReport()

    # Loop (or evaluation of the saved checkpoint)
    if not args.train:
        load_checkpoint(model, checkpoint, f"{spec.name}/{info.script}")
        model.to(device).eval()
        loader = loaders_for(samples, [field], args, ("test",))["test"]
        result = evaluate(stage=modality, step=step, loader=loader, device=device, amp=args.amp,
                          label_names=spec.labels, report=report)
    else:
        model.to(device)
        result = fit(
            stage=f"{spec.name} {modality}", model=model, step=step,
            loaders=loaders_for(samples, [field], args), epochs=args.epochs,
            learning_rate=args.learning_rate, device=device, amp=args.amp, checkpoint=checkpoint,
            label_names=spec.labels, args=vars(args), per_batch_schedule=args.per_batch_schedule,
            report=report,
        )

    # Artifact: the checkpoint and metrics JSON are written by fit(); the report here
    if modality == "audio":
        report.write(Path(args.save_dir) / f"{checkpoint.stem}{report_suffix(args.train)}")
    return result
