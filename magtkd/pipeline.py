"""Run a dataset's whole pipeline: preparation, then the eight stages of docs/METHOD.md §0.

    bash IEMOCAP/run.sh [--data_dir D] [--pretrained_dir P] [--epochs 1] [--force] [--nproc_per_node N]

(``run.sh`` runs ``<DS>/pipeline.py``, which hands this module its dataset's description and stage
scripts; ``python -m magtkd.pipeline IEMOCAP ...`` runs the same.) Stages run in the seed README's order
and the run stops at the first failure, naming the stage. A stage whose outputs all exist, are newer
than its inputs and whose completion record says the run finished is skipped (``--force`` re-runs
everything); a stage whose record says its run was interrupted is re-run, and so is a training stage
whose record holds other values of the flags passed now (`changed_flags`, docs/METHOD.md §6). Relative
folders are taken from the directory the command was called from. Each stage runs as its own process,
exactly as a user would run the script; ``--in_process`` calls the scripts' ``main()`` instead (used by
the demo to save interpreter start-ups). The seconds of each stage that ran go to
``<save_dir>/pipeline.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .artifacts import (FIRST_STAGE_MODELS, StageFiles, feature_path, features_record, frames_record, output_lock,
                        read_record, write_json)
from .cli import pipeline_parser
from .flag_parser import check_path
from .runtime import setup_logging
from .spec import SPLITS, DatasetSpec
from .utils import PARSED, QUIET_INTERRUPT, Interrupted, StageMain, UserError, limit_line, run as run_main, str2bool

log = logging.getLogger("magtkd")
REPO = Path(__file__).resolve().parents[1]
DATASETS = ("IEMOCAP", "MELD")
RUN_RECORD = "pipeline.json"  # in the save folder: the stages of the last pipeline run and their seconds


@dataclass(frozen=True)
class Context:
    """One pipeline run's dataset and folders, and the files each stage reads and writes there."""

    spec: DatasetSpec
    data_dir: Path
    pretrained_dir: Path
    save_dir: Path
    feature_dir: Path

    def raw(self) -> list[Path]:
        return sorted(p for pattern in self.spec.raw_files for p in self.data_dir.glob(pattern))

    def csvs(self) -> list[Path]:
        return [self.data_dir / self.spec.csv_names[s] for s in SPLITS]

    def bins(self, *keys: str) -> list[Path]:
        """The checkpoints of first-stage models (feature keys of `FIRST_STAGE_MODELS`)."""
        return [StageFiles.first_stage(self.save_dir, FIRST_STAGE_MODELS[key][0]).checkpoint for key in keys]

    def trained(self, key: str) -> list[Path]:
        """A first-stage model's checkpoint and its metrics document (its completion record)."""
        files = StageFiles.first_stage(self.save_dir, FIRST_STAGE_MODELS[key][0])
        return [files.checkpoint, files.metrics]

    def frames_done(self) -> list[Path]:
        # The completion record, written last by video_feature_extract.py, after every frame file.
        return [frames_record(self.feature_dir)]

    def pickles(self) -> list[Path]:
        return [feature_path(self.feature_dir, s) for s in SPLITS] + [features_record(self.feature_dir)]

    def fusion(self) -> list[Path]:
        files = StageFiles.fusion(self.save_dir)
        return [files.checkpoint, files.predictions, files.metrics]


@dataclass(frozen=True)
class Stage:
    name: str
    script: str
    args: tuple[str, ...]
    kind: str  # which pipeline flags it takes: prepare | train | frames | extract | fusion
    inputs: Callable[[Context], list[Path]]
    outputs: Callable[[Context], list[Path]]  # the completion record (when it has one) last

    def record(self, ctx: Context) -> Path | None:
        """The stage's completion record: written last, ``complete: true`` only once the whole set is there."""
        return None if self.kind == "prepare" else self.outputs(ctx)[-1]


STAGES = (
    Stage("preprocessing", "preprocessing.py", (), "prepare", Context.raw, Context.csvs),
    Stage("text", "text.py", (), "train", Context.csvs, lambda c: c.trained("text")),
    Stage("audio", "audio.py", (), "train", Context.csvs, lambda c: c.trained("audio")),
    Stage("frames", "video_feature_extract.py", (), "frames", Context.csvs, Context.frames_done),
    Stage("video", "video.py", (), "train", Context.frames_done, lambda c: c.trained("video")),
    Stage("kd_audio", "KD.py", ("--student", "audio", "--teacher", "text"), "train",
          lambda c: c.bins("text", "audio"), lambda c: c.trained("audio_kd")),
    Stage("kd_video", "KD.py", ("--student", "video", "--teacher", "text"), "train",
          lambda c: c.bins("text") + c.frames_done(), lambda c: c.trained("video_kd")),
    Stage("features", "extract_first_stage_features.py", (), "extract", lambda c: c.bins(*FIRST_STAGE_MODELS),
          Context.pickles),
    Stage("fusion", "multimodal_fusion.py", (), "fusion", Context.pickles, Context.fusion),
)


def incomplete(stage: Stage, ctx: Context) -> Path | None:
    """The stage's completion record when it exists and does not say ``complete: true``."""
    record = stage.record(ctx)
    if record is not None and record.exists():
        doc = read_record(record)
        if doc is None or doc.get("complete") is not True:
            return record
    return None


def up_to_date(stage: Stage, ctx: Context) -> bool:
    """All outputs exist, the completion record says complete, and no output is older than an existing input."""
    inputs, outputs = stage.inputs(ctx), stage.outputs(ctx)
    if not outputs or not all(p.exists() for p in outputs) or incomplete(stage, ctx) is not None:
        return False
    newest_input = max((p.stat().st_mtime for p in inputs if p.exists()), default=0.0)
    return min(p.stat().st_mtime for p in outputs) >= newest_input


# Flags that do not change a stage's outputs (where, on what, how loud): never a reason to re-run it.
NOT_OUTPUT_FLAGS = frozenset({"data_dir", "pretrained_dir", "save_dir", "feature_dir", "device", "num_workers",
                              "debug", "resume", "save_state", "dist_timeout", "audio_cache", "audio_cache_dir"})


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
                if str2bool(str(old)) != str2bool(new):
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


def changed_flags(record: Path | None, argv: Sequence[str]) -> list[str]:
    """The output-changing flags of ``argv`` whose values differ from those the stage's completion
    ``record`` holds (``--epochs 1 then, 3 now``); empty without a record of arguments."""
    doc = read_record(record) if record is not None and record.exists() else None
    recorded = doc.get("args") if doc is not None else None
    if not isinstance(recorded, dict):
        return []
    return [f"--{name} {recorded.get(name)} then, {' '.join(value)} now"
            for name, value in flag_values(argv).items()
            if name not in NOT_OUTPUT_FLAGS and not _same(recorded.get(name), value)]


@dataclass(frozen=True)
class Options:
    """The pipeline's own flags that reach the stages (`stage_argv`) and how it runs them."""

    device: str | None
    num_workers: int | None  # None: each stage's default (runtime.loader_workers)
    epochs: int | None
    fusion_epochs: int | None
    learning_rate: float | None
    per_batch_schedule: bool
    seeds: tuple[int, ...] | None
    fusion_args: str
    force: bool
    in_process: bool
    nproc_per_node: int
    dist_timeout: float | None = None  # --dist_timeout, passed on when given (else each stage's default)


def stage_argv(stage: Stage, ctx: Context, options: Options) -> list[str]:
    """The flags this stage takes, from the pipeline's own."""
    argv = list(stage.args)
    if stage.kind == "prepare":
        return argv + ["--data_dir", str(ctx.data_dir)]
    if stage.kind == "fusion":
        argv += ["--feature_dir", str(ctx.feature_dir), "--save_dir", str(ctx.save_dir), "--data_dir", str(ctx.data_dir)]
        if options.fusion_epochs is not None:
            argv += ["--epochs", str(options.fusion_epochs)]
    else:
        argv += ["--data_dir", str(ctx.data_dir), "--pretrained_dir", str(ctx.pretrained_dir),
                 "--save_dir", str(ctx.save_dir), "--feature_dir", str(ctx.feature_dir)]
        if options.num_workers is not None:
            argv += ["--num_workers", str(options.num_workers)]
    if options.device and stage.kind != "frames":
        argv += ["--device", options.device]
    if options.dist_timeout is not None:
        argv += ["--dist_timeout", str(options.dist_timeout)]
    if stage.kind == "train":
        if options.epochs is not None:
            argv += ["--epochs", str(options.epochs)]
        if options.learning_rate is not None:
            argv += ["--learning_rate", str(options.learning_rate)]
        if options.per_batch_schedule:
            argv += ["--per_batch_schedule", "True"]
    if stage.kind in ("train", "fusion") and options.seeds:
        argv += ["--seeds", *map(str, options.seeds)]
    if stage.kind == "fusion" and options.fusion_args:
        argv += shlex.split(options.fusion_args)
    return argv


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


class PipelineError(UserError, RuntimeError):
    """A stage failed; the message names it. ``status``: the exit status to pass on (2: the stage's user error)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status

    def __reduce__(self):  # keeps the status when the error crosses a process boundary
        return type(self), (str(self), self.status)


def run_stage(stage: Stage, ctx: Context, script_dir: Path, mains: Mapping[str, StageMain], options: Options,
              argv: list[str]) -> None:
    """Run one stage: its script as a process (under torchrun where asked), or its ``main`` in this process
    (``--in_process``); a failure becomes a `PipelineError` naming the stage."""
    name, command = f"[{ctx.spec.name}] stage '{stage.name}' ({stage.script})", launcher(stage, options.nproc_per_node)
    log.info("[%s] %s: %s%s %s", ctx.spec.name, stage.name, " ".join(command[1:]) + " " if command[1:] else "",
             stage.script, " ".join(argv))
    try:
        if options.in_process:
            mains[stage.script](argv)
        else:
            # On Ctrl-C the stage (same process group) stops quietly; the pipeline prints the one line.
            subprocess.run([*command, str(script_dir / stage.script), *argv], check=True,
                           env={**os.environ, QUIET_INTERRUPT: "1"})
    except KeyboardInterrupt as err:
        raise Interrupted(f"{name} was interrupted; the previous complete outputs are kept. Run the same command "
                          f"again: finished stages are skipped and '{stage.name}' restarts cleanly") from err
    except subprocess.CalledProcessError as err:  # the stage printed its own message (a user error: one line)
        status = err.returncode
        how = f"killed by signal {-status}" if status < 0 else f"exit status {status}"
        raise PipelineError(f"{name} failed ({how}; its message is above)", status if status > 0 else 1) from err
    except SystemExit as err:  # argparse errors and explicit exits of an in-process stage
        if err.code not in (0, None):
            raise PipelineError(f"{name} failed: {err}") from err
    except Exception as err:
        limit = limit_line(err, stage.script, PARSED)  # an in-process stage out of memory: one line, its knobs
        raise PipelineError(f"{name} failed: {limit or err}", 2 if limit else 1) from err


def run(ctx: Context, script_dir: Path, mains: Mapping[str, StageMain], options: Options) -> dict[str, float]:
    """Run (or skip) each stage in order; returns seconds per stage that ran (also in `RUN_RECORD`)."""
    seconds: dict[str, float] = {}
    for stage in STAGES:
        argv = stage_argv(stage, ctx, options)
        changed = changed_flags(stage.record(ctx), argv) if stage.kind in ("train", "fusion") else []
        if not options.force and not changed and up_to_date(stage, ctx):
            log.info("[%s] %s: outputs up to date, skipped", ctx.spec.name, stage.name)
            continue
        if changed:
            log.info("[%s] %s: re-running %s, its outputs were made with other settings (%s)", ctx.spec.name,
                     stage.name, stage.script, "; ".join(changed))
        unfinished = incomplete(stage, ctx)
        if unfinished is not None:
            log.warning("[%s] %s: %s says its last run did not finish; re-running %s", ctx.spec.name, stage.name,
                        unfinished, stage.script)
        started = time.time()
        run_stage(stage, ctx, script_dir, mains, options, argv)
        seconds[stage.name] = round(time.time() - started, 2)
    write_json(ctx.save_dir / RUN_RECORD, {"dataset": ctx.spec.name, "complete": True, "seconds": seconds})
    return seconds


def main(spec: DatasetSpec, script_dir: Path, mains: Mapping[str, StageMain], description: str | None,
         argv: Sequence[str] | None = None) -> dict[str, float]:
    """``<DS>/pipeline.py``'s body: parse the pipeline's flags and run the dataset's stages."""
    args = pipeline_parser(description).parse_args(argv)
    setup_logging()
    if args.in_process and args.nproc_per_node > 1:
        raise UserError("--in_process runs every stage in this one process: it cannot take --nproc_per_node")
    # Relative folders are the caller's (resolved against the working directory), never the repository's.
    ctx = Context(spec, *(Path(getattr(args, name) or getattr(spec, f"default_{name}")(script_dir)).absolute()
                          for name in ("data_dir", "pretrained_dir", "save_dir", "feature_dir")))
    options = Options(args.device, args.num_workers, args.epochs, args.fusion_epochs, args.learning_rate,
                      args.per_batch_schedule, tuple(args.seeds) if args.seeds else None, args.fusion_args,
                      args.force, args.in_process, args.nproc_per_node, args.dist_timeout)
    for flag, folder in (("--save_dir", ctx.save_dir), ("--feature_dir", ctx.feature_dir)):
        check_path(folder, flag, written=True)
    with pipeline_lock(ctx, f"{spec.name} pipeline: {shlex.join(['python', *sys.argv])}"):
        return run(ctx, script_dir, mains, options)  # a PipelineError ends `utils.run` with the failed stage's status


@contextlib.contextmanager
def pipeline_lock(ctx: Context, holder: str):
    """One pipeline at a time on a save or feature folder, for the whole run (docs/METHOD.md §6): a second one
    stops at once, naming the first (``holder``: its command). Each stage keeps its own lock too, so a stage
    run by hand on the folders stops at that stage's lock as before."""
    started = f"{holder} (since {time.strftime('%Y-%m-%d %H:%M:%S')})"
    with contextlib.ExitStack() as stack:
        for folder in dict.fromkeys((ctx.save_dir, ctx.feature_dir)):
            stack.enter_context(output_lock(folder, "pipeline", started, what=f"{ctx.spec.name} pipeline outputs"))
        yield


def run_dataset(argv: Sequence[str]) -> None:
    """``python -m magtkd.pipeline IEMOCAP [flags]``: the dataset's own ``<DS>/pipeline.py`` (what ``run.sh``
    runs), in place of this process."""
    if not argv or argv[0] not in DATASETS:
        raise UserError(f"usage: python -m magtkd.pipeline {{{','.join(DATASETS)}}} [flags]; the flags are "
                        "bash <DS>/run.sh --help's")
    script = REPO / argv[0] / "pipeline.py"
    os.execv(sys.executable, [sys.executable, str(script), *argv[1:]])


if __name__ == "__main__":
    run_main(run_dataset)
