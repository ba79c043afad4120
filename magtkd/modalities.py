"""The three first-stage modalities: how to build each encoder, feed it, and name its checkpoint.

Used by the unimodal stages, KD.py and extract_first_stage_features.py, so each
modality is described once.
"""

from __future__ import annotations

from argparse import Namespace
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from . import pretrained
from .frames import FrameCodec
from .loaders import AudioField, TextField, VideoField
from .models.build import build_audio, build_text, build_video

Forward = Callable[[nn.Module, dict], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Modality:
    name: str
    checkpoint: str  # file in --save_dir written by the unimodal stage
    script: str  # the stage that writes it
    forward: Forward


MODALITIES = {
    "text": Modality("text", "text.bin", "text.py",
                     lambda m, b: m(b["text_ids"], b["text_mask"])),
    "audio": Modality("audio", "audio.bin", "audio.py",
                      lambda m, b: m(b["audio_values"], b["audio_mask"])),
    "video": Modality("video", "video.bin", "video.py",
                      lambda m, b: m(b["video_pixels"])),
}


def build(name: str, num_classes: int, args: Namespace) -> tuple[nn.Module, Any]:
    """Encoder initialised from the pretrained folder, and the data field that feeds it."""
    if name == "text":
        model, tokenizer = build_text(args.pretrained_dir, num_classes)
        return model, TextField(tokenizer)
    if name == "audio":
        model, extractor = build_audio(args.pretrained_dir, num_classes)
        return model, AudioField(extractor)
    if name == "video":
        codec = FrameCodec(pretrained.load_image_processor(args.pretrained_dir))
        return build_video(args.pretrained_dir, num_classes), VideoField(codec, args.feature_dir)
    raise ValueError(f"unknown modality {name!r}; expected one of {sorted(MODALITIES)}")


def kd_checkpoint(teacher: str, student: str) -> str:
    """``{teacher}_KD_{student}.bin`` (SPEC section 3; the seed README's video_KD_text.bin is a typo)."""
    return f"{teacher}_KD_{student}.bin"
