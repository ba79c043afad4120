"""The reference learning-rate schedule at any global batch (`magtkd.schedule`; docs/METHOD.md §2)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from helpers import Curve, dataset_spec, schedule_config
from magtkd import cli, engine, runtime, schedule


def lr_curve(n_train: int, batch_size: int, world: int, grad_accum: int, epochs: int, **options) -> list[float]:
    """The learning rate of every update of one rank, then the rate after the last one, its updates per
    epoch counted as `SampleBatches` counts them: the rank's DistributedSampler shard in batches (the world
    size passed in)."""
    data = list(range(n_train))
    sampler = (torch.utils.data.DistributedSampler(data, num_replicas=world, rank=world - 1, shuffle=True)
               if world > 1 else None)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, sampler=sampler)
    updates = -(-len(loader) // grad_accum)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = schedule.reference_schedule(optimizer, Curve(n_train, updates, runtime.GlobalBatch(batch_size, world,
                                                                                                     grad_accum)),
                                            schedule_config(epochs, **options))
    rates = []
    for _ in range(updates * epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates + [optimizer.param_groups[0]["lr"]]


def epoch_ends(n_train: int, batch_size: int, world: int, grad_accum: int, epochs: int) -> list[float]:
    """The rate at the end of each epoch (the ``lr`` of the metrics document's epoch rows) by default: the
    authors' curve over epochs (`reference_schedule` with --schedule_epochs True and their batch 4)."""
    rates = lr_curve(n_train, batch_size, world, grad_accum, epochs, authors_batch=4, epoch_anchored=True)
    updates = (len(rates) - 1) // epochs
    return [rates[updates * e] for e in range(1, epochs + 1)]


@pytest.mark.parametrize("n_train", [149, 150, 1000])
def test_by_default_every_global_batch_ends_each_epoch_at_the_authors_rate(n_train: int) -> None:
    """1, 2 and 4 processes of batch 4, --grad_accum 2, and 4 processes of batch 1 (their global batch) end
    every epoch at the rate of the authors' one process of batch 4, to the rounding of one update."""
    authors = epoch_ends(n_train, 4, 1, 1, 10)
    assert authors[3] == pytest.approx(1.0, abs=0.01) and authors[-1] == pytest.approx(30 / 36, abs=0.01)
    assert lr_curve(n_train, 4, 1, 1, 10, authors_batch=4, epoch_anchored=True) == lr_curve(n_train, 4, 1, 1, 10)
    for world, batch, accum in ((2, 4, 1), (4, 4, 1), (1, 4, 2), (4, 1, 1), (2, 2, 1), (2, 4, 2)):
        ends = epoch_ends(n_train, batch, world, accum, 10)
        updates = -(-(-(-n_train // world) // batch) // accum)
        # One update of this run moves the factor by at most 1 / warmup = ceil(n / 4) / (n x updates).
        assert ends == pytest.approx(authors, abs=1.01 * -(-n_train // 4) / (n_train * updates)), (world, batch, accum)


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
    schedule.reference_schedule(optimizer, Curve(1000, 63, runtime.GlobalBatch(4, 4, 1)), schedule_config(10, 4))
    text = caplog.text
    assert "global batch 16 (4 per process x 4 processes x 1 accumulated)" in text
    assert "warmup would end after 15.87 epochs: it never ends in 10" in text
    assert "not the authors' 4" in text and "--batch_size 1 gives their global batch" in text
    assert "--schedule_epochs True" in text
    caplog.clear()
    schedule.reference_schedule(optimizer, Curve(1000, 250, runtime.GlobalBatch(4, 1, 1)), schedule_config(10, 4))
    assert "warmup ends after 4.00 of 10 epochs; peak factor 1.000" in caplog.text and "WARNING" not in caplog.text
    caplog.clear()
    schedule.reference_schedule(optimizer, Curve(100, 5, runtime.GlobalBatch(4, 1, 5)), schedule_config(30, 16))
    assert "no --batch_size gives their global batch with 5 processes x accumulation" in caplog.text


def test_the_authors_curve_in_epochs_is_the_default_of_every_training_stage(caplog) -> None:
    spec = dataset_spec("IEMOCAP")
    first = cli.training_parser(spec, ".", None, epochs=10, batch_size=4, learning_rate=1e-5).parse_args([])
    fusion = cli.fusion_parser(spec, ".", None, audio_feature="audio_kd", video_feature="video", alpha=0.7,
                               beta=0.8, feature_loss=True).parse_args([])
    assert first.schedule_epochs is True and fusion.schedule_epochs is True
    config = engine.FitConfig.from_flags(vars(first), seed=0, stage="s", script="s", dataset="IEMOCAP",
                                         labels=spec.labels, files=None, authors_batch=4)
    assert config.schedule_epochs is True
    caplog.set_level(logging.INFO, logger="magtkd")
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule.reference_schedule(optimizer, Curve(1000, 63, runtime.GlobalBatch(4, 4, 1)), config)
    assert ("global batch 16 (4 per process x 4 processes x 1 accumulated), the authors' curve in epochs (their "
            "global batch 4, --schedule_epochs True), 63 updates per epoch: warmup ends after 4.00 of 10 epochs; "
            "peak factor 1.000") in caplog.text and "WARNING" not in caplog.text
