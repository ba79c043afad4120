"""The four pretrained Hugging Face folders and the first-stage encoders built from them
(docs/METHOD.md §2, §6).

Encoders read their widths from the backbones' configs, never hard-coded, so the
same code runs the real pretrained models and the tiny generated stand-ins.
Every loader checks its folder first, so a missing or incomplete download fails
with the exact ``hf download`` command that fixes it. transformers is imported
only when a folder is loaded.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .artifacts import recorded_args
from .encoders import AudioEncoder, TextEncoder, VideoEncoder
from .frames import FrameCodec
from .loaders import AudioField, TextField, VideoField
from .prompt import add_speaker_tokens
from .utils import UserError


log = logging.getLogger("magtkd")


# Names of the four pretrained folders inside --pretrained_dir, with their hub ids.
PRETRAINED = {
    "roberta-large": "FacebookAI/roberta-large",
    "data2vec-audio-base-960h": "facebook/data2vec-audio-base-960h",
    "videomae-base": "MCG-NJU/videomae-base",
    "timesformer-base-finetuned-k400": "facebook/timesformer-base-finetuned-k400",
}


TEXT = "roberta-large"


AUDIO = "data2vec-audio-base-960h"


IMAGE_PROCESSOR = "videomae-base"


VIDEO = "timesformer-base-finetuned-k400"


CONFIG = "config.json"


PREPROCESSOR = "preprocessor_config.json"


# Any one of these holds the weights (hub repos ship .bin, .safetensors or both).
WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


# Any one of these holds the tokenizer (tokenizer.json, or the slow vocab.json + merges.txt).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


# What each folder must hold (config.json's ``model_type``, and the prefix of its ``architectures``):
# another model loads with random backbone weights, or fails deep inside transformers.
MODEL_TYPES = {TEXT: ("roberta", "Roberta"), AUDIO: ("data2vec-audio", "Data2VecAudio"),
               IMAGE_PROCESSOR: ("videomae", "VideoMAE"), VIDEO: ("timesformer", "Timesformer")}


# Heads of the checkpoints that the base models do not use: their "unexpected
# keys" are the normal result of loading a base model from a head checkpoint.
_HEAD_PREFIXES = {TEXT: ("lm_head.",), AUDIO: ("lm_head.",), VIDEO: ("classifier.",)}


class PretrainedMissingError(UserError, FileNotFoundError):
    """A pretrained folder, or a file in it, is missing; the message says how to download it."""


class PretrainedMismatchError(UserError, ValueError):
    """A pretrained folder holds another model than the one it is named after (or unreadable files)."""


# What the code reads from each folder (``hf download --include``): without it the CLI fetches every
# framework's copy of the weights (roberta-large ships PyTorch, TF, Flax, Rust and ONNX ones). Weights in
# whichever of the two PyTorch formats a repo ships (transformers reads model.safetensors first).
DOWNLOAD_INCLUDE = {
    TEXT: ("config.json", "model.safetensors", "tokenizer.json", "vocab.json", "merges.txt"),
    AUDIO: ("config.json", "preprocessor_config.json", "model.safetensors", "pytorch_model.bin"),
    IMAGE_PROCESSOR: ("preprocessor_config.json",),
    VIDEO: ("config.json", "model.safetensors", "pytorch_model.bin"),
}


def download_command(pretrained_dir: Path, name: str) -> str:
    """The command that fills ``pretrained_dir/name`` from the hub, fetching only what the code reads."""
    return (f"hf download {_hub_id(name)} --local-dir {_folder(pretrained_dir, name)} --include "
            + " ".join(DOWNLOAD_INCLUDE[name]))


def pretrained_folder(
    pretrained_dir: Path, name: str, required: Sequence[str | tuple[str, ...]] = (CONFIG,)
) -> Path:
    """``pretrained_dir/name`` after checking it exists and holds ``required``.

    Each entry of ``required`` is a file name or a tuple of alternatives (any one
    suffices). Raises `PretrainedMissingError` naming the folder or file and the
    ``hf download`` command that fills it.
    """
    folder = _folder(pretrained_dir, name)
    command = download_command(pretrained_dir, name)
    if not folder.is_dir():
        raise PretrainedMissingError(
            f"pretrained model folder {folder} does not exist ({name}, hub id {_hub_id(name)}). "
            f"Download it with:\n    {command}"
        )
    for entry in required:
        options = (entry,) if isinstance(entry, str) else tuple(entry)
        if not any((folder / option).is_file() for option in options):
            wanted = f"no {options[0]}" if len(options) == 1 else "none of " + ", ".join(options)
            raise PretrainedMissingError(
                f"pretrained model folder {folder} has {wanted}; the download is incomplete. "
                f"Download it again with:\n    {command}"
            )
    if (folder / CONFIG).is_file():
        check_model_type(folder, name)
    return folder


def check_model_type(folder: Path, name: str) -> None:
    """config.json must describe the model ``name`` stands for (``model_type``, and ``architectures``
    when present); the error says which model the folder holds instead."""
    config = _read_json(folder / CONFIG)
    model_type, prefix = MODEL_TYPES[name]
    found = config.get("model_type")
    architectures = config.get("architectures") or []
    wrong_arch = [a for a in architectures if not str(a).startswith(prefix)]
    if found != model_type or wrong_arch:
        held = f"model_type {found!r}" + (f", architectures {architectures}" if architectures else "")
        raise PretrainedMismatchError(
            f"pretrained model folder {folder} holds another model ({held}): {name} needs model_type "
            f"{model_type!r} ({_hub_id(name)}); the folder's contents are the wrong model, not an incomplete "
            f"download. Put the right one there with: {download_command(folder.parent, name)}")


def load_tokenizer(pretrained_dir: Path):
    """The RoBERTa tokenizer of ``roberta-large`` (a transformers ``RobertaTokenizer``).

    The hub folder has no tokenizer_config.json, so transformers would leave
    ``model_max_length`` unlimited; it is set from config.json instead
    (max_position_embeddings minus RoBERTa's padding offset, 512 for the real model).
    """
    from transformers import AutoTokenizer

    folder = pretrained_folder(pretrained_dir, TEXT, (CONFIG, TOKENIZER_FILES))
    config = _read_json(folder / CONFIG)
    kwargs = {}
    if "max_position_embeddings" in config:
        # RoBERTa positions start after the padding index (pad_token_id + 1).
        kwargs["model_max_length"] = int(config["max_position_embeddings"]) - int(config.get("pad_token_id", 1)) - 1
    return AutoTokenizer.from_pretrained(folder, **kwargs)


def load_text_backbone(pretrained_dir: Path):
    """The RoBERTa encoder (``RobertaModel``) of ``roberta-large``, without the pooler.

    The text encoder reads the mask position's hidden state (docs/METHOD.md §2), so
    the pooler would be unused, and the masked-LM checkpoint has no pooler
    weights: it would only add randomly initialised parameters.
    """
    from transformers import AutoModel

    return _load_model(AutoModel, TEXT, pretrained_dir, add_pooling_layer=False)


def load_audio_feature_extractor(pretrained_dir: Path):
    """The ``Wav2Vec2FeatureExtractor`` of ``data2vec-audio-base-960h`` (16 kHz, normalising)."""
    from transformers import AutoFeatureExtractor

    folder = pretrained_folder(pretrained_dir, AUDIO, (PREPROCESSOR,))
    return AutoFeatureExtractor.from_pretrained(folder)


def load_audio_backbone(pretrained_dir: Path, mask_time_length: int = 3):
    """``Data2VecAudioModel`` of ``data2vec-audio-base-960h`` with ``config.mask_time_length`` set.

    docs/METHOD.md §2 (Audio): the reference sets mask_time_length = 3, which is
    what time masking uses in training mode.
    """
    from transformers import Data2VecAudioModel

    return _load_model(Data2VecAudioModel, AUDIO, pretrained_dir, mask_time_length=mask_time_length)


def load_image_processor(pretrained_dir: Path):
    """The ``VideoMAEImageProcessor`` of ``videomae-base`` (resize, crop, rescale, normalise)."""
    from transformers import AutoImageProcessor

    folder = pretrained_folder(pretrained_dir, IMAGE_PROCESSOR, (PREPROCESSOR,))
    return AutoImageProcessor.from_pretrained(folder)


def load_video_backbone(pretrained_dir: Path):
    """``TimesformerModel`` of ``timesformer-base-finetuned-k400`` (the Kinetics head is dropped)."""
    from transformers import TimesformerModel

    return _load_model(TimesformerModel, VIDEO, pretrained_dir)


def _hub_id(name: str) -> str:
    try:
        return PRETRAINED[name]
    except KeyError:
        raise KeyError(f"unknown pretrained model {name!r}; expected one of {sorted(PRETRAINED)}") from None


def _folder(pretrained_dir: Path, name: str) -> Path:
    _hub_id(name)
    return (Path(pretrained_dir).expanduser() / name).resolve()


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PretrainedMismatchError(f"{path} is not valid JSON ({err}); download the folder again") from err
    if not isinstance(doc, dict):
        raise PretrainedMismatchError(f"{path} is not a JSON object; download the folder again")
    return doc


class _HoldLoadReports(logging.Filter):
    """Holds back transformers' "LOAD REPORT" warnings so they can be shown only when they matter."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in str(record.msg):
            self.held.append(record)
            return False
        return True


def _load_model(model_cls, name: str, pretrained_dir: Path, **kwargs):
    """``model_cls.from_pretrained`` on the checked folder, quiet about the dropped head only.

    transformers 5 logs a table of unexpected/missing keys (from the
    ``transformers.modeling_utils`` logger). Loading a base model from a head
    checkpoint always lists the head as unexpected; that report is dropped. Any
    other difference (missing or mismatched weights, unexpected non-head keys)
    or a failed load re-emits the original report.
    """
    from transformers.utils import logging as hf_logging

    # One tqdm bar per epoch is ours; transformers' per-load "Loading weights" bars are noise.
    hf_logging.disable_progress_bar()
    folder = pretrained_folder(pretrained_dir, name, (CONFIG, WEIGHTS))
    hf_logger = logging.getLogger("transformers.modeling_utils")
    hold = _HoldLoadReports()
    hf_logger.addFilter(hold)
    try:
        # float32 whatever the folder stores (transformers 5 keeps the stored dtype by default): the fp32
        # stages train in fp32 and fp16 KD's gradient scaler needs fp32 master weights (docs/METHOD.md §3).
        model, info = model_cls.from_pretrained(folder, output_loading_info=True, dtype=torch.float32, **kwargs)
    except BaseException:
        hf_logger.removeFilter(hold)
        _release(hf_logger, hold)
        raise
    hf_logger.removeFilter(hold)
    heads = _HEAD_PREFIXES.get(name, ())
    surprising = [key for key in info["unexpected_keys"] if not key.startswith(heads)]
    if info["missing_keys"] or info["mismatched_keys"]:
        # The config is the right model's (checked above): the weights file is partial or another one's.
        missing = sorted(info["missing_keys"]) + sorted(str(k[0] if isinstance(k, tuple) else k)
                                                        for k in info["mismatched_keys"])
        raise PretrainedMissingError(
            f"pretrained model folder {folder}: {len(missing)} backbone weights are missing or of the wrong shape "
            f"in its weights file (e.g. {', '.join(missing[:3])}); the model would train from random weights. "
            f"The download is incomplete or corrupt; download it again with: "
            f"{download_command(pretrained_dir, name)}")
    if surprising:
        _release(hf_logger, hold)
    else:
        log.debug("loaded %s from %s (unused head weights: %d)", type(model).__name__, folder,
                  len(info["unexpected_keys"]))
    return model


def _release(hf_logger: logging.Logger, hold: _HoldLoadReports) -> None:
    for record in hold.held:
        hf_logger.handle(record)


def _hidden_size(pretrained_dir: Path, name: str) -> int:
    config = pretrained_folder(pretrained_dir, name) / "config.json"
    return int(json.loads(config.read_text(encoding="utf-8"))["hidden_size"])


def representation_width(pretrained_dir: Path) -> int:
    """D: the audio/video encoders' width, which the text projection must match (docs/METHOD.md §2)."""
    audio = _hidden_size(pretrained_dir, "data2vec-audio-base-960h")
    video = _hidden_size(pretrained_dir, "timesformer-base-finetuned-k400")
    if audio != video:
        raise ValueError(
            f"audio width {audio} != video width {video} in {pretrained_dir}: the fusion stage "
            "needs one representation width for all modalities"
        )
    return audio



# --------------------------------------------------------------------------- encoders


def load_text_encoder(pretrained_dir: Path, num_classes: int) -> tuple[TextEncoder, object]:
    """Text encoder from ``roberta-large`` + its tokenizer, the speaker tokens added and the embeddings resized."""
    tokenizer = load_tokenizer(pretrained_dir)
    vocab = add_speaker_tokens(tokenizer)
    backbone = load_text_backbone(pretrained_dir)
    # The reference resized the model but encoded with a tokenizer that lacked
    # the speaker tokens; here both see the same vocabulary (docs/METHOD.md §2).
    backbone.resize_token_embeddings(vocab, mean_resizing=False)
    return TextEncoder(backbone, representation_width(pretrained_dir), num_classes), tokenizer


def load_audio_encoder(pretrained_dir: Path, num_classes: int) -> tuple[AudioEncoder, object]:
    """Audio encoder from ``data2vec-audio-base-960h`` (time masking length 3, docs/METHOD.md §2) + its
    feature extractor."""
    extractor = load_audio_feature_extractor(pretrained_dir)
    backbone = load_audio_backbone(pretrained_dir, mask_time_length=3)
    return AudioEncoder(backbone, num_classes), extractor


def load_video_encoder(pretrained_dir: Path, num_classes: int, codec: FrameCodec | None = None) -> VideoEncoder:
    """Video encoder from ``timesformer-base-finetuned-k400`` (its frames are prepared by the
    ``videomae-base`` image processor, `load_image_processor`); it normalises the stored uint8 frames with
    ``codec``'s statistics (default: the processor's ImageNet ones)."""
    if codec is None:
        return VideoEncoder(load_video_backbone(pretrained_dir), num_classes)
    return VideoEncoder(load_video_backbone(pretrained_dir), num_classes, codec.scale,
                        tuple(codec.mean.flatten().tolist()), tuple(codec.std.flatten().tolist()))


def text_prompt(text_record: Path, given: str | None) -> str:
    """The prompt variant the text model next to ``text_record`` (``text.json``) was trained with: its recorded
    ``args.prompt``, ``full`` for a checkpoint without one (the authors', or trained before the variants);
    ``given`` (an explicit ``--prompt``) must agree (docs/METHOD.md §2, Prompt variants)."""
    args = recorded_args(text_record)
    trained = str(args["prompt"]) if args.get("prompt") is not None else "full"
    if given is not None and given != trained:
        raise UserError(f"--prompt {given} but the text model was trained with --prompt {trained} ({text_record}); "
                        "leave --prompt out to use the trained prompt")
    return trained


def load_encoder(modality: str, pretrained_dir: Path, num_classes: int, feature_dir: Path | None = None,
                 audio_cache: Path | None = None, prompt: str = "full") -> tuple[nn.Module, object]:
    """``(encoder, data field)`` of one modality: the encoder initialised from its pretrained folder, and
    the `magtkd.dataset` field that turns samples into its input (text builds the ``prompt`` variant; video reads
    stored frames from ``feature_dir``;
    audio stores decoded clips in ``audio_cache``, `magtkd.dataset.AudioCache`, None: decode every time)."""
    if modality == "text":
        encoder, tokenizer = load_text_encoder(pretrained_dir, num_classes)
        return encoder, TextField(tokenizer, prompt)
    if modality == "audio":
        encoder, extractor = load_audio_encoder(pretrained_dir, num_classes)
        return encoder, AudioField(extractor, cache_dir=audio_cache)
    if modality == "video":
        if feature_dir is None:
            raise ValueError("the video encoder reads stored frames: pass feature_dir")
        codec = FrameCodec(load_image_processor(pretrained_dir))
        return load_video_encoder(pretrained_dir, num_classes, codec), VideoField(codec, feature_dir)
    raise ValueError(f"unknown modality {modality!r}; expected text, audio or video")
