"""The fusion's dialogue batches (`magtkd.fusion_data`; docs/METHOD.md §5): packed rows hold the real
utterances in the padded grid's order."""

from __future__ import annotations

import pytest
import torch

from helpers import H, N_SPK, random_dialogues

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only cost (conftest.py)


def test_packed_batch_holds_the_real_utterances_in_the_flattened_order():
    data = random_dialogues([3, 1, 4], N_SPK)
    packed = data.collate([2, 0, 1], N_SPK, packed=True)
    padded = data.collate([2, 0, 1], N_SPK, packed=False)
    assert data.collate([2, 0, 1], N_SPK).index is None  # 3 x 4 x 16 values: too small to gain from packing
    big = random_dialogues([64], N_SPK)
    big.text = big.audio = big.video = [torch.zeros(64, 1024)]
    assert big.collate([0], N_SPK).index is not None  # 64 x 1024 values: packed
    assert packed.text.shape == (8, H) and padded.text.shape == (3, 4, H)
    assert packed.index.tolist() == [0, 1, 2, 3, 4, 5, 6, 8] and packed.positions.tolist() == [0, 1, 2, 3, 0, 1, 2, 0]
    for name in ("text", "audio", "video", "speakers", "labels"):
        assert torch.equal(getattr(packed, name), padded.rows(getattr(padded, name)))
    assert torch.equal(packed.mask, padded.mask)
