"""Stage 7: the five first-stage models run over every utterance, and their representations written as
the three feature pickles with their completion record (docs/METHOD.md §4). Prediction runs the same
code on a user's conversation.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from . import runtime
from .artifacts import (FEATURES_REPORT, FIRST_STAGE_MODELS, StageFiles, SubstitutionReport, begin_outputs, below_hint,
                        feature_path, features_record, finish_outputs, output_lock, remove_stale_temps)
from .checkpoints import CheckpointError, checkpoint_file, load_checkpoint
from .dataset import Sample, Utterance, fusion_speaker_ids
from .loaders import (SampleDataset, concat_chunks, each_pass, in_dataset_order, make_loader, note_problems,
                      to_device)
from .pickles import assemble_features, save_features
from .pretrained import load_encoder, text_prompt
from .runtime import autocast
from .spec import DatasetSpec

log = logging.getLogger("magtkd")


@torch.inference_mode()
def representations(models: Mapping[str, nn.Module], loader, device: torch.device, amp: bool,
                    report: SubstitutionReport | None = None) -> dict[str, np.ndarray]:
    """(N, D) float32 representations of each encoder (``encoder.encode(batch)``), in dataset order
    (gathered from every rank under torchrun).

    All encoders run on the same batches, so encoders sharing an input decode each clip once. The
    representations stay on the device until the pass ends and come back in one copy per encoder.
    """
    outputs: dict[str, list[torch.Tensor]] = {key: [] for key in models}
    index = []
    for batch in runtime.progress(each_pass(loader), desc="batches"):
        note_problems(batch, loader.dataset, report)
        index.append(batch["index"])
        batch = to_device(batch, device)
        for key, encoder in models.items():
            with autocast(device, amp):
                rep, _ = encoder.encode(batch)
            outputs[key].append(rep.float())
    local = {key: torch.cat(chunks).cpu().numpy() if chunks else np.zeros(0, np.float32)
             for key, chunks in outputs.items()}
    return in_dataset_order(concat_chunks(index), local)


def check_first_stage_checkpoints(spec: DatasetSpec, save_dir: Path) -> None:
    """Fail before any work when one of the five checkpoints is missing, naming it and its script."""
    for name, script in FIRST_STAGE_MODELS.values():
        if not checkpoint_file(Path(save_dir) / f"{name}.bin").is_file():
            raise CheckpointError(f"checkpoint {Path(save_dir) / f'{name}.bin'} not found: it is written by "
                                  f"{spec.name}/{script}" + below_hint(save_dir, f"{name}.bin", "--save_dir"))


def first_stage_features(
    spec: DatasetSpec, samples: Mapping[str, Sequence[Sample]], *, pretrained_dir: Path, save_dir: Path,
    feature_dir: Path, device: torch.device, batch_size: int, num_workers: int | None, amp: bool,
    report: SubstitutionReport | None = None, audio_cache: Path | None = None, prompt: str | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """``{split: {feature key: (N, D) float32}}``: the five first-stage models over each split's samples.

    One input group at a time (its encoders loaded from ``save_dir``, in eval
    mode, then freed), in sample order; video reads the frames stored under
    ``feature_dir``, audio the clips cached in ``audio_cache`` (decoded and stored on a miss).
    Used by the extraction stage and by prediction, so both compute the same features; the text prompt is
    the variant ``text.json`` recorded (``prompt``: an explicit ``--prompt``, which must agree).
    """
    check_first_stage_checkpoints(spec, save_dir)
    prompt = text_prompt(StageFiles.first_stage(save_dir, "text").metrics, prompt)
    vectors: dict[str, dict[str, np.ndarray]] = {split: {} for split in samples}
    # Grouped by the input they share (text; audio, audio_kd; video, video_kd) so each clip is decoded once.
    for modality in ("text", "audio", "video"):
        encoders, field = {}, None
        for key, (name, script) in FIRST_STAGE_MODELS.items():
            if key.split("_")[0] != modality:
                continue
            encoder, field = load_encoder(modality, pretrained_dir, spec.num_classes, feature_dir, audio_cache,
                                          prompt)
            load_checkpoint(encoder, Path(save_dir) / f"{name}.bin", f"{spec.name}/{script}", spec.name)
            encoders[key] = encoder.to(device).eval()
        for split, split_samples in samples.items():
            loader = make_loader(SampleDataset(split_samples, [field]), batch_size, shuffle=False,
                                 num_workers=num_workers, device=device)
            vectors[split].update(representations(encoders, loader, device, amp, report))
            log.info("%s: %s features for %s done", spec.name, "/".join(encoders), split)
        del encoders
    return vectors


def write_feature_pickles(spec: DatasetSpec, dialogues: Mapping[str, Sequence[tuple[int, list[Utterance]]]],
                          vectors: Mapping[str, Mapping[str, np.ndarray]], feature_dir: Path,
                          report: SubstitutionReport, record_args: Mapping[str, Any],
                          speaker2id: Mapping[str, int] | None = None) -> dict[str, Path]:
    """Stage 7's artifact set: one pickle per split, the substitution report, and the completion record
    (incomplete before the first pickle changes, complete after the last; docs/METHOD.md §4).

    Speakers: per dialogue by appearance, or the global ids of ``speaker2id`` (MELD; `fusion_speaker_ids`).
    Called by every rank: the report gathers the ranks' substitutions; rank 0 writes.
    """
    script = f"{spec.name}/extract_first_stage_features.py"
    record = features_record(feature_dir)
    pickles = [feature_path(feature_dir, split).name for split in dialogues]
    report_path = Path(feature_dir) / FEATURES_REPORT
    paths: dict[str, Path] = {}
    with output_lock(feature_dir, "first_stage_features") if runtime.is_main() else contextlib.nullcontext():
        if runtime.is_main():
            remove_stale_temps(feature_dir, [*pickles, record.name, report_path.name])
            begin_outputs(record, script, record_args, dataset=spec.name, labels=list(spec.labels), pickles=pickles)
            for split, split_dialogues in dialogues.items():
                utts = [u for _, dialogue in split_dialogues for u in dialogue]
                speakers = [s for _, dialogue in split_dialogues for s in fusion_speaker_ids(spec, dialogue, speaker2id)]
                features = assemble_features([u.dialogue_id for u in utts], [u.utterance_id for u in utts],
                                             [u.label for u in utts], speakers,
                                             {key: np.asarray(v) for key, v in vectors[split].items()})
                paths[split] = save_features(feature_path(feature_dir, split), features)
                log.info("%s: wrote %s (%d dialogues, %d utterances)", spec.name, paths[split],
                         len(features["vids"]), len(utts))
        report.write(report_path)  # a collective under torchrun: every rank calls it
        if runtime.is_main():
            width = int(next(iter(vectors.values()))["text"].shape[1])
            finish_outputs(record, script, record_args, dataset=spec.name, labels=list(spec.labels), pickles=pickles,
                           width=width)
    return paths
