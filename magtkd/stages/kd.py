"""Stages 5-6: distil the text teacher into the audio or video student (SPEC section 3).

Teacher: the text encoder from ``text.bin``, frozen, eval mode, run under no-grad.
Student: audio initialised from ``audio.bin``; video from the pretrained
TimeSformer (not video.bin, as in the reference). Objective per dataset:
IEMOCAP ``CE + L_logit``; MELD ``CE + 0.1 L_logit + L_feat``. Writes
``<save_dir>/{teacher}_KD_{student}.bin`` and its metrics JSON.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .. import modalities
from ..cli import log_start, parse, resolve_device, set_seed, setup_logging
from ..losses import feature_kd_loss, logit_kd_loss
from ..models.build import load_checkpoint
from ..recipes import DatasetSpec
from ..report import SubstitutionReport
from ..train import evaluate, fit
from .common import report_suffix, load_samples, loaders_for, training_parser

log = logging.getLogger("magtkd")


def main(spec: DatasetSpec, script_dir: Path, argv: Sequence[str] | None = None,
         description: str | None = None) -> dict:
    # Arguments
    parser = training_parser(spec, script_dir, description, "kd")
    parser.add_argument("--student", choices=("audio", "video"), required=True)
    parser.add_argument("--teacher", choices=("text",), default="text")
    parser.add_argument("--logit_weight", type=float, default=spec.kd_logit_weight,
                        help="weight of the correlation-based logit loss")
    parser.add_argument("--feature_weight", type=float, default=spec.kd_feature_weight,
                        help="weight of the relational feature loss")
    parser.add_argument("--tau", type=float, default=2.0, help="logit-loss temperature")
    args = parse(parser, argv)
    setup_logging()
    device = resolve_device(args.device)
    set_seed(args.seed)
    save_dir = Path(args.save_dir)
    checkpoint = save_dir / modalities.kd_checkpoint(args.teacher, args.student)

    # Data: only the two modalities this run needs
    samples = load_samples(spec, args.data_dir)
    log_start(f"{spec.name} KD {args.teacher}->{args.student}", args, device,
              {s: len(v) for s, v in samples.items()})

    # Models: the student; the frozen teacher only when training (evaluation runs the student alone)
    t_info, s_info = modalities.MODALITIES[args.teacher], modalities.MODALITIES[args.student]
    student, s_field = modalities.build(args.student, spec.num_classes, args)
    if args.train:
        teacher, t_field = modalities.build(args.teacher, spec.num_classes, args)
        load_checkpoint(teacher, save_dir / t_info.checkpoint, f"{spec.name}/{t_info.script}")
        teacher.to(device).eval().requires_grad_(False)
        if args.student == "audio":
            load_checkpoint(student, save_dir / s_info.checkpoint, f"{spec.name}/{s_info.script}")
    student.to(device)

    def step(batch: dict, train: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        s_rep, s_logits = s_info.forward(student, batch)
        if not train:
            return None, s_logits
        with torch.no_grad():
            t_rep, t_logits = t_info.forward(teacher, batch)
        s_logits, t_logits = s_logits.float(), t_logits.float()
        loss = F.cross_entropy(s_logits, batch["labels"])
        loss = loss + args.logit_weight * logit_kd_loss(s_logits, t_logits, tau=args.tau)
        if args.feature_weight:
            loss = loss + args.feature_weight * feature_kd_loss(s_rep.float(), t_rep.float())
        return loss, s_logits

    # Loop; dev/test evaluation runs the student alone, so only training batches load text
    report = SubstitutionReport()
    if not args.train:
        load_checkpoint(student, checkpoint, f"{spec.name}/KD.py --student {args.student}")
        student.eval()
        loader = loaders_for(samples, [s_field], args, ("test",))["test"]
        result = evaluate(stage=f"KD {args.student}", step=step, loader=loader, device=device,
                          amp=args.amp, label_names=spec.labels, report=report)
    else:
        loaders = loaders_for(samples, [t_field, s_field], args, ("train",))
        loaders.update(loaders_for(samples, [s_field], args, ("dev", "test")))
        result = fit(
            stage=f"{spec.name} KD {args.teacher}->{args.student}", model=student, step=step,
            loaders=loaders, epochs=args.epochs, learning_rate=args.learning_rate, device=device,
            amp=args.amp, checkpoint=checkpoint, label_names=spec.labels, args=vars(args),
            per_batch_schedule=args.per_batch_schedule, report=report,
        )

    # Artifact: checkpoint + metrics JSON by fit(); substitution report for audio students
    if args.student == "audio":
        report.write(save_dir / f"{checkpoint.stem}{report_suffix(args.train)}")
    return result
