"""Models: the three first-stage encoders, the KD losses, the multi-modal anchor gated
transformer, and the loaders of both kinds of checkpoint, ours and the authors'
(docs/METHOD.md §2, §3, §5, §6).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .artifacts import FUSION, CheckpointError, StageFiles, check_complete, mismatch, read_state_dict
from .dataset import DatasetSpec
from .utils import UserError


log = logging.getLogger("magtkd")



# --------------------------------------------------------------------------- first-stage encoders

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
        total = self.backbone._get_feat_extract_output_lengths(torch.full_like(lengths, input_values.shape[-1]))
        self._frame_mask = torch.arange(int(total.max()), device=lengths.device)[None, :] < frames[:, None]
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
    """TimeSformer: CLS token of the last hidden state -> Linear(hidden, C)."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(backbone.config.hidden_size, num_classes)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rep = self.backbone(pixel_values=pixel_values).last_hidden_state[:, 0, :]
        return rep, self.classifier(rep)

    @property
    def width(self) -> int:
        return self.classifier.in_features

    def encode(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(representation, logits)`` of a batch from `magtkd.dataset.VideoField`."""
        return self(batch["video_pixels"])


# --------------------------------------------------------------------------- losses

def encoder_cross_entropy(encoder: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The objective of the text, audio and video stages: cross-entropy on the encoder's logits
    (computed in fp32 under autocast; docs/METHOD.md §2)."""
    _, logits = encoder.encode(batch)
    return F.cross_entropy(logits.float(), batch["labels"])


PEARSON_EPS = 1e-8


def pearson(x: torch.Tensor, y: torch.Tensor, dim: int = -1, eps: float = PEARSON_EPS) -> torch.Tensor:
    """Pearson correlation along ``dim``: cosine of mean-centred vectors, ``eps`` added to the denominator."""
    x = x - x.mean(dim=dim, keepdim=True)
    y = y - y.mean(dim=dim, keepdim=True)
    return (x * y).sum(dim=dim) / (x.norm(dim=dim) * y.norm(dim=dim) + eps)


def logit_kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 2.0,
    beta: float = 1.0, gamma: float = 1.0,
) -> torch.Tensor:
    """``tau^2 * (beta * inter + gamma * intra)`` for logits of shape (batch, classes) (docs/METHOD.md §3).

    ``inter = 1 - mean_i pearson(p_s[i, :], p_t[i, :])`` and
    ``intra = 1 - mean_j pearson(p_s[:, j], p_t[:, j])`` with ``p = softmax(z / tau)``.
    With a batch of one the intra term is constant 1 (a single value has no
    spread to correlate); it then contributes no gradient.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"logit_kd_loss expects two (batch, classes) tensors of the same shape, got "
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)}"
        )
    p_s = torch.softmax(student_logits / tau, dim=1)
    p_t = torch.softmax(teacher_logits / tau, dim=1)
    inter = 1.0 - pearson(p_s, p_t, dim=1).mean()
    intra = 1.0 - pearson(p_s, p_t, dim=0).mean()
    return tau**2 * (beta * inter + gamma * intra)


def feature_kd_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """Relational feature loss ``KL(P || Q)``, batch-mean, temperature 1 (docs/METHOD.md §3).

    After L2 normalisation, ``P = softmax(h_t h_t^T)`` and ``log Q = log_softmax(h_t h_s^T)``,
    both row-wise over the batch.
    """
    if student_feat.dim() != 2 or teacher_feat.dim() != 2 or student_feat.shape[0] != teacher_feat.shape[0]:
        raise ValueError(
            f"feature_kd_loss expects (batch, width) tensors with the same batch size, got "
            f"student {tuple(student_feat.shape)} and teacher {tuple(teacher_feat.shape)}"
        )
    if student_feat.shape[1] != teacher_feat.shape[1]:
        raise ValueError(
            f"feature_kd_loss: student width {student_feat.shape[1]} != teacher width "
            f"{teacher_feat.shape[1]} (h_t h_s^T needs equal widths)"
        )
    h_s = F.normalize(student_feat, dim=1)
    h_t = F.normalize(teacher_feat, dim=1)
    p = torch.softmax(h_t @ h_t.t(), dim=1)
    log_q = torch.log_softmax(h_t @ h_s.t(), dim=1)
    return F.kl_div(log_q, p, reduction="batchmean")


# --------------------------------------------------------------------------- anchor gated fusion transformer


MAX_LEN = 512  # longest dialogue the positional encoding covers
MASK_VALUE = -1e9  # score given to padded keys before the softmax
SMALL_DROPOUT = 65536  # values below which one F.dropout call costs less than drawing the mask ourselves

# Blocks by anchor: (name, key/value stream, query stream). docs/METHOD.md §5, "Forward".
AUDIO_ANCHOR = ("a_a", "t_a", "v_a")
VIDEO_ANCHOR = ("v_v", "t_v", "a_v")
TEXT_ANCHOR = ("t_t", "a_t", "v_t")


class FusionCheckpointError(CheckpointError):
    """A fusion checkpoint that is missing or does not fit the model."""


class Layout:
    """Where the utterances of a fusion batch sit, and how the streams are laid out.

    ``mask`` (batch, length) is True for real utterances. With ``index`` the streams
    are PACKED: rows (N, hidden) of the real utterances only, dialogue after
    dialogue, at flat positions ``index`` of the batch x length grid and at
    ``positions`` within their dialogue. Without it they are PADDED (batch, length,
    hidden), the authors' layout. Both compute the same function of the real
    utterances (docs/METHOD.md §5, "Speed"): only attention needs the grid, so the
    per-utterance layers (projections, feed-forward, gates, heads) skip the padding.
    Dropout draws its mask over the whole grid in both layouts, so a seed gives the
    same masks, and the same training run, as the padded model.
    """

    def __init__(self, mask: torch.Tensor, index: torch.Tensor | None = None,
                 positions: torch.Tensor | None = None) -> None:
        self.mask, self.index, self.positions = mask, index, positions
        self.key_padding = ~mask  # True where the KEY position is padding

    @property
    def packed(self) -> bool:
        return self.index is not None

    @property
    def length(self) -> int:
        return self.mask.size(1)

    def grid(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, length, ...) view of ``x``; packed rows are scattered into zeros."""
        if not self.packed:
            return x
        batch, length = self.mask.shape
        flat = x.new_zeros(batch * length, *x.shape[1:]).index_copy(0, self.index, x)
        return flat.view(batch, length, *x.shape[1:])

    def rows(self, grid: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`grid`: the real utterances' rows of a (batch, length, ...) tensor."""
        if not self.packed:
            return grid
        return grid.reshape(-1, *grid.shape[2:]).index_select(0, self.index)

    def positional(self, pe: torch.Tensor) -> torch.Tensor:
        """The sinusoidal rows ``pe`` (1, max_len, hidden) for this layout's positions."""
        if self.length > pe.size(1):
            raise ValueError(f"dialogue of {self.length} utterances exceeds the positional encoding's {pe.size(1)}")
        return pe[0].index_select(0, self.positions) if self.packed else pe[:, :self.length]

    def dropout(self, x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
        """:func:`dropout` of the padded stream, applied to this layout's rows: packed rows get the
        rows of a mask drawn over the whole grid, with the same generator calls, so the same units
        are kept as in the padded model (bit for bit on CPU, which the tests check)."""
        if not self.packed or not training or p == 0 or p >= 1:
            return dropout(x, p, training)
        return x * _dropout_noise((*self.mask.shape, *x.shape[1:]), p, x, self.rows)


def _dropout_noise(shape: Sequence[int], p: float, like: torch.Tensor,
                   select: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The tensor ``F.dropout`` multiplies a ``shape`` input by (0 or ``1 / (1 - p)``), drawn with
    its generator calls; ``select`` (e.g. :meth:`Layout.rows`) keeps part of it, decided only there.

    On CPU ``F.dropout`` fills its mask with ``bernoulli_(1 - p)``, which draws one
    float64 uniform per element and keeps it when below ``1 - p``, then divides by
    ``1 - p``; ``torch.rand(..., float64) < 1 - p`` makes the same draws about three
    times faster. Elsewhere ``native_dropout`` of ones draws ``F.dropout``'s mask.
    """
    if like.device.type == "cpu":
        uniforms = torch.rand(shape, dtype=torch.float64)
        if select is not None:  # every draw is made; only the selected ones are compared and scaled
            uniforms = select(uniforms)
        return (uniforms < 1 - p).to(like.dtype).div_(1 - p)
    noise = torch.native_dropout(like.new_ones(shape), p, True)[0]
    return noise if select is None else select(noise)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout``, with its CPU mask drawn faster (:func:`_dropout_noise`): the same tensor, bit for
    bit. Small tensors, where one call costs less, strided ones and other devices run ``F.dropout``."""
    if (not training or p == 0 or p >= 1 or x.device.type != "cpu" or not x.is_contiguous()
            or x.numel() < SMALL_DROPOUT):
        return F.dropout(x, p, training)
    return x * _dropout_noise(x.shape, p, x)


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

    def forward(self, x: torch.Tensor, speaker_emb: torch.Tensor | None, layout: Layout) -> torch.Tensor:
        if speaker_emb is None:  # a model without speaker embedding (speaker_embedding=False)
            return x + layout.positional(self.pe)
        return x + layout.positional(self.pe) + speaker_emb


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
        # The authors' order of random draws (docs/METHOD.md §5, Initialisation): xavier for q/k/v
        # (weights first, then zero biases), and only THEN the output projection, which keeps
        # PyTorch's default initialisation.
        for linear in (self.proj_q, self.proj_k, self.proj_v):
            nn.init.xavier_uniform_(linear.weight)
        for linear in (self.proj_q, self.proj_k, self.proj_v):
            nn.init.zeros_(linear.bias)
        self.fc = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.n_head, self.d_head).transpose(1, 2)

    def forward(self, key_value: torch.Tensor, query: torch.Tensor, layout: Layout) -> torch.Tensor:
        """Projections on the layout's rows; scores and softmax on the (batch, length) grid."""
        q = self._heads(layout.grid(self.proj_q(query))) / math.sqrt(self.d_head)
        k = self._heads(layout.grid(self.proj_k(key_value)))
        v = self._heads(layout.grid(self.proj_v(key_value)))
        scores = q @ k.transpose(-2, -1)  # (batch, head, query, key)
        # Mask padded KEYS (the Nov-2025 fix; the May-2025 release masked the wrong axis, docs/METHOD.md §7).
        scores = scores.masked_fill(layout.key_padding[:, None, None, :], MASK_VALUE)
        attn = dropout(torch.softmax(scores, dim=-1), self.dropout.p, self.training)
        context = (attn @ v).transpose(1, 2)
        return self.fc(layout.rows(context.reshape(*context.shape[:2], -1)))


class FeedForward(nn.Module):
    """Pre-norm feed-forward with residual: ``x + drop(W2(drop(GELU(W1(LN(x))))))``."""

    def __init__(self, hidden: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.w_1 = nn.Linear(hidden, d_ff)
        self.w_2 = nn.Linear(d_ff, hidden)
        self.layer_norm = nn.LayerNorm(hidden, eps=1e-6)
        self.dropout_1 = nn.Dropout(dropout)
        self.dropout_2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        inner = layout.dropout(F.gelu(self.w_1(self.layer_norm(x))), self.dropout_1.p, self.training)
        return x + layout.dropout(self.w_2(inner), self.dropout_2.p, self.training)


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

    def forward(self, x: torch.Tensor, y: torch.Tensor, layout: Layout, cross: bool, first: bool) -> torch.Tensor:
        if not first:
            y = self.layer_norm(y)
        context = self.self_attn(x if cross else y, y, layout)
        return self.feed_forward(layout.dropout(context, self.dropout.p, self.training) + y, layout)


class TransformerBlock(nn.Module):
    """Block ``X -> Y``: stream Y attends to stream X (self block when ``cross`` is False: X is Y)."""

    def __init__(self, hidden: int, n_head: int, dropout: float, n_layers: int = 1) -> None:
        super().__init__()
        self.pos_emb = PositionalEncoding(hidden)
        self.transformer_inter = nn.ModuleList(
            TransformerLayer(hidden, n_head, hidden, dropout) for _ in range(n_layers)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, y: torch.Tensor, layout: Layout, speaker_emb: torch.Tensor | None,
                cross: bool) -> torch.Tensor:
        """Returns the new Y (in ``layout``)."""
        if cross:
            # Cross block: both streams get position + speaker embedding, then dropout.
            x = layout.dropout(self.pos_emb(x, speaker_emb, layout), self.dropout.p, self.training)
            y = layout.dropout(self.pos_emb(y, speaker_emb, layout), self.dropout.p, self.training)
        else:
            # Self block: position + speaker embedding only (docs/METHOD.md §5).
            y = self.pos_emb(y, speaker_emb, layout)
            x = y
        for i, layer in enumerate(self.transformer_inter):
            y = layer(x, y, layout, cross, first=i == 0)
        return y


class Gate(nn.Module):
    """``g(x) = sigmoid(ReLU(W x + b)) * x``."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(F.relu(self.fc(x))) * x


class FusionOutput(NamedTuple):
    """The model's outputs in the batch's layout: rows (N, ...) when packed, else (batch, length, ...).

    ``t_logits`` / ``t_feat`` always hold the PREDICTING anchor (:attr:`AnchorGatedTransformer.predictor`):
    the text anchor T' when the model has T, else the audio anchor A' (A+V, A), else V' (V alone), or the
    concat baseline's output. ``a_*`` / ``v_*`` hold the other anchors, the ones distilled towards the
    prediction; they are None when the modality is absent, or when its anchor is the predicting one (it is
    then in ``t_*``, and an objective that sums over the non-None fields counts it once).
    docs/METHOD.md §5, "Ablation variants".
    """
    t_logits: torch.Tensor  # the prediction (N, classes)
    a_logits: torch.Tensor | None
    v_logits: torch.Tensor | None
    t_feat: torch.Tensor  # T' (N, hidden), or the predicting anchor's features
    a_feat: torch.Tensor | None  # A'
    v_feat: torch.Tensor | None  # V'


MODALITIES = ("T", "A", "V")  # the streams, in the order of forward's arguments
FUSIONS = ("anchor", "concat")
# The nine blocks in the authors' order of construction (docs/METHOD.md §5, Initialisation).
BUILD_ORDER = TEXT_ANCHOR + AUDIO_ANCHOR + VIDEO_ANCHOR
CONCAT_MODALITIES = "concat_modalities"  # buffer of the concat baseline: which of T, A, V it reads


def _canonical_modalities(modalities: Sequence[str]) -> tuple[str, ...]:
    """``modalities`` (e.g. ``("T", "A")``, ``"TA"``, any case) as a tuple in T, A, V order; errors name them."""
    given = [str(m).upper() for m in modalities]
    unknown = sorted(set(given) - set(MODALITIES))
    if unknown or not given or len(set(given)) != len(given):
        raise ValueError(f"modalities must be a non-empty subset of T, A, V without repeats, got {list(modalities)!r}")
    return tuple(m for m in MODALITIES if m in given)


def variant_name(variant: Mapping[str, object]) -> str:
    """A short readable name of a :attr:`AnchorGatedTransformer.variant`, e.g. ``anchor T+A+V, gates, speaker
    embedding`` (used in the checkpoint errors)."""
    parts = [f"{variant['fusion']} {'+'.join(variant['modalities'])}"]
    if variant["fusion"] == "anchor":
        parts.append("gates" if variant["gates"] else "no gates")
    parts.append("speaker embedding" if variant["speaker_embedding"] else "no speaker embedding")
    return ", ".join(parts)


class AnchorGatedTransformer(nn.Module):
    """The second-stage model: audio, video and text anchors over utterance features (docs/METHOD.md §5).

    The keyword arguments select an ablation variant (docs/METHOD.md §5, "Ablation variants"); their
    defaults are the paper's model, parameter for parameter and draw for draw:

    - ``modalities``: the streams the model reads, any non-empty subset of ``T``, ``A``, ``V``. The model
      keeps exactly the full model's blocks, gates, reductions and heads whose streams are all present
      (T+A: ``a_a t_a`` -> A', ``t_t`` (+ ``a_t``) -> T'; a single modality X: its self block ``x_x``, gate
      and head ``w_x``, no reduction). The text anchor predicts when T is present, else the audio anchor
      (A+V, A), else the video anchor (V); the prediction is always ``FusionOutput.t_logits``. The inputs
      of absent modalities are never read (pass anything, e.g. None).
    - ``gates``: False replaces every gate by the identity, ``g(x) = x`` (no ``*_gate`` parameters): each
      block's output enters the concatenation before ``R_x`` (or the head) unscaled.
    - ``speaker_embedding``: False adds no speaker embedding (``E(X) = X + PE``, no ``speaker_embeddings``);
      ``speakers`` is then not read and ``n_speaker`` may be None.
    - ``fusion``: ``"concat"`` is the baseline without anchors: the present streams concatenated per
      utterance, ``concat_reduce = Linear(kH, H)``, one self block ``concat`` (positions + speaker
      embedding as the text stream's), the head ``w_concat``; no gates (its variant reports
      ``gates: False`` whatever ``gates`` says).
    """

    def __init__(self, hidden: int, n_classes: int, n_speaker: int | None, n_head: int = 8, dropout: float = 0.5,
                 separate_text_blocks: bool = False, *, modalities: Sequence[str] = MODALITIES, gates: bool = True,
                 speaker_embedding: bool = True, fusion: str = "anchor") -> None:
        super().__init__()
        modalities = _canonical_modalities(modalities)
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
        if speaker_embedding and n_speaker is None:
            raise ValueError("n_speaker is needed for the speaker embedding (speaker_embedding=True)")
        if fusion == "concat" and separate_text_blocks:
            raise ValueError("separate_text_blocks applies to the anchor fusion only, not to fusion='concat'")
        self.hidden, self.n_classes, self.n_speaker = hidden, n_classes, n_speaker
        self.separate_text_blocks = separate_text_blocks
        self.modalities, self.fusion = modalities, fusion
        self.gates = bool(gates) and fusion == "anchor"
        self.speaker_embedding = bool(speaker_embedding)
        present = {m.lower() for m in modalities}
        self._present = present
        # The predicting anchor: text if present, else audio, else video (docs/METHOD.md §5, Ablation variants).
        self._predictor = next(m for m in "tav" if m in present)
        if fusion == "concat":
            self._build_concat(n_head, dropout)
            return

        # Modules are BUILT in the authors' constructor order, so that right after
        # torch.manual_seed(seed) they make the same random draws and get the same
        # initial weights (docs/METHOD.md §5, Initialisation): speaker table (default
        # normal, then normal(0, 0.1)), the nine blocks t_t a_t v_t a_a t_a v_a v_v t_v
        # a_v, the nine gates in that order, features_reduce_t/a/v, the top-level fc
        # (never used by the forward), w_t/a/v. Blocks the model does not use are drawn
        # and discarded. They are then REGISTERED in our order (unchanged state_dict).
        # Row n_speaker is the padding row (the authors used id 2, a real speaker on
        # MELD); the table has the authors' shape (n_speaker + 1 rows), so the draws agree.
        # A variant makes the same draws in the same order, leaving out the modules it has not.
        if self.speaker_embedding:
            speaker_embeddings = nn.Embedding(n_speaker + 1, hidden, padding_idx=n_speaker)
            nn.init.normal_(speaker_embeddings.weight, mean=0.0, std=0.1)
        names = [name for name in BUILD_ORDER if name[0] in present and name[2] in present]
        blocks = {name: TransformerBlock(hidden, n_head, dropout) for name in names}
        gate_modules = {name: Gate(hidden) for name in names} if self.gates else {}
        # Each anchor concatenates one path per present modality; a single path is not reduced.
        paths = len(present)
        reduce = {m: nn.Linear(paths * hidden, hidden) for m in "tav" if m in present and paths > 1}
        if paths == 3:
            nn.Linear(3 * hidden, hidden)  # the authors' unused top-level fc: drawn, discarded
        heads = {modality: nn.Linear(hidden, n_classes) for modality in "tav" if modality in present}

        if self.speaker_embedding:
            self.speaker_embeddings = speaker_embeddings
        registered = AUDIO_ANCHOR + VIDEO_ANCHOR + (TEXT_ANCHOR if separate_text_blocks else TEXT_ANCHOR[:1])
        for name in registered:
            if name in blocks:
                self.add_module(name, blocks[name])
                if self.gates:
                    self.add_module(f"{name}_gate", gate_modules[name])
        for modality in reduce:
            self.add_module(f"features_reduce_{modality}", reduce[modality])
        for modality in heads:
            self.add_module(f"w_{modality}", heads[modality])

    def _build_concat(self, n_head: int, dropout: float) -> None:
        """The concat baseline's modules, built in the anchor model's order (speaker table, block, reduction,
        head); the buffer :data:`CONCAT_MODALITIES` records which streams it reads, for its checkpoints."""
        hidden = self.hidden
        if self.speaker_embedding:
            speaker_embeddings = nn.Embedding(self.n_speaker + 1, hidden, padding_idx=self.n_speaker)
            nn.init.normal_(speaker_embeddings.weight, mean=0.0, std=0.1)
            self.speaker_embeddings = speaker_embeddings
        self.concat = TransformerBlock(hidden, n_head, dropout)
        self.concat_reduce = nn.Linear(len(self.modalities) * hidden, hidden)
        self.w_concat = nn.Linear(hidden, self.n_classes)
        self.register_buffer(CONCAT_MODALITIES, torch.tensor([m in self.modalities for m in MODALITIES]))

    @property
    def padding_speaker(self) -> int:
        return self.n_speaker if self.n_speaker is not None else 0

    @property
    def predictor(self) -> str:
        """Whose logits are ``t_logits``: ``"T"``, ``"A"`` or ``"V"`` (the predicting anchor), or ``"concat"``."""
        return "concat" if self.fusion == "concat" else self._predictor.upper()

    @property
    def variant(self) -> dict[str, object]:
        """The variant as a plain dict, the constructor's keyword arguments:
        ``{"modalities": ["T", "A", "V"], "gates": True, "speaker_embedding": True, "fusion": "anchor"}``."""
        return {"modalities": list(self.modalities), "gates": self.gates,
                "speaker_embedding": self.speaker_embedding, "fusion": self.fusion}

    def _path(self, name: str, x: torch.Tensor, y: torch.Tensor, layout: Layout, spk: torch.Tensor | None,
              cross: bool) -> torch.Tensor:
        # Reference behaviour: all text-anchor paths use the t_t block and gate.
        if name in TEXT_ANCHOR and not self.separate_text_blocks:
            name = "t_t"
        out = getattr(self, name)(x, y, layout, spk, cross=cross)
        return getattr(self, f"{name}_gate")(out) if self.gates else out  # gates=False: g(x) = x

    def _anchor(self, modality: str, names: Sequence[str], sources: Mapping[str, torch.Tensor],
                query: torch.Tensor, layout: Layout, spk: torch.Tensor | None) -> torch.Tensor:
        """One anchor: the paths ``names`` whose key/value stream is present, concatenated and reduced."""
        paths = [self._path(name, sources[name[0]], query, layout, spk, cross=name[0] != modality)
                 for name in names if name[0] in self._present]
        if len(paths) == 1:
            return paths[0]
        return getattr(self, f"features_reduce_{modality}")(torch.cat(paths, dim=-1))

    def forward(self, text: torch.Tensor | None, audio: torch.Tensor | None, video: torch.Tensor | None,
                speakers: torch.Tensor | None, mask: torch.Tensor, index: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> FusionOutput:
        """``mask`` (batch, length) True = real utterance. With ``index``/``positions`` (see
        :class:`Layout`) the streams are packed rows (N, hidden) and ``speakers`` (N,), and so are the
        outputs; without, they are padded (batch, length, hidden) / (batch, length), padded speakers
        = :attr:`padding_speaker`. The streams of absent modalities (and ``speakers`` without speaker
        embedding) are never read."""
        layout = Layout(mask, index, positions)
        spk = self.speaker_embeddings(speakers) if self.speaker_embedding else None
        raw = {modality: stream for modality, stream in zip("tav", (text, audio, video)) if modality in self._present}
        if self.fusion == "concat":
            fused = self.concat_reduce(torch.cat([raw[m] for m in "tav" if m in raw], dim=-1))
            feat = self.concat(fused, fused, layout, spk, cross=False)
            return FusionOutput(self.w_concat(feat), None, None, feat, None, None)

        feats = {}
        if "a" in raw:
            feats["a"] = self._anchor("a", AUDIO_ANCHOR, raw, raw["a"], layout, spk)
        if "v" in raw:
            feats["v"] = self._anchor("v", VIDEO_ANCHOR, raw, raw["v"], layout, spk)
        if "t" in raw:
            # The text anchor attends to the fused A' and V', not to the raw streams.
            feats["t"] = self._anchor("t", TEXT_ANCHOR, {"t": raw["t"], **feats}, raw["t"], layout, spk)
        logits = {m: getattr(self, f"w_{m}")(feats[m]) for m in "tav" if m in feats}
        pred = self._predictor

        def other(modality: str, values: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
            return values[modality] if modality in values and modality != pred else None

        return FusionOutput(logits[pred], other("a", logits), other("v", logits),
                            feats[pred], other("a", feats), other("v", feats))


# --------------------------------------------------------------------------- checkpoints

def check_fusion_record(save_dir: Path, dataset: str, checkpoint: Path) -> dict[str, Any] | None:
    """The fusion's metrics JSON (its completion record) must say complete and name ``dataset``;
    a checkpoint without one (the authors') is accepted."""
    producer = f"{dataset}/{FUSION}.py"
    record = StageFiles.fusion(save_dir).metrics
    doc = check_complete(record, f"the fusion checkpoint {checkpoint}", producer)
    if doc is not None and doc.get("dataset") not in (None, dataset):
        raise CheckpointError(
            f"fusion checkpoint {checkpoint} was trained on {doc['dataset']} features "
            f"({record}) but this is {producer}: pass the --save_dir of a {dataset} run"
        )
    return doc


# --- the fusion's checkpoints

_REFERENCE_ONLY = ("fc.",)  # the reference's top-level fc, never used in its forward
_UNUSED_WHEN_SHARING = ("a_t.", "v_t.", "a_t_gate.", "v_t_gate.")
_SELF_BLOCKS = {"T": "t_t.", "A": "a_a.", "V": "v_v."}  # an anchor model has X's self block iff it reads X


def variant_from_checkpoint(state: Mapping[str, torch.Tensor]) -> dict[str, object]:
    """The variant (:attr:`AnchorGatedTransformer.variant`) a fusion checkpoint was trained as.

    Read from the names: the concat baseline holds :data:`CONCAT_MODALITIES` (which streams it read);
    an anchor model holds the self block ``x_x`` of each modality X it reads; gates show as
    ``*_gate.fc.weight``, the speaker embedding as ``speaker_embeddings.weight``. The authors'
    checkpoints are ``anchor T+A+V`` with gates and speaker embedding.
    """
    if CONCAT_MODALITIES in state:
        flags = [bool(f) for f in state[CONCAT_MODALITIES].tolist()]
        modalities, fusion = [m for m, on in zip(MODALITIES, flags) if on], "concat"
    else:
        modalities = [m for m, prefix in _SELF_BLOCKS.items() if any(k.startswith(prefix) for k in state)]
        fusion = "anchor"
    if not modalities:
        raise FusionCheckpointError("checkpoint has none of the blocks t_t, a_a, v_v and no "
                                    f"{CONCAT_MODALITIES!r}: not a multimodal fusion checkpoint")
    return {"modalities": modalities,
            "gates": fusion == "anchor" and any(k.endswith("_gate.fc.weight") for k in state),
            "speaker_embedding": "speaker_embeddings.weight" in state, "fusion": fusion}


def infer_sizes_from_checkpoint(state: Mapping[str, torch.Tensor], with_variant: bool = False
                                ) -> dict[str, object]:
    """Sizes a checkpoint fixes: ``n_speaker``, ``hidden``, ``n_classes``, ``separate_text_blocks``;
    with ``with_variant`` also ``"variant"``: :func:`variant_from_checkpoint`, so that
    ``AnchorGatedTransformer(hidden, n_classes, n_speaker, n_head, dropout, separate_text_blocks,
    **sizes["variant"])`` rebuilds the model of any variant.

    ``n_head`` does not show in any shape and must come from the command line.
    ``separate_text_blocks`` is True only for our checkpoints trained with
    separate text blocks (``a_t``/``v_t`` weights without the reference's ``fc``).
    ``n_speaker`` is None for a model without speaker embedding. ``n_classes`` (and
    ``hidden`` without a speaker table) come from the predicting head (``w_t``,
    else ``w_a``, ``w_v``; ``w_concat`` for the concat baseline).
    """
    variant = variant_from_checkpoint(state)
    head = "w_concat" if variant["fusion"] == "concat" else f"w_{variant['modalities'][0].lower()}"
    for key in (("speaker_embeddings.weight",) if variant["speaker_embedding"] else ()) + (f"{head}.weight",):
        if key not in state:
            raise FusionCheckpointError(f"checkpoint has no {key!r}: not a multimodal fusion checkpoint")
    n_classes, hidden = state[f"{head}.weight"].shape
    n_speaker = None
    if variant["speaker_embedding"]:
        rows, hidden = state["speaker_embeddings.weight"].shape
        n_speaker = int(rows) - 1
    has_text_blocks = any(k.startswith(("a_t.", "v_t.")) for k in state)
    is_reference = any(k.startswith(_REFERENCE_ONLY) for k in state)
    sizes: dict[str, object] = {
        "n_speaker": n_speaker,
        "hidden": int(hidden),
        "n_classes": int(n_classes),
        "separate_text_blocks": bool(has_text_blocks and not is_reference),
    }
    if with_variant:
        sizes["variant"] = variant
    return sizes


def fusion_sizes_for(spec: DatasetSpec, path: str | Path, speaker2id: Mapping[str, int] | None = None,
                     with_variant: bool = False) -> dict[str, object]:
    """:func:`infer_sizes_from_checkpoint` of the checkpoint at ``path``, checked against the dataset.

    The class count must be the dataset's, and the speaker embedding (when the
    model has one) must have a row for every speaker id the dataset uses (MELD:
    every id of ``speaker2id``; IEMOCAP: ``spec.n_speaker``), so a checkpoint
    trained for the other dataset is refused with an error naming it.
    """
    sizes = infer_sizes_from_checkpoint(read_fusion_state(path), with_variant)
    needed = max(speaker2id.values()) + 1 if spec.global_speaker_ids and speaker2id else spec.n_speaker
    problems = []
    if sizes["n_classes"] != spec.num_classes:
        problems.append(f"{sizes['n_classes']} classes, {spec.name} has {spec.num_classes} ({', '.join(spec.labels)})")
    if sizes["n_speaker"] is not None and sizes["n_speaker"] < needed:
        problems.append(f"{sizes['n_speaker']} speaker rows (+ padding), {spec.name} needs {needed}")
    if problems:
        raise FusionCheckpointError(f"fusion checkpoint {path} was not trained for {spec.name}: it has "
                                    f"{'; '.join(problems)}")
    return sizes


def read_fusion_state(path: str | Path) -> dict[str, torch.Tensor]:
    """``torch.load`` a plain state_dict (tensors only) from ``path``."""
    try:
        return read_state_dict(path, "multimodal_fusion.py --train True")
    except CheckpointError as err:
        raise FusionCheckpointError(f"fusion {err}") from err


def load_fusion_checkpoint(model: AnchorGatedTransformer, path: str | Path) -> AnchorGatedTransformer:
    """Load our checkpoint or the reference's into ``model``; errors name the file and the keys.

    A checkpoint of another variant (:func:`variant_from_checkpoint`) is refused with
    an error naming both variants. The reference's never-used entries (``fc.*``, and
    ``a_t``/``v_t`` blocks and gates when the model shares the text block as the
    reference does) are dropped with one log line. Anything else missing, unexpected
    or of another shape is an error (docs/METHOD.md §6).
    """
    path = Path(path)
    state = read_fusion_state(path)
    try:
        found = variant_from_checkpoint(state)
    except FusionCheckpointError:
        found = None  # no fusion blocks at all: the key listing below names what is wrong
    if found is not None and found != model.variant:
        raise FusionCheckpointError(
            f"fusion checkpoint {path} is the variant {variant_name(found)} ({found}) but the model is the "
            f"variant {variant_name(model.variant)} ({model.variant}); build the model with "
            f"{', '.join(f'{k}={v!r}' for k, v in found.items())} (infer_sizes_from_checkpoint(..., "
            f"with_variant=True) reads them)")
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


def fusion_width(hidden_dim: int | None, n_head: int, width: int, source: str) -> int:
    """The features' width, checked against ``--hidden_dim`` and ``--n_head``; errors name ``source``."""
    if hidden_dim is not None and hidden_dim != width:
        raise UserError(f"--hidden_dim {hidden_dim} does not match the width {width} of {source}")
    if width % n_head:
        raise UserError(f"--n_head {n_head} does not divide the feature width {width} ({source})")
    return width
