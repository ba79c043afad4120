"""First-stage encoders (SPEC section 2): each returns ``(representation, logits)``.

Widths are read from the backbones' configs, never hard-coded, so the same code
runs the real pretrained models and the tiny generated stand-ins.
"""

from __future__ import annotations

import torch
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
        # position is the mask token for every sample (SPEC section 2, Text).
        rep = self.project(hidden[:, -1, :])
        return rep, self.classifier(rep)


class AudioEncoder(nn.Module):
    """data2vec-audio: first frame of the last hidden state -> Linear(hidden, C)."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(backbone.config.hidden_size, num_classes)

    def forward(self, input_values: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Right padding + attention mask: frame 0 is always real audio, so a
        # clip's representation does not depend on its batch (SPEC section 2, Audio).
        hidden = self.backbone(input_values=input_values, attention_mask=attention_mask).last_hidden_state
        rep = hidden[:, 0, :]
        return rep, self.classifier(rep)


class VideoEncoder(nn.Module):
    """TimeSformer: CLS token of the last hidden state -> Linear(hidden, C)."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(backbone.config.hidden_size, num_classes)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rep = self.backbone(pixel_values=pixel_values).last_hidden_state[:, 0, :]
        return rep, self.classifier(rep)
