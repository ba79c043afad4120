"""The three first-stage encoders around their Hugging Face backbones (RoBERTa prompt, data2vec-audio,
TimeSformer) and their cross-entropy objective (docs/METHOD.md §2).

Each takes an already built backbone (`magtkd.pretrained` builds them), so this module itself imports
only torch.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn


class TextEncoder(nn.Module):
    """RoBERTa prompt encoder: hidden state at the mask token -> Linear(hidden, D) -> Linear(D, C)."""

    def __init__(self, backbone: nn.Module, out_dim: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.project = nn.Linear(backbone.config.hidden_size, out_dim)
        self.classifier = nn.Linear(out_dim, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        # Prompts are LEFT-padded and end with the mask token, so the last
        # position is the mask token for every sample (docs/METHOD.md §2, Text).
        rep = self.project(hidden[:, -1, :])
        return rep, self.classifier(rep)

    @property
    def width(self) -> int:
        """D, the representation's width."""
        return self.classifier.in_features

    def encode(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(representation, logits)`` of a batch from `magtkd.dataset.TextField`."""
        return self(batch["text_ids"], batch["text_mask"])


class AudioEncoder(nn.Module):
    """data2vec-audio: first frame of the last hidden state -> Linear(hidden, C)."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(backbone.config.hidden_size, num_classes)
        self._frame_mask: torch.Tensor | None = None
        # data2vec zeroes padded frames once, before its STACK of positional
        # convolutions; after the first one they are no longer zero and leak into
        # a clip's last frames (and, through attention, into frame 0). Re-zero them
        # after every positional conv layer, so a clip's representation does not
        # depend on its batch (docs/METHOD.md §2, Audio). Unpadded clips are unchanged.
        pos_conv = getattr(getattr(backbone, "encoder", None), "pos_conv_embed", None)
        for layer in getattr(pos_conv, "layers", ()):
            layer.register_forward_hook(self._zero_padded_frames)

    def _zero_padded_frames(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if self._frame_mask is None or output.shape[-1] != self._frame_mask.shape[-1]:
            return output
        return output * self._frame_mask[:, None, :].to(output.dtype)

    def forward(self, input_values: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Right padding + attention mask: frame 0 is always real audio.
        lengths = attention_mask.sum(-1)
        frames = self.backbone._get_feat_extract_output_lengths(lengths)
        # The padded length's frame count from the shape, on the host: reading it from a device tensor
        # would make the host wait for the GPU (docs/METHOD.md §6, "No waiting for the host").
        total = int(self.backbone._get_feat_extract_output_lengths(torch.tensor(input_values.shape[-1])))
        self._frame_mask = torch.arange(total, device=lengths.device)[None, :] < frames[:, None]
        try:
            hidden = self.backbone(input_values=input_values, attention_mask=attention_mask).last_hidden_state
        finally:
            self._frame_mask = None
        rep = hidden[:, 0, :]
        return rep, self.classifier(rep)

    @property
    def width(self) -> int:
        return self.classifier.in_features

    def encode(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(representation, logits)`` of a batch from `magtkd.dataset.AudioField`."""
        return self(batch["audio_values"], batch["audio_mask"])


class VideoEncoder(nn.Module):
    """TimeSformer: CLS token of the last hidden state -> Linear(hidden, C).

    Its input is the stored uint8 frames (``VideoField``), normalised here, on the model's device, as the
    videomae-base processor normalises them (``pixel_scale``, ``pixel_mean``, ``pixel_std``: its rescale
    factor and ImageNet mean/std; `magtkd.frames.FrameCodec.normalize` computes the same values): the loader
    and the host-to-device copy move a quarter of the fp32 bytes (docs/METHOD.md §2, Input). Float input
    (already normalised ``pixel_values``) passes unchanged. The statistics are non-persistent buffers: they
    follow the model to its device and stay out of the checkpoint.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, pixel_scale: float = 1 / 255,
                 pixel_mean: tuple[float, ...] = (0.485, 0.456, 0.406),
                 pixel_std: tuple[float, ...] = (0.229, 0.224, 0.225)) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(backbone.config.hidden_size, num_classes)
        self.pixel_scale = float(pixel_scale)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(1, 1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(1, 1, 3, 1, 1),
                             persistent=False)

    def pixels(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, 8, 3, h, w) uint8 stored frames -> float32 ``pixel_values``; float input unchanged."""
        if frames.dtype != torch.uint8:
            return frames
        return (frames.to(torch.float32) * self.pixel_scale - self.pixel_mean) / self.pixel_std

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rep = self.backbone(pixel_values=self.pixels(pixel_values)).last_hidden_state[:, 0, :]
        return rep, self.classifier(rep)

    @property
    def width(self) -> int:
        return self.classifier.in_features

    def encode(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(representation, logits)`` of a batch from `magtkd.loaders.VideoField`."""
        return self(batch["video_pixels"])


def encoder_cross_entropy(encoder: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The objective of the text, audio and video stages: cross-entropy on the encoder's logits
    (computed in fp32 under autocast; docs/METHOD.md §2)."""
    _, logits = encoder.encode(batch)
    return F.cross_entropy(logits.float(), batch["labels"])
