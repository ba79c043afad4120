"""The training / evaluation loop shared by text.py, audio.py, video.py and KD.py.

AdamW, grad-norm clipping 10, the reference's warmup schedule, dev weighted-F1
model selection, test report at each new best, an atomic plain-state_dict
checkpoint and a metrics JSON beside it (SPEC section 2, "Unimodal training").
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import metrics
from .io import save_state_dict, write_json
from .loaders import to_device
from .report import SubstitutionReport
from .schedule import reference_schedule

log = logging.getLogger("magtkd")

# step(batch, train) -> (loss or None, logits); batch is already on the device.
StepFn = Callable[[dict, bool], tuple[torch.Tensor | None, torch.Tensor]]


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA (when enabled); plain fp32 on CPU."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def note_problems(batch: Mapping[str, Any], dataset, report: SubstitutionReport | None,
                  replacement: str = "silence") -> None:
    """Record media substitutions carried by a batch (``*_problems`` lists) in the report."""
    if report is None:
        return
    for name, problems in batch.items():
        if not name.endswith("_problems"):
            continue
        for index, problem in zip(batch["index"].tolist(), problems):
            if problem is not None:
                utt = dataset.samples[index].utterance
                report.add(f"{utt.split}/{utt.key}", problem[0], problem[1], replacement)


@torch.inference_mode()
def predict(step: StepFn, loader, device: torch.device, amp: bool,
            report: SubstitutionReport | None = None, desc: str = "eval") -> tuple[np.ndarray, np.ndarray]:
    """Gold labels and argmax predictions over a loader, in loader order."""
    labels, preds = [], []
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=None):
        note_problems(batch, loader.dataset, report)
        batch = to_device(batch, device)
        with autocast(device, amp):
            _, logits = step(batch, False)
        labels.append(batch["labels"].cpu())
        preds.append(logits.float().argmax(-1).cpu())
    if not labels:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return torch.cat(labels).numpy(), torch.cat(preds).numpy()


def test_report(labels: np.ndarray, preds: np.ndarray, names: Sequence[str]) -> dict:
    out = metrics.summary(labels, preds)
    out["per_class"] = metrics.per_class(labels, preds, names)
    return out


def fit(
    *,
    stage: str,
    model: nn.Module,
    step: StepFn,
    loaders: Mapping[str, Any],
    epochs: int,
    learning_rate: float,
    device: torch.device,
    amp: bool,
    checkpoint: Path,
    label_names: Sequence[str],
    args: Mapping[str, Any],
    per_batch_schedule: bool = False,
    grad_clip: float = 10.0,
    report: SubstitutionReport | None = None,
) -> dict:
    """Train ``model`` (its trainable parameters) and keep the best-dev checkpoint."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate)
    train_loader = loaders["train"]
    scheduler = reference_schedule(
        optimizer, len(train_loader.dataset), len(train_loader), epochs, per_batch=per_batch_schedule
    )
    metrics_path = checkpoint.with_suffix(".json")
    history: list[dict] = []
    best = {"epoch": 0, "dev_weighted_f1": -math.inf, "test": None}
    for epoch in range(1, epochs + 1):
        model.train()
        started, losses = time.time(), []
        bar = tqdm(train_loader, desc=f"{stage} epoch {epoch}/{epochs}", leave=False, dynamic_ncols=True, disable=None)
        for batch in bar:
            note_problems(batch, train_loader.dataset, report)
            batch = to_device(batch, device)
            with autocast(device, amp):
                loss, _ = step(batch, True)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        model.eval()
        dev = metrics.summary(*predict(step, loaders["dev"], device, amp, report, "dev"))
        row: dict[str, Any] = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else 0.0,
                               "dev": dev, "seconds": round(time.time() - started, 2)}
        improved = dev["weighted_f1"] > best["dev_weighted_f1"]
        if improved:
            save_state_dict(checkpoint, model)
            test = test_report(*predict(step, loaders["test"], device, amp, report, "test"), label_names)
            row["test"] = {k: test[k] for k in ("accuracy", "weighted_f1")}
            best = {"epoch": epoch, "dev_weighted_f1": dev["weighted_f1"], "test": test}
        history.append(row)
        log.info(
            "%s epoch %d/%d: train loss %.4f | dev acc %.4f wF1 %.4f%s", stage, epoch, epochs,
            row["train_loss"], dev["accuracy"], dev["weighted_f1"],
            (f" | new best, saved; test acc {row['test']['accuracy']:.4f} wF1 {row['test']['weighted_f1']:.4f}"
             if improved else ""),
        )
        write_json(metrics_path, _metrics_doc(stage, args, history, best, checkpoint))
    if best["test"] is not None:
        log.info("%s: selected epoch %d (dev wF1 %.4f); test report:\n%s", stage, best["epoch"],
                 best["dev_weighted_f1"], _report_text(best["test"], label_names))
    return _metrics_doc(stage, args, history, best, checkpoint)


def _metrics_doc(stage: str, args: Mapping[str, Any], history: list[dict], best: dict, checkpoint: Path) -> dict:
    return {
        "stage": stage,
        "checkpoint": checkpoint.name,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in args.items()},
        "selection": "best dev weighted F1",
        "selected_epoch": best["epoch"],
        "dev_weighted_f1": best["dev_weighted_f1"] if best["epoch"] else None,
        "test": best["test"],
        "epochs": history,
    }


def _report_text(test: Mapping[str, Any], names: Sequence[str]) -> str:
    lines = [f"accuracy {test['accuracy']:.4f}  weighted F1 {test['weighted_f1']:.4f}"]
    per = test["per_class"]
    lines.append(f"{'class':>10} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}")
    for name in names:
        c = per[name]
        lines.append(f"{name:>10} {c['precision']:9.4f} {c['recall']:9.4f} {c['f1-score']:9.4f} {int(c['support']):8d}")
    return "\n".join(lines)


def evaluate(*, stage: str, step: StepFn, loader, device: torch.device, amp: bool,
             label_names: Sequence[str], report: SubstitutionReport | None = None) -> dict:
    """``--train False``: test metrics of the loaded checkpoint."""
    test = test_report(*predict(step, loader, device, amp, report, "test"), label_names)
    log.info("%s: test report of the saved checkpoint:\n%s", stage, _report_text(test, label_names))
    return test
