"""Stage 8: train / evaluate the multi-modal anchor gated transformer (SPEC section 5).

Reads the three first-stage feature pickles (SPEC section 4) and writes, into
``--save_dir``: ``multimodal_fusion_best.bin`` (plain state_dict of the epoch
with the best DEV weighted F1), ``multimodal_fusion_best.json`` (test labels and
predictions, flattened in the pickle's dialogue order) and
``multimodal_fusion_metrics.json`` (arguments, per-epoch curve, selection).
``--train False`` reads only the test pickle and the checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

from .. import metrics
from ..cli import HelpFormatter, log_start, parse, resolve_device, set_seed, setup_logging, str2bool
from ..features import FeatureFileError, feature_path, load_features
from ..io import save_state_dict, write_json
from ..models.fusion import (
    AnchorGatedTransformer, FusionLoss, infer_sizes_from_checkpoint, load_fusion_checkpoint,
    read_fusion_state,
)
from ..recipes import SPLITS, DatasetSpec
from ..schedule import reference_schedule

log = logging.getLogger("magtkd")

CHECKPOINT = "multimodal_fusion_best.bin"
PREDICTIONS = "multimodal_fusion_best.json"
METRICS = "multimodal_fusion_metrics.json"
GRAD_CLIP = 10.0
LABEL_PAD = -1


def build_parser(spec: DatasetSpec, script_dir: Path, description: str | None = None) -> argparse.ArgumentParser:
    """The reference's flags and defaults (SPEC section 5), plus ours; per-dataset defaults from ``spec.fusion``."""
    d = spec.fusion
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (peak of the schedule)")
    p.add_argument("--l2", type=float, default=1e-6, help="AdamW weight decay")
    p.add_argument("--batch_size", type=int, default=16, help="dialogues per batch")
    p.add_argument("--seed", type=int, default=2024, help="seeds the model and the per-epoch shuffle")
    p.add_argument("--epochs", type=int, default=30, help="training epochs")
    p.add_argument("--dropout", type=float, default=0.5, help="dropout everywhere in the model")
    p.add_argument("--hidden_dim", type=int, default=None, help="default: the features' width")
    p.add_argument("--n_head", type=int, default=8, help="attention heads (not stored in checkpoints)")
    p.add_argument("--clsNum", type=int, default=len(spec.labels), help="number of classes")
    p.add_argument("--train", type=str2bool, default=True,
                   help="True: train; False: evaluate the saved checkpoint on test")
    p.add_argument("--feature_dir", type=Path, default=spec.default_feature_dir(script_dir),
                   help="folder of first_stage_{train,dev,test}_features.pkl")
    p.add_argument("--save_dir", type=Path, default=spec.default_save_dir(script_dir),
                   help="folder of multimodal_fusion_best.{bin,json}")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu; None = CUDA when available, else CPU")
    p.add_argument("--audio_feature", choices=("audio", "audio_kd"), default=d.audio_feature,
                   help="feature key feeding the audio stream A")
    p.add_argument("--video_feature", choices=("video", "video_kd"), default=d.video_feature,
                   help="feature key feeding the video stream V")
    p.add_argument("--alpha", type=float, default=d.alpha, help="weight of KD(A')")
    p.add_argument("--beta", type=float, default=d.beta, help="weight of KD(V')")
    p.add_argument("--feature_loss", type=str2bool, default=d.feature_loss, help="add L_feat(X', T') to KD(X')")
    p.add_argument("--separate_text_blocks", type=str2bool, nargs="?", const=True, default=False,
                   help="text-anchor paths use their own a_t/v_t blocks and gates (the reference shares t_t)")
    p.add_argument("--per_batch_schedule", type=str2bool, nargs="?", const=True, default=False,
                   help="count warmup/total steps in batches instead of the reference's dialogues")
    p.add_argument("--n_speaker", type=int, default=None,
                   help=f"speaker embedding rows without padding (default: {d.n_speaker}"
                        + (" or the largest id + 1 in the data" if spec.global_speaker_ids else "")
                        + "; with --train False: from the checkpoint)")
    return p


# --------------------------------------------------------------------------- data


@dataclass
class DialogueSet:
    """One split as per-dialogue tensors on the device, in the pickle's dialogue order."""

    path: Path
    vids: list
    text: list[torch.Tensor]  # (L, H) each
    audio: list[torch.Tensor]
    video: list[torch.Tensor]
    speakers: list[torch.Tensor]  # (L,) long
    labels: list[torch.Tensor]  # (L,) long

    def __len__(self) -> int:
        return len(self.vids)

    @property
    def n_utterances(self) -> int:
        return sum(len(x) for x in self.labels)

    def flat_labels(self) -> list[int]:
        return torch.cat(self.labels).tolist() if self.labels else []


def _stack(vectors: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.stack(vectors).astype(np.float32, copy=False)).to(device)


def load_split_features(path: Path, audio_key: str, video_key: str, device: torch.device) -> DialogueSet:
    """Load a feature pickle (restricted unpickler) and check the three streams share one width."""
    feats = load_features(path, keys=("text", audio_key, video_key))
    if not feats["vids"]:
        raise FeatureFileError(f"{path}: 'vids' is empty; the split has no dialogues")
    first = feats["vids"][0]
    widths = {k: int(feats[k][first][0].shape[0]) for k in ("text", audio_key, video_key)}
    if len(set(widths.values())) != 1:
        raise FeatureFileError(f"{path}: the fusion streams need one width, got {widths}")
    vids = list(feats["vids"])
    return DialogueSet(
        path=path, vids=vids,
        text=[_stack(feats["text"][v], device) for v in vids],
        audio=[_stack(feats[audio_key][v], device) for v in vids],
        video=[_stack(feats[video_key][v], device) for v in vids],
        speakers=[torch.tensor([int(s) for s in feats["speakers"][v]], dtype=torch.long, device=device) for v in vids],
        labels=[torch.tensor([int(y) for y in feats["labels"][v]], dtype=torch.long, device=device) for v in vids],
    )


def width_of(data: DialogueSet) -> int:
    return int(data.text[0].shape[1])


def check_ids(data: DialogueSet, what: str, limit: int, hint: str) -> None:
    """Every speaker/label id must lie in [0, limit); the error names the file and the dialogue."""
    values = data.speakers if what == "speakers" else data.labels
    for vid, ids in zip(data.vids, values):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= limit):
            raise FeatureFileError(
                f"{data.path}: dialogue {vid} has {what} ids {sorted(set(ids.tolist()))}, expected 0..{limit - 1} ({hint})"
            )


@dataclass
class Batch:
    text: torch.Tensor  # (B, L, H)
    audio: torch.Tensor
    video: torch.Tensor
    speakers: torch.Tensor  # (B, L), padding = n_speaker
    labels: torch.Tensor  # (B, L), padding = LABEL_PAD
    mask: torch.Tensor  # (B, L) bool, True for real utterances


def collate(data: DialogueSet, indices: Sequence[int], pad_speaker: int) -> Batch:
    """Pad whole dialogues to the longest in the batch (tensors stay on the data's device)."""
    lengths = torch.tensor([len(data.labels[i]) for i in indices], device=data.labels[0].device)
    longest = int(lengths.max())
    return Batch(
        text=pad_sequence([data.text[i] for i in indices], batch_first=True),
        audio=pad_sequence([data.audio[i] for i in indices], batch_first=True),
        video=pad_sequence([data.video[i] for i in indices], batch_first=True),
        speakers=pad_sequence([data.speakers[i] for i in indices], batch_first=True, padding_value=pad_speaker),
        labels=pad_sequence([data.labels[i] for i in indices], batch_first=True, padding_value=LABEL_PAD),
        mask=torch.arange(longest, device=lengths.device)[None, :] < lengths[:, None],
    )


def batches(n: int, batch_size: int, generator: torch.Generator | None = None) -> Iterator[list[int]]:
    """Dialogue indices in batches: pickle order, or a seeded shuffle for training."""
    order = torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


# --------------------------------------------------------------------------- train / evaluate


def forward_batch(model: AnchorGatedTransformer, batch: Batch):
    return model(batch.text, batch.audio, batch.video, batch.speakers, batch.mask)


@torch.no_grad()
def predict(model: AnchorGatedTransformer, data: DialogueSet, batch_size: int) -> list[int]:
    """Predictions for every real utterance, flattened in the pickle's dialogue order."""
    model.eval()
    preds: list[int] = []
    for idx in batches(len(data), batch_size):
        batch = collate(data, idx, model.padding_speaker)
        # Boolean indexing walks (dialogue, utterance) row-major: the flattened order.
        preds.extend(forward_batch(model, batch).t_logits.argmax(-1)[batch.mask].tolist())
    return preds


def train_epoch(model: AnchorGatedTransformer, data: DialogueSet, criterion: FusionLoss,
                optimizer: torch.optim.Optimizer, scheduler, batch_size: int, generator: torch.Generator,
                epoch: int) -> float:
    """One pass over shuffled training dialogues; returns the mean batch loss."""
    model.train()
    total, count = 0.0, 0
    n_batches = math.ceil(len(data) / batch_size)
    bar = tqdm(batches(len(data), batch_size, generator), total=n_batches, desc=f"fusion epoch {epoch}",
               leave=False, disable=None)
    for idx in bar:
        batch = collate(data, idx, model.padding_speaker)
        loss, _ = criterion(forward_batch(model, batch), batch.labels, batch.mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        scheduler.step()
        total, count = total + loss.item(), count + 1
        bar.set_postfix(loss=f"{total / count:.4f}")
    return total / max(count, 1)


def class_names(spec: DatasetSpec, n_classes: int) -> list[str]:
    return list(spec.labels) if n_classes == len(spec.labels) else [str(i) for i in range(n_classes)]


def _check_width(args: argparse.Namespace, width: int, source: str) -> int:
    if args.hidden_dim is not None and args.hidden_dim != width:
        raise SystemExit(f"--hidden_dim {args.hidden_dim} does not match the width {width} of {source}")
    if width % args.n_head:
        raise SystemExit(f"--n_head {args.n_head} does not divide the feature width {width} ({source})")
    return width


def resolve_n_speaker(spec: DatasetSpec, args: argparse.Namespace, splits: Sequence[DialogueSet]) -> int:
    """IEMOCAP: 2. MELD: the recipe's 304 or the largest id + 1, whichever is larger (SPEC section 5)."""
    if args.n_speaker is not None:
        return args.n_speaker
    if spec.global_speaker_ids:
        largest = max(int(s.max()) for data in splits for s in data.speakers)
        return max(spec.fusion.n_speaker, largest + 1)
    return spec.fusion.n_speaker


def training_summary(stage: str, args: argparse.Namespace, sizes: dict, curve: list[dict], best: dict,
                     test_labels: list[int], names: list[str], complete: bool) -> dict[str, Any]:
    """Content of ``multimodal_fusion_metrics.json``: dev drives selection; test is reported at it."""
    return {
        "stage": stage, "complete": complete, "args": vars(args), "sizes": sizes,
        "selection": "best dev weighted F1", "selected_epoch": best["epoch"],
        "dev_at_selected": best["dev"], "test_at_selected": best["test"],
        "test_per_class": metrics.per_class(test_labels, best["preds"], names),
        "test_confusion": {"labels": names, "matrix": metrics.confusion(test_labels, best["preds"], len(names))},
        "curve": curve,
    }


def run_training(spec: DatasetSpec, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    stage = f"{spec.name} multimodal_fusion"
    if args.epochs < 1 or args.batch_size < 1:
        raise SystemExit(f"--epochs ({args.epochs}) and --batch_size ({args.batch_size}) must be at least 1")
    data = {split: load_split_features(feature_path(args.feature_dir, split), args.audio_feature,
                                       args.video_feature, device) for split in SPLITS}
    width = _check_width(args, width_of(data["train"]), str(data["train"].path))
    for split in ("dev", "test"):
        if width_of(data[split]) != width:
            raise SystemExit(f"{data[split].path} has width {width_of(data[split])}, "
                             f"{data['train'].path} has {width}")
    n_speaker = resolve_n_speaker(spec, args, list(data.values()))
    for split in SPLITS:
        check_ids(data[split], "speakers", n_speaker, f"n_speaker {n_speaker}; see --n_speaker")
        check_ids(data[split], "labels", args.clsNum, f"{args.clsNum} classes; see --clsNum")
    sizes = {"hidden": width, "n_speaker": n_speaker, "n_classes": args.clsNum,
             **{f"{s}_dialogues": len(data[s]) for s in SPLITS},
             **{f"{s}_utterances": data[s].n_utterances for s in SPLITS}}
    log_start(stage, args, device, sizes)

    set_seed(args.seed)
    model = AnchorGatedTransformer(width, args.clsNum, n_speaker, args.n_head, args.dropout,
                                   args.separate_text_blocks).to(device)
    criterion = FusionLoss(args.alpha, args.beta, args.feature_loss)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.l2)
    n_batches = math.ceil(len(data["train"]) / args.batch_size)
    # Reference default: warmup/total counted in dialogues, stepped per batch (SPEC sections 2, 5).
    scheduler = reference_schedule(optimizer, len(data["train"]), n_batches, args.epochs, args.per_batch_schedule)
    generator = torch.Generator().manual_seed(args.seed)

    save_dir = Path(args.save_dir)
    labels = {split: data[split].flat_labels() for split in ("dev", "test")}
    names = class_names(spec, args.clsNum)
    curve: list[dict[str, Any]] = []
    best: dict[str, Any] = {}
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        train_loss = train_epoch(model, data["train"], criterion, optimizer, scheduler, args.batch_size,
                                 generator, epoch)
        train_seconds = time.perf_counter() - start
        preds = {split: predict(model, data[split], args.batch_size) for split in ("dev", "test")}
        scores = {split: metrics.summary(labels[split], preds[split]) for split in ("dev", "test")}
        curve.append({"epoch": epoch, "train_loss": train_loss, "dev": scores["dev"],
                      "test_not_used_for_selection": scores["test"],
                      "train_seconds": round(train_seconds, 3),
                      "eval_seconds": round(time.perf_counter() - start - train_seconds, 3)})
        improved = not best or scores["dev"]["weighted_f1"] > best["dev"]["weighted_f1"]
        log.info("%s epoch %d/%d: train loss %.4f | dev acc %.4f wF1 %.4f | test acc %.4f wF1 %.4f%s",
                 stage, epoch, args.epochs, train_loss, scores["dev"]["accuracy"], scores["dev"]["weighted_f1"],
                 scores["test"]["accuracy"], scores["test"]["weighted_f1"], " | best dev so far, saved" if improved else "")
        if improved:
            # Selection on DEV weighted F1; the reference selected on test (leakage, SPEC section 5).
            best = {"epoch": epoch, "dev": scores["dev"], "test": scores["test"], "preds": preds["test"]}
            save_state_dict(save_dir / CHECKPOINT, model)
            write_json(save_dir / PREDICTIONS, {"labels": labels["test"], "preds": preds["test"]})
        # Rewritten every epoch, so an interrupted run still documents what it selected.
        summary = training_summary(stage, args, sizes, curve, best, labels["test"], names,
                                   complete=epoch == args.epochs)
        write_json(save_dir / METRICS, summary)

    report = metrics.report_text(labels["test"], best["preds"], names)
    confusion = summary["test_confusion"]["matrix"]
    log.info("%s: selected epoch %d (best dev weighted F1 %.4f); test accuracy %.4f, weighted F1 %.4f\n%s\n"
             "confusion matrix (rows = gold %s):\n%s", stage, best["epoch"], best["dev"]["weighted_f1"],
             best["test"]["accuracy"], best["test"]["weighted_f1"], report, names,
             "\n".join(" ".join(f"{c:5d}" for c in row) for row in confusion))
    return {**summary, "labels": labels["test"], "preds": best["preds"],
            "paths": {k: str(save_dir / v) for k, v in
                      (("checkpoint", CHECKPOINT), ("predictions", PREDICTIONS), ("metrics", METRICS))}}


def run_evaluation(spec: DatasetSpec, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """``--train False``: only the test pickle and the checkpoint are read."""
    stage = f"{spec.name} multimodal_fusion (evaluation)"
    ckpt_path = Path(args.save_dir) / CHECKPOINT
    ckpt = infer_sizes_from_checkpoint(read_fusion_state(ckpt_path))
    test = load_split_features(feature_path(args.feature_dir, "test"), args.audio_feature, args.video_feature, device)
    width = _check_width(args, width_of(test), str(test.path))
    if ckpt["hidden"] != width:
        raise SystemExit(f"checkpoint {ckpt_path} has width {ckpt['hidden']} but the features in "
                         f"{test.path} have width {width}")
    n_speaker, n_classes = int(ckpt["n_speaker"]), int(ckpt["n_classes"])
    check_ids(test, "speakers", n_speaker, f"the checkpoint {ckpt_path} has {n_speaker} speakers")
    check_ids(test, "labels", n_classes, f"the checkpoint {ckpt_path} has {n_classes} classes")
    separate = bool(args.separate_text_blocks or ckpt["separate_text_blocks"])
    sizes = {"hidden": width, "n_speaker": n_speaker, "n_classes": n_classes, "separate_text_blocks": separate,
             "test_dialogues": len(test), "test_utterances": test.n_utterances}
    log_start(stage, args, device, sizes)

    model = AnchorGatedTransformer(width, n_classes, n_speaker, args.n_head, args.dropout, separate)
    load_fusion_checkpoint(model, ckpt_path)
    model.to(device)
    labels, preds = test.flat_labels(), predict(model, test, args.batch_size)
    scores = metrics.summary(labels, preds)
    report = metrics.report_text(labels, preds, class_names(spec, n_classes))
    log.info("%s: test accuracy %.4f, weighted F1 %.4f\n%s", stage, scores["accuracy"], scores["weighted_f1"], report)
    write_json(Path(args.save_dir) / PREDICTIONS, {"labels": labels, "preds": preds})
    return {"stage": stage, "test": scores, "report": report, "labels": labels, "preds": preds,
            "paths": {"predictions": str(Path(args.save_dir) / PREDICTIONS)}}


def main(spec: DatasetSpec, script_dir: str | Path, argv: Sequence[str] | None = None,
         description: str | None = None) -> dict[str, Any]:
    """Entry point of ``<DS>/multimodal_fusion.py``; returns the metrics it logged."""
    args = parse(build_parser(spec, Path(script_dir), description), argv)
    setup_logging()
    device = resolve_device(args.device)
    if args.train:
        return run_training(spec, args, device)
    return run_evaluation(spec, args, device)
