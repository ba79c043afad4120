"""Run a dataset's whole pipeline: preparation, then the eight stages of docs/METHOD.md §0.

    python -m magtkd.pipeline IEMOCAP [--data_dir D] [--pretrained_dir P] [--epochs 1] [--force]

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
from .artifacts import (FIRST_STAGE_MODELS, FRAMES_REPORT, StageFiles, SubstitutionReport, feature_path, features_record, frames_record,
                        read_record, write_text)
from .dataset import (SPLITS, DatasetSpec, Utterance, build_samples, fusion_speaker_ids, group_dialogues,
                      load_conversation, load_speaker2id)
from .engine import dialogue_logits
from .features import (assemble_features, check_first_stage_checkpoints, extract_frames, first_stage_features,
                       load_dialogues, plan_jobs, save_features)
from .model import (AnchorGatedTransformer, CheckpointError, fusion_sizes_for, fusion_width,
                    load_fusion_checkpoint)
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


def run_script(path: Path, argv: list[str], in_process: bool) -> None:
    if in_process:
        load_script(path).main(argv)
    else:
        # On Ctrl-C the stage (same process group) stops quietly; the pipeline prints the one line.
        subprocess.run([sys.executable, str(path), *argv], check=True, env={**os.environ, utils.QUIET_INTERRUPT: "1"})


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
        log.info("[%s] %s: %s %s", spec.name, stage.name, stage.script, " ".join(argv))
        started = time.time()
        try:
            run_script(script_dir / stage.script, argv, args.in_process)
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
    sizes = fusion_sizes_for(spec, files.checkpoint, speaker2id)
    check_first_stage_checkpoints(spec, args.save_dir)
    trained = recorded_args(files.metrics)
    audio_key = args.audio_feature or trained.get("audio_feature", default_features[0])
    video_key = args.video_feature or trained.get("video_feature", default_features[1])
    n_head = args.n_head or int(trained.get("n_head", 8))
    padding = int(sizes["n_speaker"]) if args.unknown_speakers == "padding" else None
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
        amp=args.amp, report=report, audio_cache=utils.audio_cache_dir(args))[split]
    features = assemble_features([u.dialogue_id for u in ordered], [u.utterance_id for u in ordered],
                                 [u.label for u in ordered], speakers, vectors)
    pickle_path = save_features(feature_path(work_dir, split), features)

    # Fusion (stage 8) on the pickle, in evaluation mode (no dropout)
    data = load_dialogues(pickle_path, audio_key, video_key, device)
    width = fusion_width(None, n_head, data.width, str(pickle_path))
    if sizes["hidden"] != width:
        raise CheckpointError(f"fusion checkpoint {files.checkpoint} has width {sizes['hidden']} but the "
                              f"first-stage features in {pickle_path} have width {width}")
    fusion = AnchorGatedTransformer(width, spec.num_classes, int(sizes["n_speaker"]), n_head, 0.0,
                                    bool(sizes["separate_text_blocks"]))
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


def recorded_args(metrics: Path) -> dict[str, Any]:
    """The arguments a training stage recorded in its metrics document (``{}`` when there is none):
    the settings a checkpoint does not show, such as the fusion's ``n_head``."""
    doc = read_record(metrics)
    if doc is None:
        if metrics.exists():
            log.warning("%s is not a metrics document; using the default settings", metrics)
        return {}
    return doc["args"] if isinstance(doc.get("args"), dict) else {}


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
    return utils.add_debug_flag(p)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    setup_logging()
    args = parser().parse_args(argv)
    try:
        return run(args)
    except PipelineError as err:
        log.error("%s", err)
        raise SystemExit(err.status) from err


if __name__ == "__main__":
    utils.run(main)
