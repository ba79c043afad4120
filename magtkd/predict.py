"""``<DS>/predict.py``: the trained pipeline on a user's own conversation CSV (docs/METHOD.md §0).

The pipeline's own code runs: frame extraction (stage 3) into the conversation's own folder,
the five first-stage models (stage 7) written as a feature pickle, and the fusion model rebuilt from
its checkpoint and record (stage 8, `magtkd.checkpoints.trained_fusion`) in evaluation mode; the
predictions are written in the CSV's order with the substitution report beside them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from . import runtime
from .artifacts import FIRST_STAGE_MODELS, FRAMES_REPORT, StageFiles, SubstitutionReport, feature_path, write_text
from .checkpoints import (CheckpointError, check_fusion_fits, load_trained_fusion, speakers_needed,
                          trained_fusion)
from .dataset import Utterance, build_samples, fusion_speaker_ids, group_dialogues, load_conversation, load_speaker2id
from .extract import check_first_stage_checkpoints, first_stage_features
from .frames import extract_frames, plan_jobs
from .fusion_data import dialogue_outputs, load_dialogues, split_outputs
from .fusion_settings import FusionRequest, FusionSettings
from .pickles import assemble_features, save_features
from .predictions import ANCHOR_COLUMNS, ID_COLUMNS, SplitOutputs
from .pretrained import load_image_processor
from .spec import DatasetSpec
from .utils import UserError

log = logging.getLogger("magtkd")


@dataclass(frozen=True)
class Prediction:
    """One predict.py run: the conversation and the output, the stage folders, and how the models run."""

    conversation: Path
    out: Path
    data_dir: Path
    pretrained_dir: Path
    save_dir: Path
    feature_dir: Path
    batch_size: int
    num_workers: int | None  # None: the default of `runtime.loader_workers`
    amp: bool
    channel_order: str
    unknown_speakers: str  # padding | error
    prompt: str | None
    audio_cache: Path | None  # the audio cache folder; None: decode every time
    flags: Mapping[str, Any]  # the run's flags, logged

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any], audio_cache: Path | None) -> "Prediction":
        """predict.py's parsed flags (``vars(args)``) as a run."""
        names = [f.name for f in fields(cls) if f.name not in ("flags", "audio_cache")]
        return cls(**{name: flags[name] for name in names}, audio_cache=audio_cache, flags=dict(flags))

    @property
    def work_dir(self) -> Path:
        """Where the conversation's frames and feature pickle go (a folder per conversation content)."""
        return Path(self.feature_dir) / "predict"

    @property
    def report(self) -> Path:
        return self.out.with_name(f"{self.out.stem}_substitutions.tsv")


def predict_conversation(spec: DatasetSpec, run: Prediction, request: FusionRequest,
                         device: torch.device) -> dict[str, Any]:
    """Predict every utterance of ``run.conversation``; ``request``: the fusion flags (None: as trained)."""
    stage, files = f"{spec.name} predict", StageFiles.fusion(run.save_dir)
    check_out(run.out, [run.conversation, files.checkpoint, files.metrics,
                        *(Path(run.save_dir) / f"{name}.{ext}" for name, _ in FIRST_STAGE_MODELS.values()
                          for ext in ("bin", "json"))])
    # Data: the conversation in file order, its dialogues in the feature pickle's order, the speaker map
    utterances = load_conversation(spec, run.conversation, run.data_dir, csv_relative=True)
    check_media(run.conversation, utterances)
    dialogues = group_dialogues(utterances)
    ordered = [u for _, dialogue in dialogues for u in dialogue]
    speaker2id = load_speaker2id(run.data_dir) if spec.global_speaker_ids else None

    # Models, checked before any work: the fusion checkpoint is this dataset's, the five first-stage ones exist
    settings = trained_fusion(files, spec.name, request)
    check_fusion_fits(settings, files.checkpoint, spec, spec.num_classes, speakers_needed(spec, speaker2id))
    check_first_stage_checkpoints(spec, run.save_dir)
    padding = settings.padding_row if run.unknown_speakers == "padding" else None
    speakers = [s for _, dialogue in dialogues for s in fusion_speaker_ids(spec, dialogue, speaker2id, padding)]
    runtime.log_start(stage, run.flags, device, {
        "dialogues": len(dialogues), "utterances": len(ordered), "audio_feature": settings.audio_feature,
        "video_feature": settings.video_feature, "n_head": settings.n_head})

    report = SubstitutionReport()
    pickle_path = _first_stage(spec, run, ordered, speakers, device, report)
    outputs = _fuse(settings, files.checkpoint, pickle_path, run.batch_size, device)

    # Artifacts: the substitution report, then the predictions in file order (each written atomically)
    table = prediction_table(spec, utterances, ordered, outputs)
    report_path = report.write(run.report)
    write_text(run.out, table.to_csv(index=False, float_format="%.6f"))
    print(prediction_summary(table))
    log.info("%s: wrote %s (%d utterances); %d media substitutions listed in %s", stage, run.out, len(table),
             len(report), report_path)
    return {"paths": {"predictions": str(run.out), "substitutions": str(report_path), "features": str(pickle_path)},
            "emotions": table["emotion"].tolist(), "substituted": len(report)}


def _first_stage(spec: DatasetSpec, run: Prediction, ordered: Sequence[Utterance], speakers: Sequence[int],
                 device: torch.device, report: SubstitutionReport) -> Path:
    """Stages 3 and 7 on the conversation: its frames into its own folder (resumable, never the dataset's),
    then the five first-stage models, written as a feature pickle; substitutions go to ``report``."""
    split, work_dir = ordered[0].split, run.work_dir
    jobs = plan_jobs(spec, ordered, work_dir, run.channel_order)
    frames = extract_frames(jobs, load_image_processor(run.pretrained_dir), run.num_workers,
                            work_dir / "video" / split / FRAMES_REPORT)
    vectors = first_stage_features(
        spec, {split: build_samples(ordered)}, pretrained_dir=run.pretrained_dir, save_dir=run.save_dir,
        feature_dir=work_dir, device=device, batch_size=run.batch_size, num_workers=run.num_workers,
        amp=run.amp, report=report, audio_cache=run.audio_cache, prompt=run.prompt)[split]
    report.extend(frames)
    features = assemble_features([u.dialogue_id for u in ordered], [u.utterance_id for u in ordered],
                                 [u.label for u in ordered], speakers, vectors)
    return save_features(feature_path(work_dir, split), features)


def _fuse(settings: FusionSettings, checkpoint: Path, pickle_path: Path, batch_size: int,
          device: torch.device) -> SplitOutputs:
    """Stage 8 on the conversation's pickle: the trained fusion model in evaluation mode (no dropout), its
    outputs with each anchor's prediction and the inspection (docs/METHOD.md §5, "Inspection")."""
    data = load_dialogues(pickle_path, settings.audio_feature, settings.video_feature, device,
                          settings.variant.modalities)
    if settings.hidden != data.width:
        raise CheckpointError(f"fusion checkpoint {checkpoint} has width {settings.hidden} but the "
                              f"first-stage features in {pickle_path} have width {data.width}")
    fusion = load_trained_fusion(settings, checkpoint).to(device)
    return split_outputs(fusion, data, dialogue_outputs(fusion, data, batch_size, show_progress=True, inspect=True))


def check_out(out: Path, inputs: Sequence[Path]) -> None:
    """``--out`` (and the report beside it) must be a new or a plain file, never one of the inputs:
    refused before any work, so a mistyped flag never overwrites the user's conversation."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; name the predictions CSV to write, e.g. {out / 'predictions.csv'}")
    report = out.with_name(f"{out.stem}_substitutions.tsv")
    for path in (out, report):
        for given in inputs:
            if path.resolve() == Path(given).resolve():
                raise UserError(f"--out {out} would overwrite the input {given}"
                                      f"{' (with its substitution report)' if path == report else ''}; "
                                      "choose another --out")


def check_media(conversation: Path, utterances: Sequence[Utterance]) -> None:
    """Stop when no clip of a modality exists (predictions on silence and black frames only);
    warn about empty utterances, naming their rows."""
    for what, paths in (("audio", [u.audio_path for u in utterances]), ("video", [u.video_path for u in utterances])):
        missing = sorted({str(p) for p in paths if not p.is_file()})
        if len(missing) == len(set(map(str, paths))):
            raise UserError(
                f"{conversation}: none of its {len(missing)} {what} file(s) exists (e.g. {', '.join(missing[:3])}); "
                "relative paths resolve against the conversation's folder, then --data_dir (docs/METHOD.md §0)")
    empty = [u.row for u in utterances if not str(u.text).strip()]
    if empty:
        log.warning("%s: rows %s have an empty Utterance: their text model sees only the prompt", conversation,
                    ", ".join(map(str, empty[:20])) + (" ..." if len(empty) > 20 else ""))


def prediction_table(spec: DatasetSpec, utterances: Sequence[Utterance], ordered: Sequence[Utterance],
                     outputs: SplitOutputs) -> pd.DataFrame:
    """Predictions of a conversation in file order (``utterances``), from the fusion's outputs in pickle order.

    ``ordered`` are the same utterances in the order of ``outputs``' rows (the feature pickle's: grouped by
    dialogue). Columns: ``Dialogue_ID``, ``Utterance_ID``, ``Speaker``, ``Utterance``, ``emotion`` (the
    argmax, as the fusion stage predicts) and ``p_<label>`` (softmax) for every label; then the columns of
    the stages' predictions CSVs that apply (docs/METHOD.md §0, "Predictions"): `ID_COLUMNS`,
    ``predicted`` and the fusion's anchors, gates and shares (no ``gold``: a conversation has no labels).
    """
    if outputs.probs.shape != (len(ordered), spec.num_classes) or len(ordered) != len(utterances):
        raise ValueError(f"{len(utterances)} utterances, {len(ordered)} ordered, probabilities "
                         f"{outputs.probs.shape}")
    row_of = {utt.key: i for i, utt in enumerate(ordered)}
    index = np.asarray([row_of[utt.key] for utt in utterances], dtype=np.int64)
    emotions = [spec.labels[i] for i in outputs.preds[index].tolist()]
    table = pd.DataFrame({
        "Dialogue_ID": [u.dialogue_id for u in utterances], "Utterance_ID": [u.utterance_id for u in utterances],
        "Speaker": [u.speaker for u in utterances], "Utterance": [u.text for u in utterances],
        "emotion": emotions,
    })
    for j, label in enumerate(spec.labels):
        table[f"p_{label}"] = outputs.probs[index, j]
    for column, values in zip(ID_COLUMNS, ([u.dialogue_id for u in utterances], [u.utterance_id for u in utterances],
                                           [u.speaker for u in utterances], [u.text for u in utterances])):
        table[column] = values
    table["predicted"] = emotions
    for column, values in outputs.columns.items():
        values = np.asarray(values)[index]
        table[column] = [spec.labels[i] if i >= 0 else "" for i in values.tolist()] \
            if column in ANCHOR_COLUMNS.values() else values
    return table


def prediction_summary(table: pd.DataFrame, width: int = 48) -> str:
    """A short console table: ids, speaker, emotion and its probability, the utterance cut to ``width``."""
    probability = [row[f"p_{row['emotion']}"] for _, row in table.iterrows()]
    short = table[["Dialogue_ID", "Utterance_ID", "Speaker", "emotion"]].assign(
        p=[f"{p:.2f}" for p in probability],
        Utterance=[t if len(t) <= width else t[: width - 3] + "..." for t in table["Utterance"]],
    )
    return short.to_string(index=False)
