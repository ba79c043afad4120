"""What every stage script shares: user errors and the entry point, flag types and the shared
parsers, device, seeds, logging and the torchrun helpers (docs/METHOD.md §0).

Everything here is dataset-agnostic; a stage script passes its dataset's
description (``<DS>/config.py``) and defaults explicitly.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np
import torch
from tqdm import tqdm

log = logging.getLogger("magtkd")


class DatasetSpec(Protocol):
    """What the shared parsers read of a dataset description (`magtkd.dataset.DatasetSpec`)."""

    num_classes: int
    n_speaker: int
    global_speaker_ids: bool

    def default_data_dir(self, script_dir: Path) -> Path: ...
    def default_pretrained_dir(self, script_dir: Path) -> Path: ...
    def default_save_dir(self, script_dir: Path) -> Path: ...
    def default_feature_dir(self, script_dir: Path) -> Path: ...


# --------------------------------------------------------------------------- user errors and the entry point

class UserError(Exception):
    """A mistake the user can fix (a flag, a file, a CSV row, a checkpoint that does not fit).

    `run` prints its message as one line and exits with status 2 (no traceback
    unless ``--debug``); the message names the flag/file/row/key and what to do.
    The library's own error types (DataError, FeatureFileError, CheckpointError,
    ...) derive from it.
    """

    status = 2  # the exit status `run` ends with (the pipeline passes on a stage's own)


class InputMissing(UserError, FileNotFoundError):
    """An input file or folder that does not exist; the message says which stage writes it."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with the one line `run` prints for it (the pipeline names the stage that was running)."""


# Set by the pipeline for its stage processes: on Ctrl-C the pipeline prints the one line, not each stage.
QUIET_INTERRUPT = "MAGTKD_QUIET_INTERRUPT"


def run(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> None:
    """The stage scripts' entry point: ``if __name__ == "__main__": utils.run(main)``.

    A `UserError` becomes one line on stderr and exit status 2 (its ``status``); with ``--debug``
    on the command line it keeps its traceback. Ctrl-C becomes one line naming the script and exit
    status 130 (docs/METHOD.md §6). Anything else is unexpected and keeps its traceback.
    ``main(argv)`` called directly (tests) raises as usual.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        main(argv)
    except UserError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.status)
    except KeyboardInterrupt as err:
        if debug:
            raise
        if not os.environ.get(QUIET_INTERRUPT):
            print(f"interrupted: {err if isinstance(err, Interrupted) else interrupted_line(main)}",
                  file=sys.stderr)
        sys.exit(130)


def interrupted_line(main: Callable[..., Any]) -> str:
    """What Ctrl-C in a stage script means for its outputs (every stage publishes its set at its end)."""
    script = Path(main.__code__.co_filename)
    name = f"{script.parent.name}/{script.name}"
    return (f"{name} stopped before publishing its outputs; the previous complete ones (if any) are kept. "
            f"Run it again to restart cleanly (training stages: add --resume True to continue from the last "
            f"completed epoch)")


def add_debug_flag(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of errors in the input (flags, files, data)")
    return parser


def _checked_number(kind: type, low: float, inclusive: bool, what: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (value >= low if inclusive else value > low) or value != value:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


# Flag types that refuse values which would silently do nothing (``--epochs 0``) or fail deep
# inside torch (``--batch_size 0``, ``--learning_rate -1``): the error names the flag.
positive_int = _checked_number(int, 1, True, "an integer >= 1")
nonnegative_int = _checked_number(int, 0, True, "an integer >= 0")
positive_float = _checked_number(float, 0.0, False, "a number > 0")
nonnegative_float = _checked_number(float, 0.0, True, "a number >= 0")


def probability(text: str) -> float:
    """A dropout rate in [0, 1): 1 drops everything and scales by 1/(1-p) = inf (a NaN loss)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


SEED_MAX = 2**32 - 1  # numpy.random.seed accepts 0 .. 2**32 - 1 (set_seed seeds numpy with it)


def seed_int(text: str) -> int:
    """A seed numpy accepts (0 .. 2**32 - 1): `set_seed` would fail on anything else after the data is read."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected an integer in 0..{SEED_MAX} (numpy's seed range), got {text!r}")
    return value


# --------------------------------------------------------------------------- flags, device, seed, logging

def str2bool(value: str | bool) -> bool:
    """Parse ``--train False`` properly (the reference's ``type=bool`` made any value True)."""
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in {"true", "1", "yes", "y", "t"}:
        return True
    if lowered in {"false", "0", "no", "n", "f"}:
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults, and keep the stage docstring's layout (it holds the exact command)."""


def paths_parser(spec: DatasetSpec, script_dir: str | Path, description: str | None) -> argparse.ArgumentParser:
    """Flags every stage has: folders (defaulting relative to the script's folder), device, workers."""
    script_dir = Path(script_dir)
    parser = argparse.ArgumentParser(
        description=description, formatter_class=HelpFormatter
    )
    parser.add_argument("--data_dir", type=Path, default=spec.default_data_dir(script_dir),
                        help="the dataset folder (release + prepared CSVs)")
    parser.add_argument("--pretrained_dir", type=Path, default=spec.default_pretrained_dir(script_dir),
                        help="folder holding the four pretrained model folders")
    parser.add_argument("--save_dir", type=Path, default=spec.default_save_dir(script_dir),
                        help="checkpoints (.bin) and their metrics JSON")
    parser.add_argument("--feature_dir", type=Path, default=spec.default_feature_dir(script_dir),
                        help="stored frames and first-stage feature pickles")
    parser.add_argument("--device", default=None, help="cuda, cuda:1 or cpu; None = CUDA when available, else CPU")
    parser.add_argument("--num_workers", type=nonnegative_int, default=0, help="data-loading worker processes")
    return add_debug_flag(parser)


def training_parser(
    spec: DatasetSpec, script_dir: str | Path, description: str | None, *, epochs: int, batch_size: int,
    learning_rate: float, seed: int = 2024, kd: bool = False,
) -> argparse.ArgumentParser:
    """The flags of every first-stage training script (text, audio, video, KD), with the given defaults.

    The reference's names (``--epochs --batch_size --seed --learning_rate --train``)
    plus ours; the script passes its dataset's defaults (docs/METHOD.md §2).
    Precision as the authors (docs/METHOD.md §3): text/audio/video train in fp32
    (``--amp True``: bf16 autocast on CUDA); KD (``kd=True``) runs under fp16
    autocast with a gradient scaler (``--amp False``: fp32), its gradients
    unscaled before clipping unless ``--reference_kd_clip True``.
    """
    parser = paths_parser(spec, script_dir, description)
    parser.add_argument("--epochs", type=positive_int, default=epochs)
    parser.add_argument("--batch_size", type=positive_int, default=batch_size)
    parser.add_argument("--seed", type=seed_int, default=seed)
    parser.add_argument("--seeds", type=seed_int, nargs="+", default=None,
                        help="train one model per seed (<name>_seed<S>.bin; the best dev one also as <name>.bin) "
                             "and write <name>_seeds.json/.md; default: the single --seed")
    parser.add_argument("--train", type=str2bool, default=True,
                        help="True: train; False: evaluate the saved checkpoint on test")
    parser.add_argument("--learning_rate", type=positive_float, default=learning_rate)
    parser.add_argument("--per_batch_schedule", type=str2bool, default=False,
                        help="count warmup/total steps in batches instead of the reference's samples")
    if kd:
        parser.add_argument("--amp", type=str2bool, default=True,
                            help="fp16 autocast on CUDA with a gradient scaler, as the authors' KD (the scaler "
                                 "also runs on CPU, where the forward stays fp32)")
        parser.add_argument("--reference_kd_clip", type=str2bool, default=False,
                            help="clip the still-SCALED gradients at 10, as the authors did (the update then sees "
                                 "gradients of norm about 10/scale); default: unscale, then clip")
    else:
        parser.add_argument("--amp", type=str2bool, default=False,
                            help="bf16 autocast on CUDA; default fp32, as the authors (CPU always runs fp32)")
    add_determinism_flag(parser)
    add_loop_flags(parser, checkpointing=True)
    return parser


def fusion_parser(spec: DatasetSpec, script_dir: str | Path, description: str | None, *, audio_feature: str,
                  video_feature: str, alpha: float, beta: float, feature_loss: bool) -> argparse.ArgumentParser:
    """The flags of ``multimodal_fusion.py``: the reference's names (``--lr --l2 --dropout --hidden_dim
    --n_head --batch_size --epochs --seed --train``) with the dataset's distillation defaults, plus ours."""
    script_dir = Path(script_dir)
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    p.add_argument("--lr", type=positive_float, default=1e-4, help="AdamW learning rate (peak of the schedule)")
    p.add_argument("--l2", type=nonnegative_float, default=1e-6, help="AdamW weight decay")
    p.add_argument("--batch_size", type=positive_int, default=16, help="dialogues per batch")
    p.add_argument("--seed", type=seed_int, default=2024, help="seeds the model and the per-epoch shuffle")
    p.add_argument("--seeds", type=seed_int, nargs="+", default=None,
                   help="train one model per seed (multimodal_fusion_best_seed<S>.bin; the best dev one also as "
                        "multimodal_fusion_best.bin) and write multimodal_fusion_seeds.json/.md; default: --seed")
    p.add_argument("--epochs", type=positive_int, default=30, help="training epochs")
    p.add_argument("--dropout", type=probability, default=0.5, help="dropout everywhere in the model")
    p.add_argument("--hidden_dim", type=positive_int, default=None, help="default: the features' width")
    p.add_argument("--n_head", type=positive_int, default=8, help="attention heads (not stored in checkpoints)")
    p.add_argument("--clsNum", type=int, default=spec.num_classes, help="number of classes")
    p.add_argument("--train", type=str2bool, default=True,
                   help="True: train; False: evaluate the saved checkpoint on test")
    p.add_argument("--feature_dir", type=Path, default=spec.default_feature_dir(script_dir),
                   help="folder of first_stage_{train,dev,test}_features.pkl")
    p.add_argument("--save_dir", type=Path, default=spec.default_save_dir(script_dir),
                   help="folder of multimodal_fusion_best.{bin,json}")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu; None = CUDA when available, else CPU")
    p.add_argument("--audio_feature", choices=("audio", "audio_kd"), default=audio_feature,
                   help="feature key feeding the audio stream A")
    p.add_argument("--video_feature", choices=("video", "video_kd"), default=video_feature,
                   help="feature key feeding the video stream V")
    p.add_argument("--alpha", type=float, default=alpha, help="weight of KD(A')")
    p.add_argument("--beta", type=float, default=beta, help="weight of KD(V')")
    p.add_argument("--feature_loss", type=str2bool, default=feature_loss, help="add L_feat(X', T') to KD(X')")
    p.add_argument("--separate_text_blocks", type=str2bool, nargs="?", const=True, default=False,
                   help="text-anchor paths use their own a_t/v_t blocks and gates (the reference shares t_t)")
    p.add_argument("--packed", type=str2bool, nargs="?", const=True, default=None,
                   help="per-utterance layers on the real utterances only (True) or on the padded (dialogues x "
                        "longest) grid as the authors' code (False); the same results. Default: packed for batches "
                        "large enough to gain (docs/METHOD.md §5, Speed)")
    p.add_argument("--per_batch_schedule", type=str2bool, nargs="?", const=True, default=False,
                   help="count warmup/total steps in batches instead of the reference's dialogues")
    p.add_argument("--n_speaker", type=int, default=None,
                   help=f"speaker embedding rows without padding (default: {spec.n_speaker}"
                        + (" or the largest id + 1 in the data, whichever is larger" if spec.global_speaker_ids
                           else "") + "; with --train False: from the checkpoint)")
    add_variant_flags(p)
    add_determinism_flag(p)
    add_loop_flags(p, checkpointing=False)  # --grad_accum, --resume
    return add_debug_flag(p)


FUSION_VARIANT = {"modalities": ["T", "A", "V"], "gates": True, "speaker_embedding": True, "fusion": "anchor"}


def _modality(value: str) -> str:
    return str(value).upper()


def add_variant_flags(p: argparse.ArgumentParser) -> None:
    """The fusion's ablation variant (docs/METHOD.md §5, "Ablation variants"). ``None`` (not given): the
    paper's model when training; as the checkpoint was trained for ``--train False`` and prediction."""
    p.add_argument("--modalities", type=_modality, nargs="+", choices=("T", "A", "V"), default=None,
                   help="streams the fusion reads, any non-empty subset of T A V (default T A V; "
                        "--train False: as trained)")
    p.add_argument("--gates", type=str2bool, default=None, help="False: every gate is the identity (default True)")
    p.add_argument("--speaker_embedding", type=str2bool, default=None,
                   help="False: no speaker embedding (default True)")
    p.add_argument("--fusion", choices=("anchor", "concat"), default=None,
                   help="anchor: the anchor gated transformer; concat: the baseline without anchors (default anchor)")


def fusion_variant(args: argparse.Namespace, trained: Mapping[str, Any] | None = None,
                   source: str = "") -> dict[str, Any]:
    """The variant (``AnchorGatedTransformer(**variant)``) the flags ask for, in canonical form (modalities in
    T, A, V order; ``gates`` False for the concat baseline, which has none).

    Flags left unset take ``trained`` (the variant a checkpoint was trained as, read from ``source``) or the
    paper's model; a flag that contradicts ``trained`` is a UserError naming both.
    """
    base = dict(trained) if trained is not None else dict(FUSION_VARIANT)
    given = {key: getattr(args, key) for key in FUSION_VARIANT if getattr(args, key) is not None}
    if "modalities" in given:
        modalities = given["modalities"]
        if len(set(modalities)) != len(modalities):
            raise UserError(f"--modalities {' '.join(modalities)}: a modality is listed twice")
        given["modalities"] = [m for m in "TAV" if m in modalities]
    variant = {**base, **given}
    if trained is None and variant["fusion"] == "concat" and args.separate_text_blocks:
        raise UserError("--separate_text_blocks applies to the anchor fusion only, not to --fusion concat")
    if variant["fusion"] == "concat":
        variant["gates"] = False
        if "gates" in given and given["gates"] and trained is None:
            log.info("--fusion concat has no gates: --gates True does not apply")
    if trained is not None:
        differ = [f"--{key} {_flag_text(given[key])} but {source} was trained with --{key} "
                  f"{_flag_text(trained[key])}" for key in given
                  if given[key] != trained[key] and not (key == "gates" and trained["fusion"] == "concat")]
        if differ:
            raise UserError("; ".join(differ) + " (leave the flag out to use the trained variant)")
    return variant


def _flag_text(value: Any) -> str:
    return " ".join(value) if isinstance(value, list) else str(value)


def predict_parser(spec: DatasetSpec, script_dir: str | Path, description: str | None,
                   unknown_speakers: str) -> argparse.ArgumentParser:
    """The flags of ``predict.py``: the stage folders, the conversation and the output, batch size,
    autocast and the fusion settings that its metrics document records (``None``: as trained)."""
    parser = paths_parser(spec, script_dir, description)
    parser.add_argument("--conversation", type=Path, required=True, help="the conversation CSV")
    parser.add_argument("--out", type=Path, required=True, help="the predictions CSV to write")
    parser.add_argument("--batch_size", type=positive_int, default=16,
                        help="utterances per first-stage forward pass and dialogues per fusion batch")
    parser.add_argument("--amp", type=str2bool, default=False,
                        help="bf16 autocast on CUDA (first stage); default fp32, as the extraction stage")
    add_variant_flags(parser)
    add_prompt_flag(parser)
    parser.add_argument("--channel_order", choices=("rgb", "bgr"), default="rgb",
                        help="frame channel order; use the one video_feature_extract.py used for training")
    parser.add_argument("--audio_feature", choices=("audio", "audio_kd"), default=None,
                        help="feature key feeding the audio stream A (default: as trained)")
    parser.add_argument("--video_feature", choices=("video", "video_kd"), default=None,
                        help="feature key feeding the video stream V (default: as trained)")
    parser.add_argument("--n_head", type=positive_int, default=None, help="attention heads (default: as trained, else 8)")
    parser.add_argument("--unknown_speakers", choices=("padding", "error"), default="padding",
                        help=f"{unknown_speakers}: the model's padding row (warning) or an error")
    return add_audio_cache_flags(parser)


PROMPT_VARIANTS = ("full", "no_template", "no_speakers", "no_context")  # magtkd.dataset.PROMPTS (one list)


def add_prompt_flag(parser: argparse.ArgumentParser, training: bool = False) -> argparse.ArgumentParser:
    """``--prompt``: the text prompt variant (docs/METHOD.md §2, Prompt variants). Training the text model:
    default full; everywhere else (and text.py --train False) default: what text.json recorded."""
    parser.add_argument("--prompt", choices=PROMPT_VARIANTS, default=None,
                        help="text prompt variant; default " + ("full (--train False: as trained)" if training
                                                                else "as the text model was trained (text.json)"))
    return parser


def add_loop_flags(parser: argparse.ArgumentParser, checkpointing: bool) -> argparse.ArgumentParser:
    """Memory and restart flags of every training loop (`fit`, `fit_fusion`)."""
    parser.add_argument("--grad_accum", type=positive_int, default=1,
                        help="accumulate gradients over N batches per update (an N times larger batch)")
    if checkpointing:
        parser.add_argument("--grad_checkpointing", type=str2bool, default=False,
                            help="recompute the Hugging Face backbone's activations in backward (less memory)")
    parser.add_argument("--resume", type=str2bool, default=False,
                        help="continue from the training state saved after the last completed epoch")
    parser.add_argument("--schedule_epochs", type=str2bool, default=False,
                        help="anchor warmup and decay to the authors' curve in EPOCHS (as at their global batch) "
                             "whatever the global batch (per-process batch x processes x --grad_accum); default: "
                             "their count in steps, whose length in epochs grows with the global batch "
                             "(docs/METHOD.md §2)")
    parser.add_argument("--tf32", type=str2bool, default=False,
                        help="TF32 matrix products in the fp32 computations on CUDA (faster on Ampere and newer, "
                             "about 3 significant digits); default off, as the authors (docs/METHOD.md §3)")
    parser.add_argument("--tensorboard", type=Path, default=None,
                        help="write TensorBoard event files to this folder: per update the train loss, learning "
                             "rate, gradient norm and scale; per epoch the dev/test metrics (rank 0 only)")
    return parser


def add_determinism_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--deterministic", type=str2bool, default=True,
                        help="cudnn.deterministic=True, benchmark=False, as the authors; False trades "
                             "run-to-run reproducibility for speed")


def add_audio_cache_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--audio_cache``/``--audio_cache_dir`` of the stages that decode audio (`audio_cache_dir`)."""
    parser.add_argument("--audio_cache", type=str2bool, default=True,
                        help="store each clip's decoded 16 kHz samples the first time (keyed by the source "
                             "file's path, size and mtime; identical samples) and read them in later epochs "
                             "and stages; False: decode every time")
    parser.add_argument("--audio_cache_dir", type=Path, default=None,
                        help="the audio cache folder; None: <feature_dir>/audio_cache")
    return parser


def audio_cache_dir(args: argparse.Namespace) -> Path | None:
    """The audio cache folder the flags name (`add_audio_cache_flags`); None when caching is off."""
    if not args.audio_cache:
        return None
    return Path(args.audio_cache_dir) if args.audio_cache_dir is not None else Path(args.feature_dir) / "audio_cache"


def resolve_device(name: str | None) -> torch.device:
    """The device of this process; under ``torchrun`` also joins the process group (`init_distributed`)."""
    if name is None or name == "":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except (RuntimeError, ValueError):
            raise UserError(f"--device {name}: not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} requested but CUDA is not available{cuda_unavailable_hint()}")
    if name is None and device.type == "cpu" and gpu_present():
        log.warning("a GPU seems present but CUDA is not available, so this run uses the CPU%s",
                    cuda_unavailable_hint())
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                        f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda devices are supported")
    return init_distributed(device)


def gpu_present() -> bool:
    """An NVIDIA driver is installed (its device nodes or ``nvidia-smi`` exist); says nothing of CUDA."""
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidia0").exists() \
        or shutil.which("nvidia-smi") is not None


def cuda_unavailable_hint() -> str:
    """Why CUDA is likely unavailable, for the error or warning: with a GPU present, most often a torch
    wheel built for a newer CUDA than the driver supports (README, Installation)."""
    if not gpu_present():
        return " on this machine (no NVIDIA driver found); use --device cpu"
    built = torch.version.cuda or "none (a CPU-only build)"
    return (f": a GPU seems present, but this torch {torch.__version__} was built for CUDA {built}; the driver's "
            "CUDA version is in the header of `nvidia-smi` and must be at least that. Install a torch wheel for "
            "your driver (https://pytorch.org/get-started/locally/, e.g. pip install torch --index-url "
            "https://download.pytorch.org/whl/cu126) or update the driver; or use --device cpu")


def set_precision(device: torch.device, tf32: bool) -> None:
    """``--tf32``: fp32 matrix products on CUDA in TF32 (True) or in full fp32 (False, the default, as the
    authors' fp32 runs: PyTorch's default); cuDNN convolutions keep PyTorch's default (docs/METHOD.md §3,
    precision table). Nothing is set on CPU."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32


# --------------------------------------------------------------------------- several processes (torchrun)

def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes artifacts, logs and progress bars."""
    return rank() == 0


def init_distributed(device: torch.device) -> torch.device:
    """Join the process group ``torchrun`` describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT).

    One process per device: CUDA processes take ``cuda:LOCAL_RANK`` and NCCL, CPU
    processes gloo. Without ``torchrun`` (WORLD_SIZE unset or 1) the device is
    returned unchanged. Ranks other than 0 log warnings only.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device.type == "cuda":
        local_rank, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local_rank >= count:
            raise UserError(f"torchrun started more processes per node ({os.environ.get('LOCAL_WORLD_SIZE', '?')}) "
                            f"than this machine has GPUs ({count}): use --nproc_per_node {count} or fewer")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if not is_main():
        logging.getLogger().setLevel(logging.WARNING)
    return device


def progress(iterable, **kwargs) -> tqdm:
    """A tqdm bar on rank 0 only (and only on a terminal, tqdm's ``disable=None``)."""
    options = {"leave": False, "dynamic_ncols": True, **kwargs}
    return tqdm(iterable, disable=None if is_main() else True, **options)


def barrier() -> None:
    """Wait until every rank arrives here (nothing on one process)."""
    if world_size() > 1:
        torch.distributed.barrier()


def shard(items: Sequence[Any]) -> list[Any]:
    """This rank's share of ``items`` (every ``world_size``-th item from ``rank``); all of them on one process."""
    return list(items)[rank()::world_size()]


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` on one process)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


class EvalShardSampler(torch.utils.data.Sampler):
    """Every ``world_size``-th index from ``rank``, in order: each item on exactly one rank, no padding
    (a DistributedSampler would repeat items to even out the shards and count them twice)."""

    def __init__(self, n: int) -> None:
        self.indices = list(range(n))[rank()::world_size()]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def train_sampler(dataset, seed: int) -> torch.utils.data.DistributedSampler | None:
    """The training split's sampler under torchrun: a DistributedSampler shuffled by ``seed`` + epoch
    (`fit` calls ``set_epoch`` every epoch); ``None`` on one process (the loader shuffles itself)."""
    if world_size() == 1:
        return None
    return torch.utils.data.DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=False)


def set_seed(seed: int, deterministic: bool = True, fixed_shapes: bool = False) -> None:
    """Seed Python, numpy and torch, as the authors' scripts do (docs/METHOD.md §7).

    ``PYTHONHASHSEED`` is exported for child processes (data-loading workers,
    subprocesses); the running interpreter's hash seed was fixed at its start.
    ``deterministic`` sets ``cudnn.deterministic = True`` and ``cudnn.benchmark = False``
    (the authors' setting); False lets cuDNN pick non-deterministic kernels, and tune them
    (``benchmark``) only for a stage whose input shapes never change (``fixed_shapes``: the video
    encoder's 8 frames): text, audio and dialogue lengths vary batch to batch, and benchmark mode
    would re-tune for every new length.
    """
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic and fixed_shapes


def setup_logging() -> None:
    """One console format for all stages; safe to call more than once."""
    root = logging.getLogger()
    if not any(getattr(h, "_magtkd", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        handler._magtkd = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    # One tqdm bar per epoch is ours; transformers' per-load "Loading weights" bars are noise.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def log_start(stage: str, args: argparse.Namespace, device: torch.device,
              sizes: Mapping[str, int] | None = None) -> None:
    """Log resolved arguments, device and dataset sizes at the start of a stage."""
    log.info("%s: arguments %s", stage, {k: str(v) for k, v in sorted(vars(args).items())})
    log.info("%s: device %s world_size=%d", stage, device, world_size())
    if sizes:
        log.info("%s: sizes %s", stage, dict(sizes))


def seed_list(args: argparse.Namespace) -> list[int]:
    """The seeds to train: ``--seeds``, or the single ``--seed``."""
    seeds = list(args.seeds) if getattr(args, "seeds", None) else [args.seed]
    duplicates = sorted({s for s in seeds if seeds.count(s) > 1})
    if duplicates:
        raise UserError(f"--seeds lists {duplicates} more than once")
    if len(seeds) > 1 and not getattr(args, "train", True):
        raise UserError("--seeds with several seeds trains one model per seed; --train False evaluates the "
                         "single saved checkpoint (give no --seeds)")
    return seeds


def seed_tag(seed: int, seeds: Sequence[int]) -> str:
    """``_seed<S>`` for the files of one seed among several; '' for a single seed (the usual names)."""
    return f"_seed{seed}" if len(seeds) > 1 else ""


def seed_args(args: argparse.Namespace, seed: int) -> argparse.Namespace:
    """``args`` with ``--seed`` set to this run's seed (it is recorded in the metrics JSON)."""
    return argparse.Namespace(**{**vars(args), "seed": seed})

