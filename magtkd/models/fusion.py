"""Multi-modal anchor gated transformer and its loss (SPEC section 5).

Module and parameter names follow the reference exactly, so that its
``multimodal_fusion_best.bin`` loads into :class:`AnchorGatedTransformer`:
``speaker_embeddings``; blocks ``t_t a_a t_a v_a v_v t_v a_v`` (+ ``a_t v_t``
with separate text blocks), each ``pos_emb.pe`` +
``transformer_inter.0.{self_attn.{proj_q,proj_k,proj_v,fc}, feed_forward.{w_1,w_2,layer_norm}, layer_norm}``;
gates ``<block>_gate.fc``; ``features_reduce_{t,a,v}``; heads ``w_{t,a,v}``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import CheckpointError, mismatch, read_state_dict
from ..losses import StudentObjective

log = logging.getLogger("magtkd")

MAX_LEN = 512  # longest dialogue the positional encoding covers
MASK_VALUE = -1e9  # score given to padded keys before the softmax

# Blocks by anchor: (name, key/value stream, query stream). SPEC section 5, "Forward".
AUDIO_ANCHOR = ("a_a", "t_a", "v_a")
VIDEO_ANCHOR = ("v_v", "t_v", "a_v")
TEXT_ANCHOR = ("t_t", "a_t", "v_t")


class FusionCheckpointError(CheckpointError):
    """A fusion checkpoint that is missing or does not fit the model."""


class PositionalEncoding(nn.Module):
    """Sinusoidal positions (max 512) plus the speaker embedding, added to a stream."""

    def __init__(self, hidden: int, max_len: int = MAX_LEN) -> None:
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, hidden, 2, dtype=torch.float) * -(math.log(10000.0) / hidden))
        pe = torch.zeros(max_len, hidden)
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term[: hidden // 2])
        # Persistent: the reference's checkpoints hold ``<block>.pos_emb.pe`` (1, 512, H).
        self.register_buffer("pe", pe.unsqueeze(0), persistent=True)

    def forward(self, x: torch.Tensor, speaker_emb: torch.Tensor) -> torch.Tensor:
        length = x.size(1)
        if length > self.pe.size(1):
            raise ValueError(f"dialogue of {length} utterances exceeds the positional encoding's {self.pe.size(1)}")
        return x + self.pe[:, :length] + speaker_emb


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention with separate q/k/v projections; padded keys are masked."""

    def __init__(self, hidden: int, n_head: int, dropout: float) -> None:
        super().__init__()
        if hidden % n_head:
            raise ValueError(f"hidden width {hidden} is not divisible by n_head {n_head}")
        self.n_head, self.d_head = n_head, hidden // n_head
        self.proj_q = nn.Linear(hidden, hidden)
        self.proj_k = nn.Linear(hidden, hidden)
        self.proj_v = nn.Linear(hidden, hidden)
        self.fc = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        for linear in (self.proj_q, self.proj_k, self.proj_v, self.fc):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.n_head, self.d_head).transpose(1, 2)

    def forward(self, key_value: torch.Tensor, query: torch.Tensor, key_padding: torch.Tensor) -> torch.Tensor:
        """``key_padding``: (batch, length) bool, True where the KEY position is padding."""
        q = self._heads(self.proj_q(query)) / math.sqrt(self.d_head)
        k = self._heads(self.proj_k(key_value))
        v = self._heads(self.proj_v(key_value))
        scores = q @ k.transpose(-2, -1)  # (batch, head, query, key)
        # Mask padded KEYS (the Nov-2025 fix; the May-2025 release masked the wrong axis, SPEC section 7).
        scores = scores.masked_fill(key_padding[:, None, None, :], MASK_VALUE)
        attn = self.dropout(torch.softmax(scores, dim=-1))
        context = (attn @ v).transpose(1, 2).reshape(query.shape)
        return self.fc(context)


class FeedForward(nn.Module):
    """Pre-norm feed-forward with residual: ``x + drop(W2(drop(GELU(W1(LN(x))))))``."""

    def __init__(self, hidden: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.w_1 = nn.Linear(hidden, d_ff)
        self.w_2 = nn.Linear(d_ff, hidden)
        self.layer_norm = nn.LayerNorm(hidden, eps=1e-6)
        self.dropout_1 = nn.Dropout(dropout)
        self.dropout_2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = self.dropout_1(F.gelu(self.w_1(self.layer_norm(x))))
        return x + self.dropout_2(self.w_2(inner))


class TransformerLayer(nn.Module):
    """Attention of the query stream over the key/value stream, residual, feed-forward."""

    def __init__(self, hidden: int, n_head: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(hidden, n_head, dropout)
        self.feed_forward = FeedForward(hidden, d_ff, dropout)
        # Normalises the query stream of layers after the first; with the paper's
        # single layer it exists (and is in the checkpoint) but is never applied.
        self.layer_norm = nn.LayerNorm(hidden, eps=1e-6)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, y: torch.Tensor, key_padding: torch.Tensor, cross: bool,
                first: bool) -> torch.Tensor:
        if not first:
            y = self.layer_norm(y)
        context = self.self_attn(x if cross else y, y, key_padding)
        return self.feed_forward(self.dropout(context) + y)


class TransformerBlock(nn.Module):
    """Block ``X -> Y``: stream Y attends to stream X (self block when ``cross`` is False: X is Y)."""

    def __init__(self, hidden: int, n_head: int, dropout: float, n_layers: int = 1) -> None:
        super().__init__()
        self.pos_emb = PositionalEncoding(hidden)
        self.transformer_inter = nn.ModuleList(
            TransformerLayer(hidden, n_head, hidden, dropout) for _ in range(n_layers)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, speaker_emb: torch.Tensor,
                cross: bool) -> torch.Tensor:
        """``mask``: (batch, length) bool, True for real utterances. Returns the new Y."""
        key_padding = ~mask
        if cross:
            # Cross block: both streams get position + speaker embedding, then dropout.
            x = self.dropout(self.pos_emb(x, speaker_emb))
            y = self.dropout(self.pos_emb(y, speaker_emb))
        else:
            # Self block: position + speaker embedding only (SPEC section 5).
            y = self.pos_emb(y, speaker_emb)
            x = y
        for i, layer in enumerate(self.transformer_inter):
            y = layer(x, y, key_padding, cross, first=i == 0)
        return y


class Gate(nn.Module):
    """``g(x) = sigmoid(ReLU(W x + b)) * x``."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(F.relu(self.fc(x))) * x


class FusionOutput(NamedTuple):
    t_logits: torch.Tensor  # the prediction (batch, length, classes)
    a_logits: torch.Tensor
    v_logits: torch.Tensor
    t_feat: torch.Tensor  # T' (batch, length, hidden)
    a_feat: torch.Tensor  # A'
    v_feat: torch.Tensor  # V'


class AnchorGatedTransformer(nn.Module):
    """The second-stage model: audio, video and text anchors over utterance features (SPEC section 5)."""

    def __init__(self, hidden: int, n_classes: int, n_speaker: int, n_head: int = 8, dropout: float = 0.5,
                 separate_text_blocks: bool = False) -> None:
        super().__init__()
        self.hidden, self.n_classes, self.n_speaker = hidden, n_classes, n_speaker
        self.separate_text_blocks = separate_text_blocks
        # Row n_speaker is the padding row. The reference used id 2 on both
        # datasets, which on MELD is a real speaker (SPEC section 5).
        self.speaker_embeddings = nn.Embedding(n_speaker + 1, hidden, padding_idx=n_speaker)
        nn.init.normal_(self.speaker_embeddings.weight, mean=0.0, std=0.1)
        names = AUDIO_ANCHOR + VIDEO_ANCHOR + (TEXT_ANCHOR if separate_text_blocks else TEXT_ANCHOR[:1])
        for name in names:
            self.add_module(name, TransformerBlock(hidden, n_head, dropout))
            self.add_module(f"{name}_gate", Gate(hidden))
        for modality in ("t", "a", "v"):
            self.add_module(f"features_reduce_{modality}", nn.Linear(3 * hidden, hidden))
        for modality in ("t", "a", "v"):
            self.add_module(f"w_{modality}", nn.Linear(hidden, n_classes))

    @property
    def padding_speaker(self) -> int:
        return self.n_speaker

    def _path(self, name: str, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, spk: torch.Tensor,
              cross: bool) -> torch.Tensor:
        # Reference behaviour: all text-anchor paths use the t_t block and gate.
        if name in TEXT_ANCHOR and not self.separate_text_blocks:
            name = "t_t"
        block, gate = getattr(self, name), getattr(self, f"{name}_gate")
        return gate(block(x, y, mask, spk, cross=cross))

    def forward(self, text: torch.Tensor, audio: torch.Tensor, video: torch.Tensor, speakers: torch.Tensor,
                mask: torch.Tensor) -> FusionOutput:
        """Streams (batch, length, hidden); ``speakers`` (batch, length) long; ``mask`` True = real utterance."""
        spk = self.speaker_embeddings(speakers)
        a_a = self._path("a_a", audio, audio, mask, spk, cross=False)
        t_a = self._path("t_a", text, audio, mask, spk, cross=True)
        v_a = self._path("v_a", video, audio, mask, spk, cross=True)
        a_feat = self.features_reduce_a(torch.cat([a_a, t_a, v_a], dim=-1))

        v_v = self._path("v_v", video, video, mask, spk, cross=False)
        t_v = self._path("t_v", text, video, mask, spk, cross=True)
        a_v = self._path("a_v", audio, video, mask, spk, cross=True)
        v_feat = self.features_reduce_v(torch.cat([v_v, t_v, a_v], dim=-1))

        # The text anchor attends to the fused A' and V', not to the raw streams.
        t_t = self._path("t_t", text, text, mask, spk, cross=False)
        a_t = self._path("a_t", a_feat, text, mask, spk, cross=True)
        v_t = self._path("v_t", v_feat, text, mask, spk, cross=True)
        t_feat = self.features_reduce_t(torch.cat([t_t, a_t, v_t], dim=-1))

        return FusionOutput(self.w_t(t_feat), self.w_a(a_feat), self.w_v(v_feat), t_feat, a_feat, v_feat)


class FusionLoss(nn.Module):
    """``CE(W_t T') + alpha KD(A') + beta KD(V')`` over real utterances (SPEC section 5).

    ``KD(X') = CE(W_x X') + L_logit(W_x X', W_t T')`` (+ ``L_feat(X', T')`` when
    ``feature_loss``). The teacher side (text) is not detached: it is trained by
    these terms too, as in the reference.
    """

    def __init__(self, alpha: float, beta: float, feature_loss: bool) -> None:
        super().__init__()
        self.alpha, self.beta = alpha, beta
        self.anchor_kd = StudentObjective(ce_weight=1.0, logit_weight=1.0, feature_weight=1.0 if feature_loss else 0.0)

    def forward(self, out: FusionOutput, labels: torch.Tensor, mask: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, float]]:
        t_logits, a_logits, v_logits = out.t_logits[mask], out.a_logits[mask], out.v_logits[mask]
        t_feat, a_feat, v_feat = out.t_feat[mask], out.a_feat[mask], out.v_feat[mask]
        target = labels[mask]
        ce_t = F.cross_entropy(t_logits, target)
        kd_a, _ = self.anchor_kd(a_logits, target, t_logits, a_feat, t_feat)
        kd_v, _ = self.anchor_kd(v_logits, target, t_logits, v_feat, t_feat)
        total = ce_t + self.alpha * kd_a + self.beta * kd_v
        return total, {"ce_t": ce_t.item(), "kd_a": kd_a.item(), "kd_v": kd_v.item()}


# --------------------------------------------------------------------------- checkpoints

_REFERENCE_ONLY = ("fc.",)  # the reference's top-level fc, never used in its forward
_UNUSED_WHEN_SHARING = ("a_t.", "v_t.", "a_t_gate.", "v_t_gate.")


def infer_sizes_from_checkpoint(state: Mapping[str, torch.Tensor]) -> dict[str, int | bool]:
    """Sizes a checkpoint fixes: ``n_speaker``, ``hidden``, ``n_classes``, ``separate_text_blocks``.

    ``n_head`` does not show in any shape and must come from the command line.
    ``separate_text_blocks`` is True only for our checkpoints trained with
    separate text blocks (``a_t`` weights without the reference's ``fc``).
    """
    for key in ("speaker_embeddings.weight", "w_t.weight"):
        if key not in state:
            raise FusionCheckpointError(f"checkpoint has no {key!r}: not a multimodal fusion checkpoint")
    rows, hidden = state["speaker_embeddings.weight"].shape
    has_a_t = any(k.startswith("a_t.") for k in state)
    is_reference = any(k.startswith(_REFERENCE_ONLY) for k in state)
    return {
        "n_speaker": int(rows) - 1,
        "hidden": int(hidden),
        "n_classes": int(state["w_t.weight"].shape[0]),
        "separate_text_blocks": bool(has_a_t and not is_reference),
    }


def read_fusion_state(path: str | Path) -> dict[str, torch.Tensor]:
    """``torch.load`` a plain state_dict (tensors only) from ``path``."""
    try:
        return read_state_dict(path, "multimodal_fusion.py --train True")
    except CheckpointError as err:
        raise FusionCheckpointError(f"fusion {err}") from err


def load_fusion_checkpoint(model: AnchorGatedTransformer, path: str | Path) -> AnchorGatedTransformer:
    """Load our checkpoint or the reference's into ``model``; errors name the file and the keys.

    The reference's never-used entries (``fc.*``, and ``a_t``/``v_t`` blocks and
    gates when the model shares the text block as the reference does) are
    dropped with one log line. Anything else missing, unexpected or of another
    shape is an error (SPEC section 6).
    """
    path = Path(path)
    state = read_fusion_state(path)
    is_reference = any(k.startswith(_REFERENCE_ONLY) for k in state)
    drop = _REFERENCE_ONLY + (() if model.separate_text_blocks else _UNUSED_WHEN_SHARING)
    dropped = sorted(k for k in state if is_reference and k.startswith(drop))
    if dropped:
        log.info("%s: reference checkpoint; dropping %d never-used entries (%s)", path, len(dropped),
                 ", ".join(sorted({k.split(".")[0] for k in dropped})))
        state = {k: v for k, v in state.items() if k not in set(dropped)}
    problems = mismatch(model, state)
    if problems:
        hint = ""
        unexpected = set(state) - set(model.state_dict())
        if not model.separate_text_blocks and any(k.startswith(_UNUSED_WHEN_SHARING) for k in unexpected):
            hint = "; it holds a_t/v_t blocks without the reference's fc: was it trained with --separate_text_blocks?"
        raise FusionCheckpointError(f"fusion checkpoint {path} does not fit the model ({problems}){hint}")
    model.load_state_dict(state)
    return model
