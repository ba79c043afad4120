"""Where the utterances of a fusion batch sit: packed rows of the real utterances or the authors' padded
grid, and dropout drawn over the grid in both layouts, so a seed gives the same masks (docs/METHOD.md §5,
"Speed").
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch
import torch.nn.functional as F


SMALL_DROPOUT = 65536  # values below which one F.dropout call costs less than drawing the mask ourselves


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

    def dropout(self, x: torch.Tensor, p: float, training: bool, seq_first: bool = False) -> torch.Tensor:
        """:func:`dropout` of the padded stream, applied to this layout's rows: packed rows get the
        rows of a mask drawn over the whole grid, with the same generator calls, so the same units
        are kept as in the padded model (bit for bit on CPU, which the tests check).

        ``seq_first``: the mask is drawn over the (length, batch, ...) grid, i.e. in the memory order
        of the authors' sequence-first streams (their loader pads the features sequence-first and the
        model transposes them, so F.dropout fills the mask of a raw stream in that order; docs/METHOD.md
        §5, "The authors' run, draw for draw")."""
        if not training or p == 0 or p >= 1:
            return dropout(x, p, training)
        if not self.packed:
            if not seq_first:
                return dropout(x, p, training)
            return dropout(x.transpose(0, 1).contiguous(), p, training).transpose(0, 1)
        batch, length = self.mask.shape
        if seq_first:
            return x * _dropout_noise((length, batch, *x.shape[1:]), p, x, lambda u: self.rows(u.transpose(0, 1)))
        return x * _dropout_noise((batch, length, *x.shape[1:]), p, x, self.rows)


def _dropout_noise(shape: Sequence[int], p: float, like: torch.Tensor,
                   select: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The tensor ``F.dropout`` multiplies a ``shape`` input by (0 or ``1 / (1 - p)``), drawn with
    its generator calls; ``select`` (e.g. :meth:`Layout.rows`) keeps part of it, decided only there.

    On CPU ``F.dropout`` fills its mask with ``bernoulli_(1 - p)``, which draws one
    float64 uniform per element and keeps it when below ``1 - p``, then divides by
    ``1 - p``; ``torch.rand(..., float64) < 1 - p`` makes the same draws about three
    times faster (where this build's ``bernoulli_`` does so, `uniform_draws`; else
    ``F.dropout`` of ones). Elsewhere ``native_dropout`` of ones draws ``F.dropout``'s mask.
    """
    if like.device.type == "cpu" and uniform_draws():
        uniforms = torch.rand(shape, dtype=torch.float64)
        if select is not None:  # every draw is made; only the selected ones are compared and scaled
            uniforms = select(uniforms)
        return (uniforms < 1 - p).to(like.dtype).div_(1 - p)
    ones = like.new_ones(shape)
    noise = F.dropout(ones, p, True) if like.device.type == "cpu" else torch.native_dropout(ones, p, True)[0]
    return noise if select is None else select(noise)


@functools.lru_cache(maxsize=None)
def uniform_draws() -> bool:
    """Whether this build's CPU ``F.dropout`` draws one float64 uniform per element, as `_dropout_noise`
    assumes (checked once on 4096 values, the global generator's state restored): the masks of the faster
    draw are then ``F.dropout``'s bit for bit, which the authors' run depends on (docs/METHOD.md §5)."""
    state = torch.get_rng_state()
    try:
        expected = F.dropout(torch.ones(4096), 0.5, True)
        torch.set_rng_state(state)
        return torch.equal(expected, (torch.rand(4096, dtype=torch.float64) < 0.5).float().div_(0.5))
    finally:
        torch.set_rng_state(state)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout``, with its CPU mask drawn faster (:func:`_dropout_noise`): the same tensor, bit for
    bit. Small tensors, where one call costs less, strided ones and other devices run ``F.dropout``."""
    if (not training or p == 0 or p >= 1 or x.device.type != "cpu" or not x.is_contiguous()
            or x.numel() < SMALL_DROPOUT):
        return F.dropout(x, p, training)
    return x * _dropout_noise(x.shape, p, x)
