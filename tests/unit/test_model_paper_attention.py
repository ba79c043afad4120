"""The fusion model as the authors' releases compute it (`magtkd.model`, `magtkd.packing`; docs/METHOD.md §5, §7):
the May-2025 attention, the authors' padding row, their dropout masks of the sequence-first input streams and
their order of gradient clipping."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import C, H, N_SPK, dialogue_t_logits, random_dialogues
from magtkd.fusion_blocks import MASK_VALUE, paper_attention_weights
from magtkd.model import AUTHORS_PADDING_ROW, AnchorGatedTransformer
from magtkd.packing import Layout


def layout(lengths: list[int], packed: bool = False) -> Layout:
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.bool)
    for row, n in enumerate(lengths):
        mask[row, :n] = True
    if not packed:
        return Layout(mask)
    return Layout(mask, mask.flatten().nonzero().squeeze(1), torch.cat([torch.arange(n) for n in lengths]))


def test_paper_attention_scores_every_real_key_zero_and_padded_keys_relu():
    """The May-2025 release: ``masked_fill(mask == 0, -1e9)`` with a mask True on padding fills the REAL keys,
    then ReLU: real keys score exactly 0, padded keys ``relu(score)``, then the softmax."""
    grid = layout([2, 4, 3])
    scores = torch.randn(3, 2, 4, 4) * 3
    expected = torch.softmax(torch.where(grid.mask[:, None, None, :], torch.zeros(()), F.relu(scores)), dim=-1)
    assert torch.equal(paper_attention_weights(scores, grid), expected)
    # A dialogue without padding attends uniformly: every key scores 0 whatever the content
    assert torch.equal(paper_attention_weights(scores, grid)[1], torch.full((2, 4, 4), 0.25))
    # The fixed attention of the Nov-2025 release never looks at a padded key
    fixed = torch.softmax(scores.masked_fill(~grid.mask[:, None, None, :], MASK_VALUE), dim=-1)
    assert torch.all(fixed[0, ..., 2:] == 0) and not torch.all(paper_attention_weights(scores, grid)[0, ..., 2:] == 0)


def test_paper_attention_needs_the_padded_grid():
    with pytest.raises(ValueError, match="padded grid"):
        paper_attention_weights(torch.zeros(2, 1, 3, 3), layout([3, 1], packed=True))


def test_paper_attention_changes_the_predictions_of_the_same_weights():
    """Same weights (the flag draws nothing), other outputs: padded keys enter the real utterances' context."""
    data = random_dialogues([3, 6, 2], N_SPK)
    torch.manual_seed(0)
    fixed = AnchorGatedTransformer(H, C, N_SPK, n_head=2).eval()
    torch.manual_seed(0)
    paper = AnchorGatedTransformer(H, C, N_SPK, n_head=2, paper_attention=True).eval()
    assert all(torch.equal(a, b) for a, b in zip(fixed.state_dict().values(), paper.state_dict().values()))
    a, _ = dialogue_t_logits(fixed, data, [0, 1, 2], packed=False)
    b, _ = dialogue_t_logits(paper, data, [0, 1, 2], packed=False)
    assert not torch.allclose(a[0], b[0], atol=1e-4)


def test_the_authors_padding_row_is_speaker_2_and_draws_the_same_weights():
    torch.manual_seed(4)
    own = AnchorGatedTransformer(H, C, N_SPK, n_head=2)
    torch.manual_seed(4)
    theirs = AnchorGatedTransformer(H, C, N_SPK, n_head=2, padding_row=AUTHORS_PADDING_ROW)
    assert all(torch.equal(a, b) for a, b in zip(own.state_dict().values(), theirs.state_dict().values()))
    assert (own.padding_speaker, theirs.padding_speaker) == (N_SPK, 2)
    assert theirs.speaker_embeddings.padding_idx == 2
    batch = random_dialogues([2, 5], N_SPK).collate([0, 1], theirs.padding_speaker, packed=False)
    assert batch.speakers[0, 2:].tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match="padding_row 2"):
        AnchorGatedTransformer(H, C, 1, n_head=2, padding_row=AUTHORS_PADDING_ROW)


def test_input_streams_draw_their_dropout_masks_sequence_first():
    """The authors' loader pads the features sequence-first and their model transposes them: F.dropout on such
    a stream fills its mask in (length, batch) order. Padded and packed layouts draw it so, bit for bit."""
    grid = layout([3, 5, 2])
    x = torch.randn(5, 3, H).transpose(0, 1)  # (batch, length, H) laid out (length, batch, H), as theirs
    torch.manual_seed(9)
    theirs, after = F.dropout(x, 0.5, True), torch.rand(2)
    contiguous = x.contiguous()
    torch.manual_seed(9)
    assert torch.equal(grid.dropout(contiguous, 0.5, True, seq_first=True), theirs)
    assert torch.equal(torch.rand(2), after)
    torch.manual_seed(9)
    assert not torch.equal(grid.dropout(contiguous, 0.5, True), theirs)  # batch-first draws keep other units
    packed = layout([3, 5, 2], packed=True)
    torch.manual_seed(9)
    assert torch.equal(packed.dropout(contiguous[grid.mask], 0.5, True, seq_first=True), theirs[grid.mask])


def test_padded_batches_are_laid_out_sequence_first():
    """The padded streams are (batch, length, H) views of sequence-first tensors, as the authors' collate_fn
    and transpose make them, so every kernel sees their memory layout."""
    batch = random_dialogues([2, 4], N_SPK).collate([0, 1], N_SPK, packed=False)
    for stream in (batch.text, batch.audio, batch.video):
        assert stream.shape == (2, 4, H) and stream.transpose(0, 1).is_contiguous() and not stream.is_contiguous()


AUTHORS_ORDER = ["speaker_embeddings", "t_t", "a_a", "t_a", "v_a", "v_v", "t_v", "a_v", "t_t_gate", "a_a_gate",
                 "t_a_gate", "v_a_gate", "v_v_gate", "t_v_gate", "a_v_gate", "features_reduce_t", "features_reduce_a",
                 "features_reduce_v", "w_t", "w_a", "w_v"]


def test_clipping_sums_the_gradient_norms_in_the_authors_order():
    """The authors' constructor registers the blocks, then the gates, reductions and heads (our state_dict keeps
    its own order); clip_grad_norm_ sums the per-tensor norms in parameter order, so the model gives it theirs."""
    model = AnchorGatedTransformer(H, C, N_SPK, n_head=2)
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)].split(".")[0] for p in model.clip_order()]
    assert list(dict.fromkeys(order)) == AUTHORS_ORDER
    assert sorted(map(id, model.clip_order())) == sorted(map(id, model.parameters()))
    assert [k.split(".")[0] for k in model.state_dict()][:2] == ["speaker_embeddings", "a_a"]


@pytest.mark.parametrize("uniform", [True, False])
def test_the_faster_masks_are_f_dropouts_on_any_build(monkeypatch, uniform):
    """Where a build's bernoulli_ does not draw one float64 uniform per element, F.dropout itself draws."""
    from magtkd import packing

    assert packing.uniform_draws()  # this build: the faster draw is used
    monkeypatch.setattr(packing, "uniform_draws", lambda: uniform)
    x = torch.randn(64, 32, 40)
    torch.manual_seed(3)
    expected, after = F.dropout(x, 0.5, True), torch.rand(2)
    torch.manual_seed(3)
    assert torch.equal(packing.dropout(x, 0.5, True), expected) and torch.equal(torch.rand(2), after)
    grid, packed = layout([32] * 63 + [31]), layout([32] * 63 + [31], packed=True)
    torch.manual_seed(3)
    expected = F.dropout(x, 0.5, True)[grid.mask]
    torch.manual_seed(3)
    assert torch.equal(packed.dropout(x[grid.mask], 0.5, True), expected)
