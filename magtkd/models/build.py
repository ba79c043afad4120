"""Build the first-stage encoders from a pretrained folder, and load our checkpoints strictly."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from .. import pretrained
from ..checkpoints import CheckpointError, mismatch, read_state_dict
from ..prompt import add_speaker_tokens
from .encoders import AudioEncoder, TextEncoder, VideoEncoder


def _hidden_size(pretrained_dir: Path, name: str) -> int:
    config = pretrained.pretrained_folder(pretrained_dir, name) / "config.json"
    return int(json.loads(config.read_text(encoding="utf-8"))["hidden_size"])


def representation_width(pretrained_dir: Path) -> int:
    """D: the audio/video encoders' width, which the text projection must match (SPEC section 2)."""
    audio = _hidden_size(pretrained_dir, "data2vec-audio-base-960h")
    video = _hidden_size(pretrained_dir, "timesformer-base-finetuned-k400")
    if audio != video:
        raise ValueError(
            f"audio width {audio} != video width {video} in {pretrained_dir}: the fusion stage "
            "needs one representation width for all modalities"
        )
    return audio


def build_text(pretrained_dir: Path, num_classes: int):
    """Text encoder + tokenizer with the speaker tokens added and the embeddings resized."""
    tokenizer = pretrained.load_tokenizer(pretrained_dir)
    vocab = add_speaker_tokens(tokenizer)
    backbone = pretrained.load_text_backbone(pretrained_dir)
    # The reference resized the model but encoded with a tokenizer that lacked
    # the speaker tokens; here both see the same vocabulary (SPEC section 2).
    backbone.resize_token_embeddings(vocab, mean_resizing=False)
    return TextEncoder(backbone, representation_width(pretrained_dir), num_classes), tokenizer


def build_audio(pretrained_dir: Path, num_classes: int):
    """Audio encoder (time masking length 3, SPEC section 2) + its feature extractor."""
    extractor = pretrained.load_audio_feature_extractor(pretrained_dir)
    backbone = pretrained.load_audio_backbone(pretrained_dir, mask_time_length=3)
    return AudioEncoder(backbone, num_classes), extractor


def build_video(pretrained_dir: Path, num_classes: int) -> VideoEncoder:
    return VideoEncoder(pretrained.load_video_backbone(pretrained_dir), num_classes)


def load_checkpoint(model: nn.Module, path: Path, produced_by: str) -> nn.Module:
    """Load a plain state_dict strictly; errors name the file and the mismatched keys."""
    state = read_state_dict(path, produced_by)
    problems = mismatch(model, state)
    if problems:
        raise CheckpointError(
            f"checkpoint {path} does not match the model ({problems}); "
            f"was it written by {produced_by} with the same pretrained folder?"
        )
    model.load_state_dict(state)
    return model
