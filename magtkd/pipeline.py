"""Run a dataset's whole pipeline: preparation, then the eight stages of docs/METHOD.md §0.

    python -m magtkd.pipeline IEMOCAP [--data_dir D] [--pretrained_dir P] [--epochs 1] [--force] [--nproc_per_node N]

(``IEMOCAP/run.sh`` and ``MELD/run.sh`` call this.) Stages run in the seed
README's order and the run stops at the first failure, naming the stage. A stage
whose outputs all exist, are newer than its inputs and whose completion record
says the run finished is skipped (``--force`` re-runs everything); a stage whose
record says its run was interrupted is re-run, and so is a training stage whose record
holds other values of the flags passed now (`changed_flags`, docs/METHOD.md §6). Relative folders are taken from
the directory the command was called from. Each stage runs as its own process, exactly as a user would
run the script; ``--in_process`` calls the scripts' ``main()`` instead (used by
the demo to save interpreter start-ups).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Sequence

import pandas as pd
import torch

from . import utils
from . import results
from .artifacts import (FIRST_STAGE_MODELS, CheckpointError, FRAMES_REPORT, StageFiles, SubstitutionReport, copy_file, feature_path,
                        features_record, frames_record, read_record, recorded_args, write_json, write_text)
from .dataset import (PROMPTS, SPLITS, DatasetSpec, Utterance, build_samples, fusion_speaker_ids, group_dialogues,
                      load_conversation, load_samples, load_speaker2id)
from .engine import dialogue_logits
from .features import (assemble_features, check_first_stage_checkpoints, extract_frames, first_stage_features,
                       load_dialogues, load_features, plan_jobs, save_features)
from .model import AnchorGatedTransformer, fusion_sizes_for, fusion_width, load_fusion_checkpoint
from .pretrained import load_image_processor
from .utils import setup_logging

log = logging.getLogger("magtkd")
REPO = Path(__file__).resolve().parents[1]
DATASETS = ("IEMOCAP", "MELD")


def dataset_spec(name: str) -> DatasetSpec:
    """The description of dataset ``name`` from its folder's ``config.py`` (``<repo>/<name>/config.py``)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return getattr(importlib.import_module(f"{name}.config"), name)


@dataclass(frozen=True)
class Context:
    spec: DatasetSpec
    data_dir: Path
    pretrained_dir: Path
    save_dir: Path
    feature_dir: Path

    def csvs(self) -> list[Path]:
        return [self.data_dir / self.spec.csv_names[s] for s in SPLITS]

    def bins(self, *names: str) -> list[Path]:
        return [self.save_dir / n for n in names]

    def checkpoints(self, *names: str) -> list[Path]:
        """Checkpoints with their metrics JSON (the completion record `magtkd.engine.fit` writes last)."""
        return [self.save_dir / f"{n}{suffix}" for n in names for suffix in (".bin", ".json")]

    def frames_done(self) -> list[Path]:
        # The completion record, written last by video_feature_extract.py, after every frame file.
        return [frames_record(self.feature_dir)]

    def pickles(self) -> list[Path]:
        return [feature_path(self.feature_dir, s) for s in SPLITS] + [features_record(self.feature_dir)]

    def raw(self) -> list[Path]:
        if self.spec.name == "IEMOCAP":
            return sorted(self.data_dir.glob("Session*/dialog/*/*.txt"))
        return sorted(self.data_dir.glob("*_sent_emo.csv"))


@dataclass(frozen=True)
class Stage:
    name: str
    script: str
    args: tuple[str, ...]
    kind: str  # which pipeline flags it takes: prepare | train | frames | extract | fusion
    inputs: Callable[[Context], list[Path]]
    outputs: Callable[[Context], list[Path]]


STAGES = (
    Stage("preprocessing", "preprocessing.py", (), "prepare", Context.raw, Context.csvs),
    Stage("text", "text.py", (), "train", Context.csvs, lambda c: c.checkpoints("text")),
    Stage("audio", "audio.py", (), "train", Context.csvs, lambda c: c.checkpoints("audio")),
    Stage("frames", "video_feature_extract.py", (), "frames", Context.csvs, Context.frames_done),
    Stage("video", "video.py", (), "train", Context.frames_done, lambda c: c.checkpoints("video")),
    Stage("kd_audio", "KD.py", ("--student", "audio", "--teacher", "text"), "train",
          lambda c: c.bins("text.bin", "audio.bin"), lambda c: c.checkpoints("text_KD_audio")),
    Stage("kd_video", "KD.py", ("--student", "video", "--teacher", "text"), "train",
          lambda c: c.bins("text.bin") + c.frames_done(), lambda c: c.checkpoints("text_KD_video")),
    Stage("features", "extract_first_stage_features.py", (), "extract",
          lambda c: c.bins("text.bin", "audio.bin", "video.bin", "text_KD_audio.bin", "text_KD_video.bin"),
          Context.pickles),
    Stage("fusion", "multimodal_fusion.py", (), "fusion", Context.pickles,
          lambda c: c.bins("multimodal_fusion_best.bin", "multimodal_fusion_best.json",
                           "multimodal_fusion_metrics.json")),
)

# Completion records among the outputs: written last by their stage, they say ``complete: true``
# only when the whole artifact set is published.
RECORDS = ("text.json", "audio.json", "video.json", "text_KD_audio.json", "text_KD_video.json",
           "extraction.json", "first_stage_features.json", "multimodal_fusion_metrics.json")


def incomplete(outputs: Sequence[Path]) -> Path | None:
    """The first completion record among ``outputs`` that does not say ``complete: true``."""
    for path in outputs:
        if path.name in RECORDS and path.exists():
            record = read_record(path)
            if record is None or record.get("complete") is not True:
                return path
    return None


def up_to_date(inputs: Sequence[Path], outputs: Sequence[Path]) -> bool:
    """All outputs exist, their completion records say complete, and none is older than any existing input."""
    if not outputs or not all(p.exists() for p in outputs) or incomplete(outputs) is not None:
        return False
    newest_input = max((p.stat().st_mtime for p in inputs if p.exists()), default=0.0)
    return min(p.stat().st_mtime for p in outputs) >= newest_input


# Flags that do not change a stage's outputs (where, on what, how loud): never a reason to re-run it.
NOT_OUTPUT_FLAGS = frozenset({"data_dir", "pretrained_dir", "save_dir", "feature_dir", "device", "num_workers",
                              "debug", "resume", "audio_cache", "audio_cache_dir"})


def flag_values(argv: Sequence[str]) -> dict[str, list[str]]:
    """``--name value ...`` pairs of a stage's argv (``--name=value``; a bare ``--name`` is True)."""
    values: dict[str, list[str]] = {}
    name = None
    for token in argv:
        if token.startswith("--"):
            name, _, value = token[2:].partition("=")
            values[name] = [value] if value else []
        elif name is not None:
            values[name].append(token)
    return {k: v or ["True"] for k, v in values.items()}


def _same(recorded: Any, requested: list[str]) -> bool:
    """A recorded argument (JSON value) equals the requested flag's text(s)."""
    items = recorded if isinstance(recorded, list) else [recorded]
    if len(items) != len(requested):
        return False
    for old, new in zip(items, requested):
        if isinstance(old, bool) or str(old) in ("True", "False"):
            try:
                if utils.str2bool(str(old)) != utils.str2bool(new):
                    return False
            except argparse.ArgumentTypeError:
                return False
        elif isinstance(old, (int, float)):
            try:
                if float(old) != float(new):
                    return False
            except ValueError:
                return False
        elif str(old) != new:
            return False
    return True


def changed_flags(outputs: Sequence[Path], argv: Sequence[str]) -> list[str]:
    """The output-changing flags of ``argv`` whose values differ from those the stage's completion
    record holds (``--epochs 1 then, 3 now``); empty without a record of arguments."""
    record = next((read_record(p) for p in outputs if p.name in RECORDS and p.exists()), None)
    recorded = record.get("args") if record is not None else None
    if not isinstance(recorded, dict):
        return []
    return [f"--{name} {recorded.get(name)} then, {' '.join(value)} now"
            for name, value in flag_values(argv).items()
            if name not in NOT_OUTPUT_FLAGS and not _same(recorded.get(name), value)]


def stage_argv(stage: Stage, ctx: Context, args: argparse.Namespace) -> list[str]:
    """The flags this stage takes, from the pipeline's own."""
    argv = list(stage.args)
    if stage.kind == "prepare":
        return argv + ["--data_dir", str(ctx.data_dir)]
    if stage.kind == "fusion":
        argv += ["--feature_dir", str(ctx.feature_dir), "--save_dir", str(ctx.save_dir)]
        if args.fusion_epochs is not None:
            argv += ["--epochs", str(args.fusion_epochs)]
    else:
        argv += ["--data_dir", str(ctx.data_dir), "--pretrained_dir", str(ctx.pretrained_dir),
                 "--save_dir", str(ctx.save_dir), "--feature_dir", str(ctx.feature_dir),
                 "--num_workers", str(args.num_workers)]
    if args.device and stage.kind != "frames":
        argv += ["--device", args.device]
    if stage.kind == "train":
        if args.epochs is not None:
            argv += ["--epochs", str(args.epochs)]
        if args.learning_rate is not None:
            argv += ["--learning_rate", str(args.learning_rate)]
        if args.per_batch_schedule:
            argv += ["--per_batch_schedule", "True"]
    if stage.kind in ("train", "fusion") and args.seeds:
        argv += ["--seeds", *map(str, args.seeds)]
    if stage.kind == "fusion" and args.fusion_args:
        argv += shlex.split(args.fusion_args)
    return argv


def load_script(path: Path) -> ModuleType:
    """Import a stage script (``<repo>/<DS>/<name>.py``) as a module; its ``main(argv)`` takes the CLI flags."""
    module_spec = importlib.util.spec_from_file_location(f"_stage_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module  # dataclasses look their module up while the script runs
    module_spec.loader.exec_module(module)
    return module


# Stages that run data-parallel under torchrun (`--nproc_per_node`); preparation and the fusion run
# in one process (the fusion takes minutes and says so under torchrun).
DATA_PARALLEL = ("train", "frames", "extract")


def launcher(stage: Stage, nproc_per_node: int) -> list[str]:
    """The interpreter command that runs ``stage``: torchrun with ``nproc_per_node`` processes for the
    data-parallel stages when more than one is asked for, else plain python."""
    if nproc_per_node > 1 and stage.kind in DATA_PARALLEL:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                str(nproc_per_node)]
    return [sys.executable]


def run_script(path: Path, argv: list[str], in_process: bool, command: Sequence[str] = (sys.executable,)) -> None:
    if in_process:
        load_script(path).main(argv)
    else:
        # On Ctrl-C the stage (same process group) stops quietly; the pipeline prints the one line.
        subprocess.run([*command, str(path), *argv], check=True, env={**os.environ, utils.QUIET_INTERRUPT: "1"})


def run(args: argparse.Namespace) -> dict[str, float]:
    """Run (or skip) each stage in order; returns seconds per stage that ran."""
    spec = dataset_spec(args.dataset)
    script_dir = REPO / spec.name
    # Relative folders are the caller's (resolved against the working directory), never the repository's.
    ctx = Context(
        spec,
        Path(args.data_dir or spec.default_data_dir(script_dir)).absolute(),
        Path(args.pretrained_dir or spec.default_pretrained_dir(script_dir)).absolute(),
        Path(args.save_dir or spec.default_save_dir(script_dir)).absolute(),
        Path(args.feature_dir or spec.default_feature_dir(script_dir)).absolute(),
    )
    seconds: dict[str, float] = {}
    for stage in STAGES:
        argv = stage_argv(stage, ctx, args)
        changed = changed_flags(stage.outputs(ctx), argv) if stage.kind in ("train", "fusion") else []
        if not args.force and not changed and up_to_date(stage.inputs(ctx), stage.outputs(ctx)):
            log.info("[%s] %s: outputs up to date, skipped", spec.name, stage.name)
            continue
        if changed:
            log.info("[%s] %s: re-running %s, its outputs were made with other settings (%s)", spec.name,
                     stage.name, stage.script, "; ".join(changed))
        unfinished = incomplete(stage.outputs(ctx))
        if unfinished is not None:
            log.warning("[%s] %s: %s says its last run did not finish; re-running %s", spec.name, stage.name,
                        unfinished, stage.script)
        command = launcher(stage, args.nproc_per_node)
        log.info("[%s] %s: %s%s %s", spec.name, stage.name, " ".join(command[1:]) + " " if command[1:] else "",
                 stage.script, " ".join(argv))
        started = time.time()
        try:
            run_script(script_dir / stage.script, argv, args.in_process, command)
        except KeyboardInterrupt as err:
            raise utils.Interrupted(
                f"[{spec.name}] stage '{stage.name}' ({stage.script}) was interrupted; the previous complete "
                f"outputs are kept. Run the same command again: finished stages are skipped and '{stage.name}' "
                "restarts cleanly") from err
        except subprocess.CalledProcessError as err:  # the stage printed its own message (a user error: one line)
            status = err.returncode
            how = f"killed by signal {-status}" if status < 0 else f"exit status {status}"
            raise PipelineError(f"[{spec.name}] stage '{stage.name}' ({stage.script}) failed ({how}; its message is "
                                f"above)", status if status > 0 else 1) from err
        except SystemExit as err:  # argparse errors and explicit exits of an in-process stage
            if err.code not in (0, None):
                raise PipelineError(f"[{spec.name}] stage '{stage.name}' ({stage.script}) failed: {err}") from err
        except Exception as err:
            raise PipelineError(f"[{spec.name}] stage '{stage.name}' ({stage.script}) failed: {err}") from err
        seconds[stage.name] = round(time.time() - started, 2)
    return seconds


# --------------------------------------------------------------------------- predict.py: a user's conversation

def predict_conversation(spec: DatasetSpec, args: argparse.Namespace, device: torch.device,
                         default_features: tuple[str, str]) -> dict[str, Any]:
    """``<DS>/predict.py``: the pipeline's own code on one conversation CSV (docs/METHOD.md §0).

    Frame extraction (stage 3) into the conversation's own folder under ``<feature_dir>/predict``,
    the five first-stage models (stage 7) written as a feature pickle, and the fusion model in
    evaluation mode (stage 8); the predictions are written in the CSV's order with the substitution
    report beside them. ``default_features``: the fusion's (audio, video) feature keys when its
    metrics document does not say what it was trained with.
    """
    stage = f"{spec.name} predict"
    files = StageFiles.fusion(args.save_dir)
    check_out(args, [args.conversation, files.checkpoint, files.metrics,
                     *(Path(args.save_dir) / f"{name}.{ext}" for name, _ in FIRST_STAGE_MODELS.values()
                       for ext in ("bin", "json"))])
    # Data: the conversation in file order, its dialogues in the feature pickle's order, the speaker map
    utterances = load_conversation(spec, args.conversation, args.data_dir, csv_relative=True)
    check_media(args.conversation, utterances)
    dialogues = group_dialogues(utterances)
    ordered = [u for _, dialogue in dialogues for u in dialogue]
    split, work_dir = ordered[0].split, Path(args.feature_dir) / "predict"
    speaker2id = load_speaker2id(args.data_dir) if spec.global_speaker_ids else None

    # Models, checked before any work: the fusion checkpoint is this dataset's, the five first-stage ones exist
    sizes = fusion_sizes_for(spec, files.checkpoint, speaker2id, with_variant=True)
    variant = utils.fusion_variant(args, sizes["variant"], f"fusion checkpoint {files.checkpoint}")
    check_first_stage_checkpoints(spec, args.save_dir)
    trained = recorded_args(files.metrics)
    audio_key = args.audio_feature or trained.get("audio_feature", default_features[0])
    video_key = args.video_feature or trained.get("video_feature", default_features[1])
    n_head = args.n_head or int(trained.get("n_head", 8))
    padding = int(sizes["n_speaker"] or 0) if args.unknown_speakers == "padding" else None
    speakers = [s for _, dialogue in dialogues for s in fusion_speaker_ids(spec, dialogue, speaker2id, padding)]
    utils.log_start(stage, args, device, {"dialogues": len(dialogues), "utterances": len(ordered),
                                          "audio_feature": audio_key, "video_feature": video_key, "n_head": n_head})

    # Frames (stage 3) into this conversation's own folder: resumable, never the dataset's frames
    jobs = plan_jobs(spec, ordered, work_dir, args.channel_order)
    frames = extract_frames(jobs, load_image_processor(args.pretrained_dir), args.num_workers,
                            work_dir / "video" / split / FRAMES_REPORT)

    # Features (stage 7): the five first-stage models, written as a feature pickle
    report = SubstitutionReport()
    vectors = first_stage_features(
        spec, {split: build_samples(ordered)}, pretrained_dir=args.pretrained_dir, save_dir=args.save_dir,
        feature_dir=work_dir, device=device, batch_size=args.batch_size, num_workers=args.num_workers,
        amp=args.amp, report=report, audio_cache=utils.audio_cache_dir(args), prompt=args.prompt)[split]
    features = assemble_features([u.dialogue_id for u in ordered], [u.utterance_id for u in ordered],
                                 [u.label for u in ordered], speakers, vectors)
    pickle_path = save_features(feature_path(work_dir, split), features)

    # Fusion (stage 8) on the pickle, in evaluation mode (no dropout)
    data = load_dialogues(pickle_path, audio_key, video_key, device, variant["modalities"])
    width = fusion_width(None, n_head, data.width, str(pickle_path))
    if sizes["hidden"] != width:
        raise CheckpointError(f"fusion checkpoint {files.checkpoint} has width {sizes['hidden']} but the "
                              f"first-stage features in {pickle_path} have width {width}")
    fusion = AnchorGatedTransformer(width, spec.num_classes, sizes["n_speaker"], n_head, 0.0,
                                    bool(sizes["separate_text_blocks"]), **variant)
    load_fusion_checkpoint(fusion, files.checkpoint)
    logits = dialogue_logits(fusion.to(device), data, args.batch_size, show_progress=True)

    # Artifacts: the substitution report, then the predictions in file order (each written atomically)
    report.extend(frames)
    table = prediction_table(spec, utterances, ordered, logits)
    report_path = report.write(args.out.with_name(f"{args.out.stem}_substitutions.tsv"))
    write_text(args.out, table.to_csv(index=False, float_format="%.6f"))
    print(prediction_summary(table))
    log.info("%s: wrote %s (%d utterances); %d media substitutions listed in %s", stage, args.out, len(table),
             len(report), report_path)
    return {"paths": {"predictions": str(args.out), "substitutions": str(report_path), "features": str(pickle_path)},
            "emotions": table["emotion"].tolist(), "substituted": len(report)}


def check_out(args: argparse.Namespace, inputs: Sequence[Path]) -> None:
    """``--out`` (and the report beside it) must be a new or a plain file, never one of the inputs:
    refused before any work, so a mistyped flag never overwrites the user's conversation."""
    out = Path(args.out)
    if out.is_dir():
        raise utils.UserError(f"--out {out} is a folder; name the predictions CSV to write, e.g. {out / 'predictions.csv'}")
    report = out.with_name(f"{out.stem}_substitutions.tsv")
    for path in (out, report):
        for given in inputs:
            if path.resolve() == Path(given).resolve():
                raise utils.UserError(f"--out {out} would overwrite the input {given}"
                                      f"{' (with its substitution report)' if path == report else ''}; "
                                      "choose another --out")


def check_media(conversation: Path, utterances: Sequence[Utterance]) -> None:
    """Stop when no clip of a modality exists (predictions on silence and black frames only);
    warn about empty utterances, naming their rows."""
    for what, paths in (("audio", [u.audio_path for u in utterances]), ("video", [u.video_path for u in utterances])):
        missing = sorted({str(p) for p in paths if not p.is_file()})
        if len(missing) == len(set(map(str, paths))):
            raise utils.UserError(
                f"{conversation}: none of its {len(missing)} {what} file(s) exists (e.g. {', '.join(missing[:3])}); "
                "relative paths resolve against the conversation's folder, then --data_dir (docs/METHOD.md §0)")
    empty = [u.row for u in utterances if not str(u.text).strip()]
    if empty:
        log.warning("%s: rows %s have an empty Utterance: their text model sees only the prompt", conversation,
                    ", ".join(map(str, empty[:20])) + (" ..." if len(empty) > 20 else ""))


def prediction_table(spec: DatasetSpec, utterances: Sequence[Utterance], ordered: Sequence[Utterance],
                     logits: torch.Tensor) -> pd.DataFrame:
    """Predictions of a conversation in file order (``utterances``), from fusion logits in pickle order.

    ``ordered`` are the same utterances in the order of ``logits``' rows (the
    feature pickle's: grouped by dialogue). Columns: ``Dialogue_ID``,
    ``Utterance_ID``, ``Speaker``, ``Utterance``, ``emotion`` (the argmax, as the
    fusion stage predicts) and ``p_<label>`` (softmax) for every label.
    """
    if logits.shape != (len(ordered), spec.num_classes) or len(ordered) != len(utterances):
        raise ValueError(f"{len(utterances)} utterances, {len(ordered)} ordered, logits {tuple(logits.shape)}")
    row_of = {utt.key: i for i, utt in enumerate(ordered)}
    index = torch.tensor([row_of[utt.key] for utt in utterances], dtype=torch.long)
    logits = logits.detach().cpu()[index]
    probs = torch.softmax(logits.double(), dim=-1).numpy()
    table = pd.DataFrame({
        "Dialogue_ID": [u.dialogue_id for u in utterances], "Utterance_ID": [u.utterance_id for u in utterances],
        "Speaker": [u.speaker for u in utterances], "Utterance": [u.text for u in utterances],
        "emotion": [spec.labels[i] for i in logits.argmax(-1).tolist()],
    })
    for j, label in enumerate(spec.labels):
        table[f"p_{label}"] = probs[:, j]
    return table


def prediction_summary(table: pd.DataFrame, width: int = 48) -> str:
    """A short console table: ids, speaker, emotion and its probability, the utterance cut to ``width``."""
    probability = [row[f"p_{row['emotion']}"] for _, row in table.iterrows()]
    short = table[["Dialogue_ID", "Utterance_ID", "Speaker", "emotion"]].assign(
        p=[f"{p:.2f}" for p in probability],
        Utterance=[t if len(t) <= width else t[: width - 3] + "..." for t in table["Utterance"]],
    )
    return short.to_string(index=False)


# --------------------------------------------------------------------------- ablation tables (<DS>/ablation.py)

@dataclass(frozen=True)
class Variant:
    """One row of an ablation table: the folder ``key``, the printed ``name``, the stage flags that make it,
    and the row it is tested against (``baseline``; None: it is the reference)."""
    key: str
    name: str
    argv: tuple[str, ...] = ()
    baseline: str | None = None
    script: str = "multimodal_fusion.py"
    model: str = "multimodal_fusion"  # the checkpoint's name (kd: the first-stage model)
    text_argv: tuple[str, ...] = ()  # prompt table: the flags of text.py that make it (the fusion gets none)


ABLATION_TABLES = ("modalities", "components", "kd", "prompt")
ABLATION_RECORD = "ablation_variant.json"  # per variant folder: its setting, seeds' rows and predictions
_SUBSETS = ("T", "A", "V", "T+A", "T+V", "A+V", "T+A+V")
CAPTIONS = {
    "modalities": "The fusion on each subset of modalities (docs/METHOD.md §5, Ablation variants), trained on "
                  "the same first-stage feature pickles; tested against T+A+V.",
    "components": "The full model without each component: gates (identity), speaker embedding, the fusion's "
                  "distillation terms (alpha = beta = 0), the distilled first-stage features (audio / video "
                  "instead of audio_kd / video_kd), and the concat baseline instead of the anchors; tested "
                  "against the full model.",
    "kd": "The first-stage models themselves on test (the utterance-level classifiers of docs/METHOD.md §2-3); "
          "each distilled student is tested against its undistilled model.",
    "prompt": "Each text-prompt variant (docs/METHOD.md §2): text.py trained with it (one model, the first seed), "
              "the first-stage features extracted with it (audio, video and the KD students unchanged: the "
              "pipeline's checkpoints), and the fusion trained on them per seed; tested against the full prompt "
              "under the same protocol.",
}


def ablation_variants(table: str, spec: DatasetSpec) -> list[Variant]:
    """The rows of ``table`` (one of :data:`ABLATION_TABLES`), the reference first where it has one."""
    if table == "modalities":
        return [Variant(key, key, ("--modalities", *key.split("+")), None if key == "T+A+V" else "T+A+V")
                for key in _SUBSETS]
    if table == "components":
        rows = [("full", "full model", ()), ("no_gates", "without gates", ("--gates", "False")),
                ("no_speaker_embedding", "without speaker embedding", ("--speaker_embedding", "False")),
                ("no_fusion_kd", "without fusion KD (alpha = beta = 0)", ("--alpha", "0", "--beta", "0")),
                ("no_kd_features", "without distilled features (audio, video)",
                 ("--audio_feature", "audio", "--video_feature", "video")),
                ("concat", "concat fusion instead of anchors", ("--fusion", "concat"))]
        return [Variant(key, name, argv, None if key == "full" else "full") for key, name, argv in rows]
    if table == "kd":
        return [Variant("text", "text", (), None, "text.py", "text"),
                Variant("audio", "audio", (), None, "audio.py", "audio"),
                Variant("audio_kd", "audio distilled (text -> audio)", ("--student", "audio", "--teacher", "text"),
                        "audio", "KD.py", "text_KD_audio"),
                Variant("video", "video", (), None, "video.py", "video"),
                Variant("video_kd", "video distilled (text -> video)", ("--student", "video", "--teacher", "text"),
                        "video", "KD.py", "text_KD_video")]
    if table == "prompt":
        return [Variant(key, f"prompt {key}", (), None if key == "full" else "full", text_argv=("--prompt", key))
                for key in PROMPTS]
    raise utils.UserError(f"--table {table}: expected one of {', '.join(ABLATION_TABLES)}")


def run_ablation(spec: DatasetSpec, args: argparse.Namespace, extra: Sequence[str]) -> dict[str, Any]:
    """``<DS>/ablation.py``: every variant of ``args.table`` over ``args.seeds`` (each in
    ``<save_dir>/ablation/<table>/<variant>/``; a finished one with the same setting is skipped), then the
    table (`magtkd.results.write_ablation`). ``extra``: flags passed through to every run of the stage."""
    table_dir = Path(args.save_dir) / "ablation" / args.table
    runs = {}
    for variant in ablation_variants(args.table, spec):
        folder = table_dir / variant.key
        setting = {"table": args.table, "variant": variant.key, "argv": [*variant.argv, *extra],
                   "seeds": list(args.seeds), "train": bool(args.train), "feature_dir": str(args.feature_dir)}
        if args.table == "prompt":  # the text model is part of the setting: new text flags re-run the variant
            setting["text_argv"] = [*variant.text_argv, *shlex.split(args.text_args)]
        record = read_record(folder / ABLATION_RECORD)
        if record is not None and record.get("complete") is True and record.get("setting") == setting:
            log.info("ablation %s: %s finished before with this setting, skipped", args.table, variant.key)
            runs[variant.key] = record
            continue
        log.info("ablation %s: running %s (%s)", args.table, variant.key, " ".join(setting["argv"]) or "defaults")
        if args.table == "kd":
            rows = _first_stage_variant(spec, args, variant, folder, list(extra))
        else:
            feature_dir = _prompt_features(spec, args, setting["text_argv"], folder) if args.table == "prompt" \
                else Path(args.feature_dir)
            rows = _fusion_variant(spec, args, variant, folder, feature_dir, list(extra))
        runs[variant.key] = {"complete": True, "setting": setting, **rows}
        write_json(folder / ABLATION_RECORD, runs[variant.key])
    return results.write_ablation(Path(args.save_dir) / "ablation", args.table, spec.name,
                                  ablation_variants(args.table, spec), runs, CAPTIONS[args.table])


def _stage(spec: DatasetSpec, script: str, argv: list[str]) -> dict[str, Any]:
    log.info("[%s] %s %s", spec.name, script, " ".join(argv))
    return load_script(REPO / spec.name / script).main(argv)


def _fusion_variant(spec: DatasetSpec, args: argparse.Namespace, variant: Variant, folder: Path,
                    feature_dir: Path, extra: list[str]) -> dict[str, Any]:
    """Train the fusion variant once per seed into ``folder``; its seeds' rows and test predictions."""
    argv = [*variant.argv, *extra, "--feature_dir", str(feature_dir), "--save_dir", str(folder),
            "--seeds", *map(str, args.seeds)] + (["--device", args.device] if args.device else [])
    _stage(spec, variant.script, argv)
    test = load_features(feature_path(feature_dir, "test"), keys=())
    dialogues = [i for i, vid in enumerate(test["vids"]) for _ in test["labels"][vid]]
    seeds = []
    for seed in args.seeds:
        files = StageFiles.fusion(folder, utils.seed_tag(seed, args.seeds))
        doc, out = read_record(files.metrics), read_record(files.predictions)
        seeds.append({**results.seed_row(seed, doc, doc["labels"]), "labels": out["labels"], "preds": out["preds"]})
    return {"labels": list(doc["labels"]), "dialogues": dialogues, "seeds": seeds}


def _first_stage_variant(spec: DatasetSpec, args: argparse.Namespace, variant: Variant, folder: Path,
                         extra: list[str]) -> dict[str, Any]:
    """A first-stage model's test predictions per seed: ``--train True`` trains it into ``folder`` (the KD
    teacher and the audio student's start are the pipeline's ``text.bin`` / ``audio.bin``); ``--train False``
    evaluates ``<save_dir>/<name>_seed<S>.bin`` (or the one ``<name>.bin``, with the seed it recorded)."""
    save_dir = Path(args.save_dir)
    paths = ["--data_dir", str(args.data_dir), "--pretrained_dir", str(args.pretrained_dir),
             "--feature_dir", str(args.feature_dir)] + (["--device", args.device] if args.device else [])
    if args.train:
        folder.mkdir(parents=True, exist_ok=True)
        for needed in (["text"] + (["audio"] if variant.model == "text_KD_audio" else [])) \
                if variant.script == "KD.py" else []:
            for suffix in (".bin", ".json"):
                link_file(save_dir / f"{needed}{suffix}", folder / f"{needed}{suffix}")
        _stage(spec, variant.script, [*variant.argv, *extra, *paths, "--save_dir", str(folder),
                                      "--seeds", *map(str, args.seeds)])
        save_dir = folder
    samples = load_samples(spec, args.data_dir, ("test",))["test"]
    dialogues = [s.utterance.dialogue_id for s in samples]
    seeds = []
    for seed in args.seeds:
        tagged = save_dir / f"{variant.model}{utils.seed_tag(seed, args.seeds)}"
        source = tagged if tagged.with_suffix(".bin").is_file() else save_dir / variant.model
        doc = read_record(source.with_suffix(".json"))
        if doc is None or not source.with_suffix(".bin").is_file():
            raise utils.UserError(f"{source}.bin (or its .json) not found: train {spec.name}/{variant.script} "
                                  f"with --seeds {' '.join(map(str, args.seeds))}, or run the table with --train True")
        recorded = int(doc["args"]["seed"])
        if any(row["seed"] == recorded for row in seeds):
            log.warning("ablation kd: %s holds one model (seed %d), not one per seed", source, recorded)
            continue
        evaluation = folder / f"seed{recorded}"
        evaluation.mkdir(parents=True, exist_ok=True)
        for suffix in (".bin", ".json"):  # the script evaluates <save_dir>/<name>.bin
            link_file(source.with_suffix(suffix), evaluation / f"{variant.model}{suffix}")
        out = _stage(spec, variant.script, [*variant.argv, *extra, *paths, "--save_dir", str(evaluation),
                                            "--train", "False"])
        row = {**results.seed_row(recorded, {**doc, "test": out}, list(spec.labels)),
               "labels": out["labels"], "preds": out["preds"]}
        seeds.append(row)
    return {"labels": list(spec.labels), "dialogues": dialogues, "seeds": seeds}


def _prompt_features(spec: DatasetSpec, args: argparse.Namespace, text_flags: list[str], folder: Path) -> Path:
    """The prompt table's first stage: text.py trained with ``text_flags`` (the row's setting: its prompt and
    ``--text_args``; the first seed), then the
    feature pickles extracted with it and the pipeline's other four checkpoints; returns their folder."""
    save_dir, models = Path(args.save_dir), folder / "save_model"
    feature_dir = folder / "feature"
    paths = ["--data_dir", str(args.data_dir), "--pretrained_dir", str(args.pretrained_dir)] + \
        (["--device", args.device] if args.device else [])
    text_argv = [*text_flags, *paths, "--feature_dir", str(args.feature_dir),
                 "--save_dir", str(models), "--seed", str(args.seeds[0])]
    _stage(spec, "text.py", text_argv)
    for name in ("audio", "video", "text_KD_audio", "text_KD_video"):
        for suffix in (".bin", ".json"):
            link_file(save_dir / f"{name}{suffix}", models / f"{name}{suffix}")
    # Extraction reads the stored frames under --feature_dir: the pipeline's, linked in
    feature_dir.mkdir(parents=True, exist_ok=True)
    frames = Path(args.feature_dir) / "video"
    if frames.exists() and not (feature_dir / "video").exists():
        os.symlink(frames.absolute(), feature_dir / "video", target_is_directory=True)
    _stage(spec, "extract_first_stage_features.py", [*paths, "--save_dir", str(models),
                                                     "--feature_dir", str(feature_dir)])
    return feature_dir


def link_file(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` (a copy across file systems): checkpoints are large."""
    if not src.is_file():
        raise utils.UserError(f"{src} not found: the ablation needs the pipeline's {src.name} (run {src.parent.parent.name}"
                              f"/run.sh first, or pass its --save_dir)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        copy_file(src, dst)


def ablation_parser(spec: DatasetSpec, script_dir: Path, description: str | None) -> argparse.ArgumentParser:
    """``<DS>/ablation.py``'s own flags; every other flag passes through to the stage runs."""
    p = argparse.ArgumentParser(description=description, formatter_class=utils.HelpFormatter, allow_abbrev=False)
    p.add_argument("--table", choices=ABLATION_TABLES, required=True)
    p.add_argument("--seeds", type=int, nargs="+", required=True, help="one run per seed of every variant")
    p.add_argument("--train", type=utils.str2bool, default=False,
                   help="kd table: True trains the first-stage models; False tests the saved ones")
    p.add_argument("--device", default=None, help="cuda, cpu; None = CUDA when available")
    p.add_argument("--data_dir", type=Path, default=spec.default_data_dir(script_dir))
    p.add_argument("--pretrained_dir", type=Path, default=spec.default_pretrained_dir(script_dir))
    p.add_argument("--save_dir", type=Path, default=spec.default_save_dir(script_dir),
                   help="the pipeline's checkpoints; the tables go to <save_dir>/ablation/")
    p.add_argument("--feature_dir", type=Path, default=spec.default_feature_dir(script_dir),
                   help="the first-stage feature pickles (and stored frames)")
    p.add_argument("--text_args", default="",
                   help='prompt table: flags for text.py, e.g. "--epochs 2 --learning_rate 1e-3" (the other flags '
                        "go to the fusion)")
    return utils.add_debug_flag(p)


def ablation_main(spec: DatasetSpec, script_dir: Path, description: str | None,
                  argv: Sequence[str] | None = None) -> dict[str, Any]:
    args, extra = ablation_parser(spec, script_dir, description).parse_known_args(argv)
    setup_logging()
    if len(set(args.seeds)) != len(args.seeds):
        raise utils.UserError(f"--seeds lists a seed twice: {' '.join(map(str, args.seeds))}")
    return run_ablation(spec, args, extra)


class PipelineError(utils.UserError, RuntimeError):
    """A stage failed; the message names it. ``status``: the exit status to pass on (2: the stage's user error)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status

    def __reduce__(self):  # keeps the status when the error crosses a process boundary (the demo's --jobs)
        return type(self), (str(self), self.status)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=DATASETS)
    env = os.environ.get
    p.add_argument("--data_dir", default=env("DATA_DIR"))
    p.add_argument("--pretrained_dir", default=env("PRETRAINED_DIR"))
    p.add_argument("--save_dir", default=env("SAVE_DIR"))
    p.add_argument("--feature_dir", default=env("FEATURE_DIR"))
    p.add_argument("--device", default=env("DEVICE"))
    p.add_argument("--num_workers", type=utils.nonnegative_int, default=int(env("NUM_WORKERS", "0")))
    p.add_argument("--epochs", type=utils.positive_int, default=int(env("EPOCHS")) if env("EPOCHS") else None,
                   help="epochs of the first-stage and KD trainings (default: each stage's own)")
    p.add_argument("--fusion_epochs", type=utils.positive_int,
                   default=int(env("FUSION_EPOCHS")) if env("FUSION_EPOCHS") else None)
    p.add_argument("--learning_rate", type=utils.positive_float,
                   default=float(env("LEARNING_RATE")) if env("LEARNING_RATE") else None,
                   help="learning rate of the first-stage and KD trainings (default: each stage's own)")
    p.add_argument("--per_batch_schedule", action="store_true",
                   help="first-stage and KD schedules counted in batches (see text.py --help)")
    p.add_argument("--seeds", type=utils.seed_int, nargs="+", default=[int(s) for s in env("SEEDS", "").split()] or None,
                   help="train every first-stage, KD and fusion model once per seed (see text.py --help)")
    p.add_argument("--fusion_args", default=env("FUSION_ARGS", ""),
                   help='extra flags for multimodal_fusion.py, e.g. "--lr 1e-3 --batch_size 2"')
    p.add_argument("--force", action="store_true", help="re-run stages whose outputs are up to date")
    p.add_argument("--in_process", action="store_true", help="call each script's main() in this process")
    p.add_argument("--nproc_per_node", type=utils.positive_int, default=int(env("NPROC_PER_NODE", "1")),
                   help="processes (one per GPU) for the stages that run data-parallel: each is launched as "
                        "python -m torch.distributed.run --standalone --nproc_per_node N <script>; the fusion "
                        "and preparation run in one process")
    return utils.add_debug_flag(p)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    setup_logging()
    args = parser().parse_args(argv)
    if args.in_process and args.nproc_per_node > 1:
        raise utils.UserError("--in_process runs every stage in this one process: it cannot take --nproc_per_node")
    return run(args)  # a PipelineError ends `utils.run` with the failed stage's status


if __name__ == "__main__":
    utils.run(main)
