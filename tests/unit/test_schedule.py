"""The reference learning-rate schedule at any global batch (`magtkd.schedule`; docs/METHOD.md §2)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from helpers import Curve, schedule_config
from magtkd import schedule


def lr_curve(n_train: int, batch_size: int, world: int, grad_accum: int, epochs: int, **options) -> list[float]:
    """The learning rate of every update of one rank, its updates per epoch counted as `SampleBatches`
    counts them: the rank's DistributedSampler shard in batches (the world size passed in)."""
    data = list(range(n_train))
    sampler = (torch.utils.data.DistributedSampler(data, num_replicas=world, rank=world - 1, shuffle=True)
               if world > 1 else None)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, sampler=sampler)
    updates = -(-len(loader) // grad_accum)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = schedule.reference_schedule(optimizer, Curve(n_train, updates, schedule.GlobalBatch(batch_size, world,
                                                                                                     grad_accum)),
                                            schedule_config(epochs, **options))
    rates = []
    for _ in range(updates * epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("n_train", [149, 150, 1000])
def test_two_processes_of_batch_2_follow_one_process_of_batch_4_step_for_step(n_train: int) -> None:
    one = lr_curve(n_train, 4, 1, 1, 10)
    assert lr_curve(n_train, 2, 2, 1, 10) == one
    assert lr_curve(n_train, 1, 2, 2, 10) == one  # and 2 processes x batch 1 x --grad_accum 2
    assert max(one) < 1.0 or one.index(max(one)) > 0  # warmup from 0, as the authors'
    assert lr_curve(n_train, 4, 2, 1, 10) != one  # a global batch of 8 is another curve


def test_epoch_anchored_schedule_is_the_authors_curve_over_epochs_at_global_batch_16() -> None:
    n, epochs = 1000, 10
    authors = lr_curve(n, 4, 1, 1, epochs)  # 250 updates per epoch
    steps = lr_curve(n, 4, 4, 1, epochs)  # global batch 16, counted in steps: 63 updates per epoch
    anchored = lr_curve(n, 4, 4, 1, epochs, authors_batch=4, epoch_anchored=True)
    per_epoch_authors, per_epoch_ours = 250, 63
    at = lambda rates, per_epoch, e: rates[min(round(e * per_epoch), len(rates) - 1)]  # noqa: E731
    for tenth in range(1, 100):
        e = tenth / 10
        assert at(anchored, per_epoch_ours, e) == pytest.approx(at(authors, per_epoch_authors, e), abs=0.02)
    # The authors' curve peaks after 4 of 10 epochs and ends at 30/36 of the peak; in steps at global batch 16
    # warmup never ends (the peak stays at about 10/16 of the rate set).
    assert max(authors) == pytest.approx(1.0, abs=1e-3) and authors[-1] == pytest.approx(30 / 36, abs=0.01)
    assert max(anchored) == pytest.approx(1.0, abs=0.01) and anchored[-1] == pytest.approx(30 / 36, abs=0.01)
    assert max(steps) == pytest.approx(630 / 1000, abs=0.01)


def test_schedule_is_logged_in_epochs_and_a_foreign_global_batch_names_the_choices(caplog) -> None:
    caplog.set_level(logging.INFO, logger="magtkd")
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule.reference_schedule(optimizer, Curve(1000, 63, schedule.GlobalBatch(4, 4, 1)), schedule_config(10, 4))
    text = caplog.text
    assert "global batch 16 (4 per process x 4 processes x 1 accumulated)" in text
    assert "warmup would end after 15.87 epochs: it never ends in 10" in text
    assert "not the authors' 4" in text and "--batch_size 1 gives their global batch" in text
    assert "--schedule_epochs True" in text
    caplog.clear()
    schedule.reference_schedule(optimizer, Curve(1000, 250, schedule.GlobalBatch(4, 1, 1)), schedule_config(10, 4))
    assert "warmup ends after 4.00 of 10 epochs; peak factor 1.000" in caplog.text and "WARNING" not in caplog.text
    caplog.clear()
    schedule.reference_schedule(optimizer, Curve(100, 5, schedule.GlobalBatch(4, 1, 5)), schedule_config(30, 16))
    assert "no --batch_size gives their global batch with 5 processes x accumulation" in caplog.text
