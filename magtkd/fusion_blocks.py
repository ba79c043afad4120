"""The fusion model's building blocks (docs/METHOD.md §5, "Forward"): the positional and speaker encoding,
multi-head attention over a dialogue's utterances (the Nov-2025 release's masking, or the May-2025 release's,
behind the published figures), the pre-norm transformer layer, the cross/self block and the gate. Torch only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .packing import Layout, dropout

MAX_LEN = 512  # longest dialogue the positional encoding covers

MASK_VALUE = -1e9  # score given to padded keys before the softmax


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

    def __init__(self, hidden: int, n_head: int, dropout: float, paper_attention: bool = False) -> None:
        super().__init__()
        self.paper_attention = paper_attention
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

    def forward(self, key_value: torch.Tensor, query: torch.Tensor, layout: Layout,
                need_weights: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Projections on the layout's rows; scores and softmax on the (batch, length) grid. With
        ``need_weights`` also the attention probabilities (batch, head, query, key)."""
        # q, k, v, then the scaling: the authors' order of operations, in which autograd sums the gradients of
        # a self block's stream (docs/METHOD.md §5, "The authors' run, draw for draw")
        q = self._heads(layout.grid(self.proj_q(query)))
        k = self._heads(layout.grid(self.proj_k(key_value)))
        v = self._heads(layout.grid(self.proj_v(key_value)))
        q = q / math.sqrt(self.d_head)
        scores = q @ k.transpose(-2, -1)  # (batch, head, query, key)
        if self.paper_attention:
            attn = paper_attention_weights(scores, layout)
        else:
            # Mask padded KEYS (the Nov-2025 release's fix, docs/METHOD.md §5, §7).
            attn = torch.softmax(scores.masked_fill(layout.key_padding[:, None, None, :], MASK_VALUE), dim=-1)
        attn = dropout(attn, self.dropout.p, self.training)
        context = (attn @ v).transpose(1, 2)
        out = self.fc(layout.rows(context.reshape(*context.shape[:2], -1)))
        return (out, attn) if need_weights else out


def paper_attention_weights(scores: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The attention of the May-2025 release, behind the published figures (docs/METHOD.md §5, "Attention of
    the May-2025 release"): its mask is True on padding and it fills where the mask is 0, i.e. the REAL keys,
    with -1e9, then applies ReLU before the softmax, so every real key scores 0 and padded keys
    ``relu(score)``. Padded keys then matter: it needs the padded grid (a packed batch has no padded keys)."""
    if layout.packed:
        raise ValueError("the May-2025 release's attention attends to padded keys: compute it on the padded grid "
                         "(packed=False)")
    return torch.softmax(F.relu(scores.masked_fill(layout.mask[:, None, None, :], MASK_VALUE)), dim=-1)


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

    def __init__(self, hidden: int, n_head: int, d_ff: int, dropout: float, paper_attention: bool = False) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(hidden, n_head, dropout, paper_attention)
        self.feed_forward = FeedForward(hidden, d_ff, dropout)
        # Normalises the query stream of layers after the first; with the paper's
        # single layer it exists (and is in the checkpoint) but is never applied.
        self.layer_norm = nn.LayerNorm(hidden, eps=1e-6)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, y: torch.Tensor, layout: Layout, cross: bool, first: bool,
                need_weights: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if not first:
            y = self.layer_norm(y)
        context = self.self_attn(x if cross else y, y, layout, need_weights)
        if need_weights:
            context, weights = context
        out = self.feed_forward(layout.dropout(context, self.dropout.p, self.training) + y, layout)
        return (out, weights) if need_weights else out


class TransformerBlock(nn.Module):
    """Block ``X -> Y``: stream Y attends to stream X (self block when ``cross`` is False: X is Y)."""

    def __init__(self, hidden: int, n_head: int, dropout: float, n_layers: int = 1,
                 paper_attention: bool = False) -> None:
        super().__init__()
        self.pos_emb = PositionalEncoding(hidden)
        self.transformer_inter = nn.ModuleList(
            TransformerLayer(hidden, n_head, hidden, dropout, paper_attention) for _ in range(n_layers)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, y: torch.Tensor, layout: Layout, speaker_emb: torch.Tensor | None,
                cross: bool, x_raw: bool = True, need_weights: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Returns the new Y (in ``layout``); with ``need_weights`` also the last layer's attention
        probabilities (batch, head, query, key). ``x_raw``: X is an input stream (not a fused anchor), which
        the authors' loader hands over sequence-first: its dropout mask is drawn in that order (Y always is one)."""
        if cross:
            # Cross block: both streams get position + speaker embedding, then dropout.
            x = layout.dropout(self.pos_emb(x, speaker_emb, layout), self.dropout.p, self.training, seq_first=x_raw)
            y = layout.dropout(self.pos_emb(y, speaker_emb, layout), self.dropout.p, self.training, seq_first=True)
        else:
            # Self block: position + speaker embedding only (docs/METHOD.md §5).
            y = self.pos_emb(y, speaker_emb, layout)
            x = y
        weights = None
        for i, layer in enumerate(self.transformer_inter):
            y = layer(x, y, layout, cross, first=i == 0, need_weights=need_weights)
            if need_weights:
                y, weights = y
        return (y, weights) if need_weights else y


class Gate(nn.Module):
    """``g(x) = sigmoid(ReLU(W x + b)) * x``."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(hidden, hidden)

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        """``sigmoid(ReLU(W x + b))``, the factor in [1/2, 1) each unit of ``x`` is scaled by."""
        return torch.sigmoid(F.relu(self.fc(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(x) * x
