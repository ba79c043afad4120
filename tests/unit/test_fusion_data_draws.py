"""The fusion's batches consume random numbers as the authors' DataLoaders do (`magtkd.fusion_data`;
docs/METHOD.md §5, "The authors' run, draw for draw"): checked against torch's own DataLoader."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from helpers import C, H, N_SPK
from magtkd.fusion_data import DialogueBatches, DialogueSet
from magtkd.model import AnchorGatedTransformer

N_TRAIN, N_DEV, N_TEST, BATCH = 11, 3, 5, 4


def numbered(n: int, offset: int = 0) -> DialogueSet:
    """``n`` one-utterance dialogues whose label is their index (+ ``offset``): batches show their order."""
    return DialogueSet(path=None, vids=list(range(n)), text=[torch.randn(1, H) for _ in range(n)],
                       audio=[torch.randn(1, H) for _ in range(n)], video=[torch.randn(1, H) for _ in range(n)],
                       speakers=[torch.zeros(1, dtype=torch.long) for _ in range(n)],
                       labels=[torch.tensor([(offset + i) % C]) for i in range(n)])


def authors_epochs(epochs: int) -> tuple[list[list[int]], torch.Tensor]:
    """The authors' loop with torch's DataLoader: per epoch the shuffled training batches, then a pass over
    the unshuffled dev and test loaders; returns the batches and the generator's next draws."""
    train = DataLoader(list(range(N_TRAIN)), batch_size=BATCH, shuffle=True)
    dev = DataLoader(list(range(N_DEV)), batch_size=BATCH, shuffle=False)
    test = DataLoader(list(range(N_TEST)), batch_size=BATCH, shuffle=False)
    order = []
    for _ in range(epochs):
        order += [batch.tolist() for batch in train]
        torch.rand(3)  # a training step's dropout, between the shuffle and the evaluations
        for loader in (dev, test):
            list(loader)
    return order, torch.rand(4)


def test_an_epoch_draws_as_the_authors_dataloaders(one_thread):
    torch.manual_seed(2024)
    expected_order, expected_next = authors_epochs(3)
    model = AnchorGatedTransformer(H, C, N_SPK, n_head=2)
    data = DialogueBatches({"train": numbered(N_TRAIN), "dev": numbered(N_DEV), "test": numbered(N_TEST)}, BATCH)
    torch.manual_seed(2024)
    data.prepare(model, lambda out, target: out.t_logits.sum(), 2024)
    order = []
    for epoch in range(1, 4):
        order += [batch.rows(batch.labels).tolist() for batch in data.micro_batches(epoch)]
        torch.rand(3)
        for split in ("dev", "test"):
            data.evaluate(model, split)
    assert order == [[i % C for i in batch] for batch in expected_order]
    assert torch.equal(torch.rand(4), expected_next)
    assert data.generators() == []  # the global generator is all there is to save for --resume


def test_evaluating_a_saved_checkpoint_draws_nothing(one_thread):
    model = AnchorGatedTransformer(H, C, N_SPK, n_head=2)
    data = DialogueBatches({"test": numbered(N_TEST)}, BATCH)
    torch.manual_seed(1)
    expected = torch.rand(2)
    torch.manual_seed(1)
    data.evaluate(model, "test")
    assert torch.equal(torch.rand(2), expected)


def test_the_may_2025_attention_always_gets_the_padded_grid(one_thread):
    model = AnchorGatedTransformer(H, C, N_SPK, n_head=2, paper_attention=True)
    data = DialogueBatches({"train": numbered(N_TRAIN), "dev": numbered(N_DEV), "test": numbered(N_TEST)}, BATCH,
                           packed=True)
    data.prepare(model, lambda out, target: out.t_logits.sum(), 0)
    assert all(batch.index is None for batch in data.micro_batches(1))
    out = data.evaluate(model, "test")
    labels, preds = out.labels, out.preds
    assert labels.tolist() == [i % C for i in range(N_TEST)] and len(preds) == N_TEST
