"""Packed rows (`magtkd.packing`; docs/METHOD.md §5, Speed): dropout draws F.dropout's masks, and a
packed training step equals the padded one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import C, H, N_SPK, random_dialogues
from magtkd.model import AnchorGatedTransformer
from magtkd.packing import dropout, Layout

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only cost (conftest.py)


def test_packed_training_step_equals_the_padded_one():
    """The same seed gives the same dropout masks and outputs in both layouts (bit for bit on CPU),
    and gradients equal up to float summation order (docs/METHOD.md §5, Speed)."""
    torch.manual_seed(1)
    model = AnchorGatedTransformer(H, C, N_SPK, n_head=2, dropout=0.5).train()
    data = random_dialogues([3, 7, 1, 12, 5], N_SPK)
    results = {}
    for packed in (False, True):
        batch = data.collate([0, 1, 2, 3, 4], model.padding_speaker, packed)
        torch.manual_seed(5)
        rows = [batch.rows(o) for o in model(*batch.inputs)]
        model.zero_grad()
        (F.cross_entropy(rows[0], batch.rows(batch.labels)) + sum(r.pow(2).mean() for r in rows[1:])).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[packed] = rows, grads, torch.rand(3)
    for a, b in zip(results[False][0], results[True][0]):
        assert torch.equal(a, b)
    assert results[False][1].keys() == results[True][1].keys()
    for name, grad in results[False][1].items():
        assert torch.allclose(grad, results[True][1][name], rtol=1e-5, atol=1e-7), name
    assert torch.equal(results[False][2], results[True][2])  # the generator advanced alike


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("small", [True, False])
def test_dropout_draws_f_dropout_s_mask(p, small):
    x = torch.randn(4, 3, 5, 7) if small else torch.randn(64, 32, 40)
    torch.manual_seed(3)
    expected, after = F.dropout(x, p, True), torch.rand(2)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, p, True), expected) and torch.equal(torch.rand(2), after)
    assert torch.equal(dropout(x, p, False), x)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_packed_dropout_keeps_the_units_f_dropout_keeps(p):
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    layout = Layout(mask, mask.flatten().nonzero().squeeze(1), None)
    x = torch.randn(3, 3, 16)
    torch.manual_seed(3)
    expected = F.dropout(x, p, True)[mask]
    torch.manual_seed(3)
    assert torch.equal(layout.dropout(x[mask], p, True), expected)
