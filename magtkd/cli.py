"""The command lines: one set of parsers built on each other, so a flag is declared once and means the
same in every script that has it (docs/METHOD.md §0).

``base_parser`` (``--device --debug``) -> ``paths_parser`` (+ the four folders, ``--num_workers``) ->
``training_parser`` (text, audio, video, KD) and ``predict_parser``; ``fusion_parser``, ``ablation_parser``
and ``export_parser`` take the folders they use; ``hub_parser`` is ``python -m magtkd.hub``'s. Each script
passes its dataset's description and defaults; the help shows every default once. Standard library only
(besides the dataset description), so ``--help`` starts at once.
"""

from __future__ import annotations

import argparse
import os
import textwrap
from pathlib import Path
from typing import Any, Sequence

from .flag_parser import HelpFormatter, Parser
from .spec import DATASETS, PROMPTS, DatasetSpec
from .utils import (UserError, nonnegative_float, nonnegative_int, positive_float, positive_int, probability,
                    seed_int, str2bool)


def base_parser(description: str | None, allow_abbrev: bool = True, device: bool = True) -> Parser:
    """``--device`` and ``--debug``: what every script has (preparation: ``--debug`` only)."""
    parser = Parser(description=description, formatter_class=HelpFormatter, allow_abbrev=allow_abbrev)
    if device:
        parser.add_argument("--device", default=None,
                            help="cuda, cuda:1 or cpu; default: CUDA when available, else CPU (an NVIDIA driver that "
                                 "this torch cannot use is an error: README, Installation)")
        parser.add_argument("--dist_timeout", type=positive_float, default=30.0,
                            help="under torchrun: minutes a rank waits in a collective for the others before the run "
                                 "stops (torch's own default is 10 on NCCL)")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of errors in the input (flags, files, data)")
    return parser


def preparation_parser(spec: DatasetSpec, script_dir: str | Path, description: str | None,
                       data_help: str) -> Parser:
    """The flags of ``preprocessing.py``: the release folder (the CSVs are written into it)."""
    parser = add_folders(base_parser(description, device=False), spec, script_dir, ("data_dir",),
                         {"data_dir": data_help})
    return parser.writes("data_dir")


# The four folders: help text, and the DatasetSpec method that gives the default (relative to the script).
FOLDERS = {
    "data_dir": ("the dataset folder (release + prepared CSVs)", "default_data_dir"),
    "pretrained_dir": ("folder holding the four pretrained model folders", "default_pretrained_dir"),
    "save_dir": ("checkpoints (.bin) and their metrics JSON", "default_save_dir"),
    "feature_dir": ("stored frames, the audio cache and the first-stage feature pickles", "default_feature_dir"),
}


def add_folders(parser: Parser, spec: DatasetSpec, script_dir: str | Path,
                names: Sequence[str] = tuple(FOLDERS), helps: dict[str, str] | None = None) -> Parser:
    """The folder flags ``names``, each defaulting to the dataset's folder relative to ``script_dir``."""
    for name in names:
        help_text, default = FOLDERS[name]
        parser.add_argument(f"--{name}", type=Path, default=getattr(spec, default)(Path(script_dir)),
                            help=(helps or {}).get(name, help_text))
    return parser


def paths_parser(spec: DatasetSpec, script_dir: str | Path, description: str | None,
                 writes: Sequence[str] = ()) -> Parser:
    """Flags every stage has: folders (defaulting relative to the script's folder), device, workers;
    ``writes``: the folders the script always writes into (checked before any work, `Parser`)."""
    parser = add_folders(base_parser(description), spec, script_dir)
    parser.add_argument("--num_workers", type=nonnegative_int, default=None,
                        help="data-loading worker processes (persistent, prefetching); default: 4 per process on "
                             "CUDA (fewer with few CPUs), 0 on CPU")
    return parser.writes(*writes)


def add_seed_flags(parser: argparse.ArgumentParser, seed: int, files: str) -> None:
    """``--seed`` and ``--seeds`` (one model per seed; ``files``: the per-seed names, for the help)."""
    parser.add_argument("--seed", type=seed_int, default=seed,
                        help="seeds the model, the data order and every random draw")
    parser.add_argument("--seeds", type=seed_int, nargs="+", default=None,
                        help=f"train one model per seed ({files}; the best dev one also under the usual names) and "
                             "write the seeds summary (.json/.md, mean ± std); default: the single --seed")
    parser.add_argument("--train", type=str2bool, default=True,
                        help="True: train; False: evaluate the saved checkpoint on test")


def add_amp_flag(parser: argparse.ArgumentParser, fp16_scaler: bool = False) -> None:
    """``--amp``: bf16 autocast on CUDA (default off, the authors' fp32); for KD (``fp16_scaler``) fp16
    autocast with a gradient scaler, default on, as the authors' KD (docs/METHOD.md §3)."""
    if fp16_scaler:
        parser.add_argument("--amp", type=str2bool, default=True,
                            help="fp16 autocast on CUDA with a gradient scaler, as the authors' KD (the scaler "
                                 "also runs on CPU, where the forward stays fp32); False: fp32")
    else:
        parser.add_argument("--amp", type=str2bool, default=False,
                            help="bf16 autocast on CUDA; default False: fp32, as the authors (CPU always runs fp32)")


def training_parser(spec: DatasetSpec, script_dir: str | Path, description: str | None, *, epochs: int,
                    batch_size: int, learning_rate: float, kd: bool = False) -> Parser:
    """The flags of every first-stage training script (text, audio, video, KD), with the given defaults:
    the reference's names (``--epochs --batch_size --seed --learning_rate --train``) plus ours
    (docs/METHOD.md §2, §3)."""
    parser = paths_parser(spec, script_dir, description)
    parser.add_argument("--epochs", type=positive_int, default=epochs, help="training epochs")
    parser.add_argument("--batch_size", type=positive_int, default=batch_size,
                        help="utterances per batch and process (the global batch is processes x this x --grad_accum)")
    parser.add_argument("--eval_batch_size", type=positive_int, default=16,
                        help="utterances per dev/test batch and process (inference only: keeps no activations)")
    add_seed_flags(parser, 2024, "<name>_seed<S>.bin")
    parser.add_argument("--learning_rate", type=positive_float, default=learning_rate,
                        help="AdamW learning rate (the peak of the schedule)")
    add_amp_flag(parser, fp16_scaler=kd)
    if kd:
        parser.add_argument("--reference_kd_clip", type=str2bool, default=False,
                            help="clip the still-SCALED gradients at 10, as the authors did (the update then sees "
                                 "gradients of norm about 10/scale); default False: unscale, then clip")
        parser.add_argument("--teacher_cache", type=str2bool, default=True,
                            help="compute the frozen teacher's outputs for every training utterance once, at this "
                                 "run's precision and prompt, cached as <save_dir>/<teacher>_teacher_outputs.pt "
                                 "(keyed by the teacher checkpoint, prompt, precision and data), and read them in "
                                 "the steps; False: the teacher runs in every step (docs/METHOD.md §3)")
    add_loop_flags(parser, checkpointing=True)
    return parser.writes("save_dir", when="train")


def fusion_parser(spec: DatasetSpec, script_dir: str | Path, description: str | None, *, audio_feature: str,
                  video_feature: str, alpha: float, beta: float, feature_loss: bool) -> Parser:
    """The flags of ``multimodal_fusion.py``: the reference's names (``--lr --l2 --dropout --hidden_dim
    --n_head --batch_size --epochs --seed --train``) with the dataset's distillation defaults, plus ours.
    The model's settings default to None: training takes the paper's model and the dataset's feature keys,
    ``--train False`` what the checkpoint and its metrics document say (`magtkd.fusion_settings`)."""
    p = add_folders(base_parser(description), spec, script_dir, ("feature_dir", "save_dir", "data_dir"),
                    {"feature_dir": "folder of first_stage_{train,dev,test}_features.pkl",
                     "save_dir": "folder of multimodal_fusion_best.{bin,json} and multimodal_fusion_metrics.json",
                     "data_dir": "the dataset folder whose CSVs give the predictions CSVs speaker names and texts "
                                 "(optional: without them the pickles' speaker ids)"})
    p.add_argument("--lr", type=positive_float, default=1e-4, help="AdamW learning rate (peak of the schedule)")
    p.add_argument("--l2", type=nonnegative_float, default=1e-6, help="AdamW weight decay")
    p.add_argument("--batch_size", type=positive_int, default=16, help="dialogues per batch")
    add_seed_flags(p, 2024, "multimodal_fusion_best_seed<S>.bin")
    p.add_argument("--epochs", type=positive_int, default=30, help="training epochs")
    p.add_argument("--dropout", type=probability, default=0.5, help="dropout everywhere in the model")
    p.add_argument("--hidden_dim", type=positive_int, default=None,
                   help="the model's width; default: the features' width (it must equal it)")
    p.add_argument("--n_head", type=positive_int, default=None,
                   help="attention heads; default 8 (--train False: as trained)")
    p.add_argument("--clsNum", type=int, default=spec.num_classes, help="number of classes")
    p.add_argument("--audio_feature", choices=("audio", "audio_kd"), default=None,
                   help=f"feature key feeding the audio stream A; default {audio_feature} (--train False: as trained)")
    p.add_argument("--video_feature", choices=("video", "video_kd"), default=None,
                   help=f"feature key feeding the video stream V; default {video_feature} (--train False: as trained)")
    p.add_argument("--alpha", type=float, default=alpha, help="weight of KD(A')")
    p.add_argument("--beta", type=float, default=beta, help="weight of KD(V')")
    p.add_argument("--feature_loss", type=str2bool, default=feature_loss, help="add L_feat(X', T') to KD(X')")
    p.add_argument("--separate_text_blocks", type=str2bool, nargs="?", const=True, default=None,
                   help="text-anchor paths use their own a_t/v_t blocks and gates (the reference shares t_t); "
                        "default False (--train False: as trained)")
    p.add_argument("--packed", type=str2bool, nargs="?", const=True, default=False,
                   help="True: per-utterance layers on the real utterances only (faster on large batches; the same "
                        "outputs, gradients up to the order of float sums); default False: the padded (dialogues x "
                        "longest) grid, the authors' computation bit for bit (docs/METHOD.md §5, Speed)")
    p.add_argument("--selection", choices=("dev", "test"), default="dev",
                   help="the epoch kept: best dev weighted F1, or test: the authors' rule (best test weighted F1 in "
                        "%% rounded to 2 decimals, first of ties; selected on test, not an estimate)")
    p.add_argument("--n_speaker", type=int, default=None,
                   help=f"speaker embedding rows without padding; default {spec.n_speaker}"
                        + (" or the largest id + 1 in the data, whichever is larger" if spec.global_speaker_ids
                           else "") + " (--train False: from the checkpoint)")
    add_variant_flags(p)
    add_model_dir_flag(p)
    add_attention_flags(p)
    add_loop_flags(p, checkpointing=False)
    return p.writes("save_dir")


def add_attention_flags(p: argparse.ArgumentParser) -> None:
    """Which release of the authors' attention and padding the fusion computes (docs/METHOD.md §5, §7); ``None``:
    the fixed attention and our padding row when training; as recorded for --train False and prediction."""
    p.add_argument("--paper_attention", type=str2bool, default=None,
                   help="True: the attention of the authors' May-2025 release, which produced the published figures "
                        "(real keys filled with -1e9, ReLU, softmax); default False, the fixed attention of their "
                        "Nov-2025 release (evaluating a checkpoint: as recorded beside it; without a record: this "
                        "flag)")
    p.add_argument("--padding_speaker", choices=("own", "authors"), default=None,
                   help="speaker row of padded positions: own (row n_speaker, default) or authors (row 2 as their "
                        "code: on MELD a real speaker, whose row then never trains); evaluating a checkpoint: as "
                        "recorded, without a record: authors")


def add_variant_flags(p: argparse.ArgumentParser) -> None:
    """The fusion's ablation variant (docs/METHOD.md §5, "Ablation variants"). ``None`` (not given): the
    paper's model when training; as the checkpoint was trained for ``--train False`` and prediction."""
    p.add_argument("--modalities", type=str.upper, nargs="+", choices=("T", "A", "V"), default=None,
                   help="streams the fusion reads, any non-empty subset of T A V; default T A V (--train False: "
                        "as trained)")
    p.add_argument("--gates", type=str2bool, default=None,
                   help="False: every gate is the identity; default True (--train False: as trained)")
    p.add_argument("--speaker_embedding", type=str2bool, default=None,
                   help="False: no speaker embedding; default True (--train False: as trained)")
    p.add_argument("--fusion", choices=("anchor", "concat"), default=None,
                   help="anchor: the anchor gated transformer; concat: the baseline without anchors; default "
                        "anchor (--train False: as trained)")


def predict_parser(spec: DatasetSpec, script_dir: str | Path, description: str | None,
                   unknown_speakers: str) -> Parser:
    """The flags of ``predict.py``: the stage folders, the conversation and the output, batch size,
    autocast and the fusion settings that its metrics document records (``None``: as trained)."""
    parser = paths_parser(spec, script_dir, description)
    parser.add_argument("--conversation", type=Path, required=True, help="the conversation CSV")
    parser.add_argument("--out", type=Path, required=True, help="the predictions CSV to write")
    parser.add_argument("--batch_size", type=positive_int, default=16,
                        help="utterances per first-stage forward pass and dialogues per fusion batch")
    add_amp_flag(parser)
    add_variant_flags(parser)
    add_prompt_flag(parser)
    parser.add_argument("--channel_order", choices=("rgb", "bgr"), default="rgb",
                        help="frame channel order; use the one video_feature_extract.py used for training")
    parser.add_argument("--audio_feature", choices=("audio", "audio_kd"), default=None,
                        help="feature key feeding the audio stream A; default: as trained")
    parser.add_argument("--video_feature", choices=("video", "video_kd"), default=None,
                        help="feature key feeding the video stream V; default: as trained")
    parser.add_argument("--n_head", type=positive_int, default=None,
                        help="attention heads; default: as trained, else 8")
    add_attention_flags(parser)
    parser.add_argument("--unknown_speakers", choices=("padding", "error"), default="padding",
                        help=f"{unknown_speakers}: the model's padding row (warning) or an error")
    add_model_dir_flag(parser)
    return add_audio_cache_flags(parser).writes("feature_dir", "out")


def add_model_dir_flag(parser: Parser) -> Parser:
    """``--model_dir``: read the trained models from a model folder (`magtkd.hub`) instead of ``--save_dir``."""
    parser.add_argument("--model_dir", type=Path, default=None,
                        help="a model folder written by `python -m magtkd.hub export` (safetensors, config.json, "
                             "model card; docs/METHOD.md §9): the trained models are read from it instead of "
                             "--save_dir; default: none")
    return parser


def report_parser(spec: DatasetSpec, script_dir: str | Path, description: str | None) -> Parser:
    """The flags of ``<DS>/report.py`` (``python -m magtkd.report <DS>``): the folders it reads, the page it
    writes, how much it shows, and where the fusion model runs for the t-SNE (`magtkd.report`)."""
    parser = add_folders(base_parser(description), spec, script_dir, ("data_dir", "save_dir", "feature_dir"), {
        "data_dir": "the dataset folder (its test CSV gives texts when the predictions CSVs have none)",
        "save_dir": "the checkpoints, metrics documents and predictions CSVs to report",
        "feature_dir": "folder of first_stage_test_features.pkl (the fused representations of the t-SNE)"})
    parser.add_argument("--out", type=Path, default=None, help="the HTML file to write; default: <save_dir>/report.html")
    parser.add_argument("--dialogues", type=nonnegative_int, default=3,
                        help="the worst test dialogues of the fusion shown as conversations")
    parser.add_argument("--examples", type=nonnegative_int, default=10,
                        help="utterances listed of those the fusion fixes and of those it breaks (vs text)")
    parser.add_argument("--batch_size", type=positive_int, default=16,
                        help="dialogues per batch of the fusion model (t-SNE features)")
    return parser.writes("out")


def add_prompt_flag(parser: Parser, training: bool = False) -> Parser:
    """``--prompt``: the text prompt variant (docs/METHOD.md §2, Prompt variants). Training the text model:
    default full; everywhere else (and text.py --train False) default: what text.json recorded."""
    parser.add_argument("--prompt", choices=PROMPTS, default=None,
                        help="text prompt variant; default " + ("full (--train False: as trained)" if training
                                                                else "as the text model was trained (text.json)"))
    return parser


def add_loop_flags(parser: Parser, checkpointing: bool) -> Parser:
    """The training loop's flags (`magtkd.engine.FitConfig.from_flags` reads them): schedule, memory,
    restarts, precision, determinism and monitoring."""
    parser.add_argument("--per_batch_schedule", type=str2bool, nargs="?", const=True, default=False,
                        help="count warmup/total steps in batches instead of the reference's items")
    parser.add_argument("--schedule_epochs", type=str2bool, default=True,
                        help="warmup and decay follow the authors' curve in EPOCHS (as at their global batch) "
                             "whatever the global batch (per-process batch x processes x --grad_accum); False: "
                             "their counts taken as steps of this run, whose length in epochs grows with the "
                             "global batch (docs/METHOD.md §2)")
    parser.add_argument("--grad_accum", type=positive_int, default=1,
                        help="accumulate gradients over N batches per update (an N times larger batch)")
    if checkpointing:
        parser.add_argument("--grad_checkpointing", type=str2bool, default=False,
                            help="recompute the Hugging Face backbone's activations in backward (less memory)")
    parser.add_argument("--resume", type=str2bool, default=False,
                        help="continue from the training state saved after the last completed epoch (none yet: "
                             "start at epoch 1), and save it after every epoch")
    parser.add_argument("--save_state", type=str2bool, default=None,
                        help="write the full training state (weights, optimizer, random states) after every epoch, "
                             "in the background, so that --resume True can continue the run; default: as --resume")
    parser.add_argument("--tf32", type=str2bool, default=False,
                        help="TF32 matrix products in the fp32 computations on CUDA (faster on Ampere and newer, "
                             "about 3 significant digits); default False, as the authors (docs/METHOD.md §3)")
    parser.add_argument("--deterministic", type=str2bool, default=True,
                        help="cudnn.deterministic=True, benchmark=False, as the authors; False trades "
                             "run-to-run reproducibility for speed")
    parser.add_argument("--tensorboard", type=Path, default=None,
                        help="write TensorBoard event files to this folder: per update the train loss, learning "
                             "rate, gradient norm and scale; per epoch the dev/test metrics (rank 0 only); "
                             "default: none")
    return parser.writes("tensorboard")


def add_audio_cache_flags(parser: Parser) -> Parser:
    """``--audio_cache``/``--audio_cache_dir`` of the stages that decode audio (`audio_cache_dir`)."""
    parser.add_argument("--audio_cache", type=str2bool, default=True,
                        help="store each clip's decoded 16 kHz samples the first time (keyed by the source "
                             "file's path, size and mtime; identical samples) and read them in later epochs "
                             "and stages; False: decode every time")
    parser.add_argument("--audio_cache_dir", type=Path, default=None,
                        help="the audio cache folder; default: <feature_dir>/audio_cache")
    return parser


def audio_cache_dir(enabled: bool, folder: Path | None, feature_dir: Path) -> Path | None:
    """The audio cache folder ``--audio_cache``/``--audio_cache_dir`` name; None when caching is off."""
    if not enabled:
        return None
    return Path(folder) if folder is not None else Path(feature_dir) / "audio_cache"


def seed_list(seed: int, seeds: Sequence[int] | None, train: bool = True) -> list[int]:
    """The seeds to train: ``--seeds``, or the single ``--seed``."""
    chosen = list(seeds) if seeds else [seed]
    duplicates = sorted({s for s in chosen if chosen.count(s) > 1})
    if duplicates:
        raise UserError(f"--seeds lists {duplicates} more than once")
    if len(chosen) > 1 and not train:
        raise UserError("--seeds with several seeds trains one model per seed; --train False evaluates the "
                        "single saved checkpoint (give no --seeds)")
    return chosen


def seed_tag(seed: int, seeds: Sequence[int]) -> str:
    """``_seed<S>`` for the files of one seed among several; '' for a single seed (the usual names)."""
    return f"_seed{seed}" if len(seeds) > 1 else ""


ABLATION_TABLES = ("modalities", "components", "kd", "prompt", "reproduction")


def ablation_parser(spec: DatasetSpec, script_dir: Path, description: str | None) -> Parser:
    """``<DS>/ablation.py``'s own flags; every other flag passes through to the stage runs."""
    p = add_folders(base_parser(description, allow_abbrev=False), spec, script_dir,
                    helps={"save_dir": "the pipeline's checkpoints; the tables go to <save_dir>/ablation/",
                           "feature_dir": "the first-stage feature pickles (and stored frames)"})
    p.add_argument("--table", choices=ABLATION_TABLES, required=True,
                   help="modalities: the fusion on each subset of T, A, V; components: without each component; "
                        "kd: the first-stage models; prompt: the text-prompt variants through the fusion; "
                        "reproduction: the attentions of the authors' two releases under their test selection and "
                        "ours, against the paper's figures")
    p.add_argument("--seeds", type=seed_int, nargs="+", required=True, help="one run per seed of every variant")
    p.add_argument("--train", type=str2bool, default=False,
                   help="kd table: True trains the first-stage models; False tests the saved ones")
    p.add_argument("--text_args", default="",
                   help='prompt table: flags for text.py, e.g. "--epochs 2 --learning_rate 1e-3" (the other flags '
                        "go to the fusion); default: none")
    return p.writes("save_dir")


EXPORT_FORMATS = ("sdt", "graphsmile")  # the peers' layouts `magtkd.peer_features` writes (docs/METHOD.md §9)


def export_parser(spec: DatasetSpec, script_dir: Path, description: str | None, *, audio_feature: str,
                  video_feature: str) -> Parser:
    """The flags of ``export_features.py``: the CSVs and the feature folder it reads, the layout and the file it
    writes, and the feature keys of the audio and video slots (default: the dataset's fusion keys)."""
    p = add_folders(base_parser(description, device=False), spec, script_dir, ("data_dir", "feature_dir"),
                    {"data_dir": "the prepared CSVs (speakers, texts, gold labels; MELD: sentiments)",
                     "feature_dir": "folder of first_stage_{train,dev,test}_features.pkl and their record"})
    p.add_argument("--format", choices=EXPORT_FORMATS, required=True,
                   help="sdt: the tuple SDT's dataloader.py unpacks (also M3Net's lineage); graphsmile: "
                        "GraphSmile's (MELD with sentiments)")
    p.add_argument("--out", type=Path, required=True,
                   help="the pickle to write; what went into which slot is recorded beside it as <name>.json")
    p.add_argument("--audio_feature", choices=("audio", "audio_kd"), default=audio_feature,
                   help="feature key whose vectors fill the audio slot (videoAudio)")
    p.add_argument("--video_feature", choices=("video", "video_kd"), default=video_feature,
                   help="feature key whose vectors fill the visual slot (videoVisual)")
    return p.writes("out")


def hub_parser(description: str | None) -> Parser:
    """``python -m magtkd.hub export <DS> --save_dir DIR --out DIR``: a trained pipeline as one model folder."""
    p = base_parser(description, device=False)
    p.prog = "python -m magtkd.hub"
    p.add_argument("command", choices=("export",), help="export: write the model folder")
    p.add_argument("dataset", choices=DATASETS, help="the dataset the models were trained on")
    p.add_argument("--save_dir", type=Path, required=True,
                   help="the save folder holding the five first-stage checkpoints, the fusion checkpoint and "
                        "their metrics documents")
    p.add_argument("--out", type=Path, required=True,
                   help="the model folder to write (new, empty, or a model folder written before: replaced)")
    return p.writes("out")


# The pipeline's environment variables (run.sh): flag -> variable.
PIPELINE_ENV = {"data_dir": "DATA_DIR", "pretrained_dir": "PRETRAINED_DIR", "save_dir": "SAVE_DIR",
                "feature_dir": "FEATURE_DIR", "device": "DEVICE", "num_workers": "NUM_WORKERS", "epochs": "EPOCHS",
                "fusion_epochs": "FUSION_EPOCHS", "learning_rate": "LEARNING_RATE", "seeds": "SEEDS",
                "fusion_args": "FUSION_ARGS", "nproc_per_node": "NPROC_PER_NODE"}


def pipeline_parser(description: str | None) -> Parser:
    """The flags of ``run.sh`` (`magtkd.pipeline`); each defaults to its environment variable
    (`PIPELINE_ENV`, listed in ``--help``) when that is set. Relative folders are the caller's (the working
    directory)."""
    env = {flag: os.environ.get(variable) or None for flag, variable in PIPELINE_ENV.items()}
    p = base_parser(description)
    p.epilog = PIPELINE_ENV_HELP
    p.set_defaults(device=env["device"], dist_timeout=None)  # None: each stage's default (30 minutes)
    _action(p, "device").help = "cuda, cuda:1 or cpu for every stage; default: $DEVICE, else CUDA when available"
    for name, (help_text, _) in FOLDERS.items():
        p.add_argument(f"--{name}", type=Path, default=env[name],
                       help=f"{help_text}; default: ${PIPELINE_ENV[name]}, else the dataset's")
    p.add_argument("--num_workers", type=nonnegative_int, default=_number(env["num_workers"], int),
                   help="data-loading worker processes of every stage; default: $NUM_WORKERS, else each stage's "
                        "own (4 per process on CUDA, 0 on CPU)")
    p.add_argument("--epochs", type=positive_int, default=_number(env["epochs"], int),
                   help="epochs of the first-stage and KD trainings; default: $EPOCHS, else each stage's own")
    p.add_argument("--fusion_epochs", type=positive_int, default=_number(env["fusion_epochs"], int),
                   help="epochs of the fusion; default: $FUSION_EPOCHS, else its own (30)")
    p.add_argument("--learning_rate", type=positive_float, default=_number(env["learning_rate"], float),
                   help="learning rate of the first-stage and KD trainings; default: $LEARNING_RATE, else each "
                        "stage's own")
    p.add_argument("--per_batch_schedule", action="store_true",
                   help="first-stage and KD schedules counted in batches (see text.py --help)")
    p.add_argument("--seeds", type=seed_int, nargs="+", default=[int(s) for s in (env["seeds"] or "").split()] or None,
                   help="train every first-stage, KD and fusion model once per seed (see text.py --help); "
                        'default: $SEEDS (e.g. "2024 2025"), else each stage\'s --seed')
    p.add_argument("--fusion_args", default=env["fusion_args"] or "",
                   help='extra flags for multimodal_fusion.py, e.g. "--lr 1e-3 --batch_size 2"; default: '
                        "$FUSION_ARGS, else none")
    p.add_argument("--force", action="store_true", help="re-run stages whose outputs are up to date")
    p.add_argument("--in_process", action="store_true", help="call each script's main() in this process")
    p.add_argument("--nproc_per_node", type=positive_int, default=int(env["nproc_per_node"] or 1),
                   help="processes (one per GPU) for the stages that run data-parallel: each is launched as "
                        "python -m torch.distributed.run --standalone --nproc_per_node N <script>; the fusion "
                        "and preparation run in one process; default: $NPROC_PER_NODE, else 1")
    return p


PIPELINE_ENV_HELP = "environment variables (each sets its flag's default; a flag given wins):\n" + textwrap.fill(
    ", ".join(f"{variable} (--{flag})" for flag, variable in PIPELINE_ENV.items()), 100, initial_indent="  ",
    subsequent_indent="  ")


def _action(parser: argparse.ArgumentParser, dest: str) -> argparse.Action:
    return next(a for a in parser._actions if a.dest == dest)


def _number(text: str | None, kind: type) -> Any:
    return kind(text) if text else None
