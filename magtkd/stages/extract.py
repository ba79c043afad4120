"""Stage 7: run the five first-stage models over every split (SPEC section 4).

Writes ``<feature_dir>/first_stage_{train,dev,test}_features.pkl`` in the layout
of the authors' downloadable features: ``vids``, ``text``, ``audio``, ``video``,
``audio_kd``, ``video_kd``, ``speakers``, ``labels``, ``dia2utt``. Batched,
inference mode, autocast on GPU; models sharing an input (audio + audio_kd,
video + video_kd) run on the same batches, so each clip is decoded once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from .. import modalities
from ..cli import log_start, parse, resolve_device, setup_logging, str2bool, paths_parser
from ..data import fusion_speaker_ids, group_dialogues, load_speaker2id, load_split, build_samples
from ..features import assemble_features, feature_path, save_features
from ..loaders import SampleDataset, make_loader, to_device
from ..models.build import load_checkpoint
from ..recipes import SPLITS, DatasetSpec
from ..report import SubstitutionReport
from ..train import autocast, note_problems

log = logging.getLogger("magtkd")

# feature key -> (modality, checkpoint name); grouped by the input they share.
GROUPS = {
    "text": (("text", "text.bin"),),
    "audio": (("audio", "audio.bin"), ("audio_kd", modalities.kd_checkpoint("text", "audio"))),
    "video": (("video", "video.bin"), ("video_kd", modalities.kd_checkpoint("text", "video"))),
}
PRODUCERS = {"text.bin": "text.py", "audio.bin": "audio.py", "video.bin": "video.py",
             "text_KD_audio.bin": "KD.py --student audio --teacher text",
             "text_KD_video.bin": "KD.py --student video --teacher text"}


@torch.inference_mode()
def representations(models: dict, forward, loader, device: torch.device, amp: bool,
                    report: SubstitutionReport) -> dict[str, np.ndarray]:
    """(N, D) float32 representations per model, in loader order."""
    outputs: dict[str, list[np.ndarray]] = {key: [] for key in models}
    for batch in tqdm(loader, desc="batches", leave=False, dynamic_ncols=True, disable=None):
        note_problems(batch, loader.dataset, report)
        batch = to_device(batch, device)
        for key, model in models.items():
            with autocast(device, amp):
                rep, _ = forward(model, batch)
            outputs[key].append(rep.float().cpu().numpy())
    return {key: np.concatenate(chunks).astype(np.float32) for key, chunks in outputs.items()}


def main(spec: DatasetSpec, script_dir: Path, argv: Sequence[str] | None = None,
         description: str | None = None) -> dict:
    # Arguments
    parser = paths_parser(spec, script_dir, description)
    parser.add_argument("--batch_size", type=int, default=16, help="utterances per forward pass")
    parser.add_argument("--amp", type=str2bool, default=True, help="bf16 autocast on CUDA")
    args = parse(parser, argv)
    setup_logging()
    device = resolve_device(args.device)
    save_dir, feature_dir = Path(args.save_dir), Path(args.feature_dir)

    # Data: every utterance of every split in the pickles' order (SPEC section 4: CSV order
    # grouped by dialogue), so the models' outputs need no reordering
    dialogues = {split: group_dialogues(load_split(spec, args.data_dir, split)) for split in SPLITS}
    utterances = {split: [u for _, dialogue in dialogues[split] for u in dialogue] for split in SPLITS}
    samples = {split: build_samples(utts) for split, utts in utterances.items()}
    speaker2id = load_speaker2id(args.data_dir) if spec.global_speaker_ids else None
    log_start(f"{spec.name} extract_first_stage_features", args, device,
              {s: len(v) for s, v in samples.items()})

    # Models, one input group at a time: vectors[split][feature key] = (N, D)
    vectors: dict[str, dict[str, np.ndarray]] = {split: {} for split in SPLITS}
    report = SubstitutionReport()
    for modality, members in GROUPS.items():
        models, field = {}, None
        for key, checkpoint in members:
            model, field = modalities.build(modality, spec.num_classes, args)
            load_checkpoint(model, save_dir / checkpoint, f"{spec.name}/{PRODUCERS[checkpoint]}")
            models[key] = model.to(device).eval()
        forward = modalities.MODALITIES[modality].forward
        for split in SPLITS:
            loader = make_loader(SampleDataset(samples[split], [field]), args.batch_size, shuffle=False,
                                 num_workers=args.num_workers)
            vectors[split].update(representations(models, forward, loader, device, args.amp, report))
            log.info("%s: %s features for %s done", spec.name, "/".join(models), split)
        del models

    # Artifact: one pickle per split, written atomically
    paths = {}
    for split in SPLITS:
        utts = utterances[split]
        speakers = [s for _, dialogue in dialogues[split] for s in fusion_speaker_ids(spec, dialogue, speaker2id)]
        features = assemble_features(
            [u.dialogue_id for u in utts], [u.utterance_id for u in utts], [u.label for u in utts],
            speakers, vectors[split],
        )
        paths[split] = feature_path(feature_dir, split)
        save_features(paths[split], features)
        log.info("%s: wrote %s (%d dialogues, %d utterances)", spec.name, paths[split],
                 len(features["vids"]), len(utts))
    report.write(feature_dir / "first_stage_substitutions.tsv")
    return {"paths": {k: str(v) for k, v in paths.items()}, "substituted": len(report)}
