"""Run a dataset's whole pipeline: preparation, then the eight stages of docs/METHOD.md §0.

    python -m magtkd.pipeline IEMOCAP [--data_dir D] [--pretrained_dir P] [--epochs 1] [--force]

(``IEMOCAP/run.sh`` and ``MELD/run.sh`` call this.) Stages run in the seed
README's order and the run stops at the first failure, naming the stage. A stage
whose outputs all exist, are newer than its inputs and whose completion record
says the run finished is skipped (``--force`` re-runs everything); a stage whose
record says its run was interrupted is re-run. Relative folders are taken from
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
from typing import Callable, Sequence

from .dataset import SPLITS, DatasetSpec, feature_path, features_record, frames_record
from . import utils
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
        """Checkpoints with their metrics JSON (the completion record `utils.fit` writes last)."""
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
            record = utils.read_record(path)
            if record is None or record.get("complete") is not True:
                return path
    return None


def up_to_date(inputs: Sequence[Path], outputs: Sequence[Path]) -> bool:
    """All outputs exist, their completion records say complete, and none is older than any existing input."""
    if not outputs or not all(p.exists() for p in outputs) or incomplete(outputs) is not None:
        return False
    newest_input = max((p.stat().st_mtime for p in inputs if p.exists()), default=0.0)
    return min(p.stat().st_mtime for p in outputs) >= newest_input


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
        subprocess.run([sys.executable, str(path), *argv], check=True)


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
        if not args.force and up_to_date(stage.inputs(ctx), stage.outputs(ctx)):
            log.info("[%s] %s: outputs up to date, skipped", spec.name, stage.name)
            continue
        unfinished = incomplete(stage.outputs(ctx))
        if unfinished is not None:
            log.warning("[%s] %s: %s says its last run did not finish; re-running %s", spec.name, stage.name,
                        unfinished, stage.script)
        argv = stage_argv(stage, ctx, args)
        log.info("[%s] %s: %s %s", spec.name, stage.name, stage.script, " ".join(argv))
        started = time.time()
        try:
            run_script(script_dir / stage.script, argv, args.in_process)
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
    p.add_argument("--seeds", type=int, nargs="+", default=[int(s) for s in env("SEEDS", "").split()] or None,
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
