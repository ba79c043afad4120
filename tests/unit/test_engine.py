"""The training loop (`magtkd.engine`): --grad_accum, --grad_checkpointing, the gradient scaler and
clipping of KD (docs/METHOD.md §3, §7), and the non-finite loss check."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader

from magtkd import engine, loaders, pretrained, runtime, schedule, utils
from magtkd.artifacts import StageFiles
from magtkd.engine import NonFiniteError
from magtkd.utils import FeatureFileError, UserError


class Toy(torch.utils.data.Dataset):
    """Fixed random inputs and labels for a small classifier without dropout."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"index": i, "x": self.x[i], "label": int(self.y[i])}

    def collate(self, items: list[dict]) -> dict:
        return {"index": torch.tensor([it["index"] for it in items]), "x": torch.stack([it["x"] for it in items]),
                "labels": torch.tensor([it["label"] for it in items])}


class ToyNet(nn.Sequential):
    """A small classifier without dropout, with the encoders' ``encode(batch) -> (representation, logits)``."""

    def __init__(self) -> None:
        super().__init__(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))

    def encode(self, batch: dict):
        logits = self(batch["x"])
        return logits, logits


def toy_fit(tmp: Path, batch_size: int, grad_accum: int, epochs: int = 2) -> dict[str, torch.Tensor]:
    """`engine.fit` on the toy data; the weights after the last epoch (from the training state)."""
    torch.manual_seed(0)
    net = ToyNet()

    def objective(model: nn.Module, batch: dict) -> torch.Tensor:
        return F.cross_entropy(model(batch["x"]), batch["labels"])

    splits = {split: loaders.make_loader(Toy(n, seed), batch_size, split == "train", 0, seed=7)
              for split, n, seed in (("train", 22, 1), ("dev", 6, 2), ("test", 6, 3))}
    flags = dict(train=True, epochs=epochs, batch_size=batch_size, learning_rate=0.5, seed=0, amp=False,
                 per_batch_schedule=False, grad_accum=grad_accum, grad_checkpointing=False, resume=False,
                 save_state=True)  # the last epoch's weights are read from the training state
    files = StageFiles.first_stage(tmp, f"toy_{batch_size}x{grad_accum}")
    # As the first-stage scripts: the configuration (which checks the flags), AdamW, the reference schedule.
    config = engine.FitConfig.from_flags(flags, seed=0, stage="toy", script="test", dataset="toy",
                                         labels=["a", "b", "c"], files=files)
    data = loaders.SampleBatches(splits, torch.device("cpu"))
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=flags["learning_rate"])
    scheduler = schedule.reference_schedule(optimizer, data, config)
    engine.fit(net, objective, data, optimizer, scheduler, config)
    return torch.load(files.state, weights_only=True)["model"]


def test_grad_accum_update_equals_a_larger_batch(tmp_path: Path) -> None:
    # 22 samples: batches of 8, 8, 6 vs micro-batches (4, 4), (4, 4), (4, 2): the last group's
    # micro-batches differ in size, so a plain 1/N scaling would not match.
    accumulated = toy_fit(tmp_path, batch_size=4, grad_accum=2)
    larger = toy_fit(tmp_path, batch_size=8, grad_accum=1)
    plain = toy_fit(tmp_path, batch_size=4, grad_accum=1)
    for key in larger:
        torch.testing.assert_close(accumulated[key], larger[key], rtol=1e-5, atol=1e-6)
    assert max((plain[k] - larger[k]).abs().max().item() for k in larger) > 1e-3


def test_grad_accum_flag_is_checked(tmp_path: Path) -> None:
    with pytest.raises(utils.UserError, match=r"--grad_accum \(0\) must be at least 1"):
        toy_fit(tmp_path, batch_size=4, grad_accum=0)


@pytest.mark.parametrize("modality", ["text", "audio", "video"])
def test_grad_checkpointing_gives_the_same_gradients(generated: Path, modality: str) -> None:
    encoder, _ = pretrained.load_encoder(modality, generated / "pretrained_model", 6, generated / "feature")
    g = torch.Generator().manual_seed(0)
    batch = {
        "text": {"text_ids": torch.randint(5, 300, (2, 12), generator=g), "text_mask": torch.ones(2, 12, dtype=torch.long)},
        "audio": {"audio_values": torch.randn(2, 16000, generator=g), "audio_mask": torch.ones(2, 16000, dtype=torch.long)},
        "video": {"video_pixels": torch.randn(2, 8, 3, 32, 32, generator=g)},
    }[modality]
    encoder.train()

    def gradients() -> dict[str, torch.Tensor]:
        encoder.zero_grad(set_to_none=True)
        runtime.set_seed(1)  # same dropout, layerdrop and (numpy-drawn) audio time-mask draws
        _, logits = encoder.encode(batch)
        F.cross_entropy(logits, torch.tensor([0, 1])).backward()
        return {k: p.grad.clone() for k, p in encoder.named_parameters() if p.grad is not None}

    plain = gradients()
    assert engine.enable_grad_checkpointing(encoder)
    assert encoder.backbone.is_gradient_checkpointing
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys()
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-4, atol=1e-6)
    with pytest.raises(utils.UserError, match="no Hugging Face backbone"):
        engine.enable_grad_checkpointing(nn.Linear(2, 2))


SCALE = 2.0 ** 16  # GradScaler's initial scale


class _Toy(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 6, generator=g) * 5
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return {"index": i, "x": self.x[i], "label": int(self.y[i])}


class _ToyNet(nn.Linear):
    """A linear classifier with the encoders' ``encode(batch) -> (representation, logits)``."""

    def encode(self, batch):
        logits = self(batch["x"])
        return logits, logits


def _collate(items):
    return {"index": torch.tensor([it["index"] for it in items]), "x": torch.stack([it["x"] for it in items]),
            "labels": torch.tensor([it["label"] for it in items])}


def _train_toy(tmp_path, amp: bool, reference_kd_clip: bool, amp_dtype=torch.float16):
    """engine.fit on a linear model with a large loss (gradient norm >> 10); the final weights and the
    gradient norm AdamW saw at each step."""
    torch.manual_seed(0)
    net = _ToyNet(6, 3)
    splits = {split: DataLoader(_Toy(12, seed), batch_size=4, shuffle=split == "train", collate_fn=_collate,
                                generator=torch.Generator().manual_seed(0))
              for split, seed in (("train", 1), ("dev", 2), ("test", 3))}

    def objective(model, batch):
        return 50.0 * F.cross_entropy(model(batch["x"]), batch["labels"])

    seen: list[float] = []

    def record(optimizer, *_):
        seen.append(float(torch.norm(torch.stack([p.grad.norm() for p in net.parameters()]))))

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    hook = register_optimizer_step_pre_hook(record)
    flags = dict(train=True, seed=0, epochs=2, learning_rate=1e-2, per_batch_schedule=True, amp=amp, grad_accum=1,
                 grad_checkpointing=False, resume=False, reference_kd_clip=reference_kd_clip)
    # What the KD stage builds: AdamW, the reference schedule, a gradient scaler for fp16 autocast.
    data = loaders.SampleBatches(splits, torch.device("cpu"))
    config = engine.FitConfig.from_flags(flags, seed=0, stage="toy", script="test", dataset="toy",
                                         labels=["a", "b", "c"],
                                         files=StageFiles.first_stage(tmp_path, f"toy_{amp}_{reference_kd_clip}"),
                                         amp_dtype=amp_dtype, clip_scaled=reference_kd_clip)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=flags["learning_rate"])
    scheduler = schedule.reference_schedule(optimizer, data, config)
    scaler = torch.amp.GradScaler("cpu", enabled=bool(amp and amp_dtype == torch.float16))
    engine.fit(net, objective, data, optimizer, scheduler, config, scaler)
    hook.remove()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}, seen


def test_kd_gradient_scaler_unscales_before_clipping(tmp_path):
    plain, plain_norms = _train_toy(tmp_path, amp=False, reference_kd_clip=False)
    scaled, scaled_norms = _train_toy(tmp_path, amp=True, reference_kd_clip=False)
    assert len(plain_norms) == 6 and all(n == pytest.approx(10.0) for n in plain_norms)  # clipped at 10
    # The scaler multiplies by a power of two and divides again before clipping: the same update exactly.
    assert scaled_norms == plain_norms
    assert all(torch.equal(plain[k], scaled[k]) for k in plain)


def test_reference_kd_clip_clips_the_scaled_gradients(tmp_path):
    plain, _ = _train_toy(tmp_path, amp=True, reference_kd_clip=False)
    theirs, norms = _train_toy(tmp_path, amp=True, reference_kd_clip=True)
    # Clipping the still-scaled gradients at 10: AdamW sees gradients of norm 10 / scale.
    assert all(n == pytest.approx(10.0 / SCALE, rel=1e-4) for n in norms)
    assert not all(torch.equal(plain[k], theirs[k]) for k in plain)
    # Without a scaler (--amp False, or bf16 stages) the flag changes nothing.
    unscaled, _ = _train_toy(tmp_path, amp=False, reference_kd_clip=True)
    plain_fp32, _ = _train_toy(tmp_path, amp=False, reference_kd_clip=False)
    assert all(torch.equal(unscaled[k], plain_fp32[k]) for k in plain)


def test_loss_check_reads_the_device_every_ten_updates(monkeypatch):
    """The NaN of update 3 of 25 is found at the read of update 10 and named as update 3."""
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    values = [1.0] * 25
    values[2] = float("inf")
    seen = []

    def loss_of(batch):
        seen.append(batch)
        return model(torch.ones(1, 2)).sum() * 0 + values[batch[0]]

    class Updates:  # the engine's view of 25 one-item batches [i], one update each
        runner, n_train = model, 25

        def micro_batches(self, epoch):
            return ([i] for i in range(25))

        def updates_per_epoch(self, grad_accum):
            return 25

        def loss(self, batch, config):
            return loss_of(batch)

    config = engine.FitConfig(stage="unit", script="unit.py", dataset="X", labels=["a"],
                              files=StageFiles.first_stage("/nonexistent", "unit"), epochs=1, seed=0, args={})
    step = engine.Step(optimizer, scheduler, list(model.parameters()), config.grad_clip)
    with pytest.raises(NonFiniteError, match=r"unit: .* at epoch 7, update 3 of 25"):
        engine.train_one_epoch(Updates(), step, config, 7)
    assert len(seen) == 10  # stopped at the first read, not at the end of the epoch


def test_errors_are_user_errors():
    assert issubclass(NonFiniteError, UserError) and issubclass(FeatureFileError, UserError)


class OneItemUpdates:
    """The engine's view of ``n`` one-item batches ``{"index", "x"}`` (one update each) whose loss is the
    model's output times ``factors[i]`` (inf: the update's gradients overflow); ``x`` is NaN for ``nan_at``."""

    def __init__(self, model: nn.Module, factors: list[float], nan_at: int | None = None) -> None:
        self.runner, self.n_train, self.factors, self.nan_at = model, len(factors), factors, nan_at

    def micro_batches(self, epoch):
        return ({"index": torch.tensor([i]), "x": torch.full((1, 2), float("nan") if i == self.nan_at else 1.0),
                 "labels": torch.tensor([0])} for i in range(self.n_train))

    def updates_per_epoch(self, grad_accum):
        return self.n_train

    def loss(self, batch, config):
        return self.runner(batch["x"]).sum() * self.factors[int(batch["index"])]


def fp16_epoch(factors: list[float], nan_at: int | None = None) -> tuple[float, torch.Tensor]:
    """One epoch of `engine.train_one_epoch` with an enabled gradient scaler (as fp16 KD; it runs on CPU too):
    the epoch's mean loss and the weights after it."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    config = engine.FitConfig(stage="unit", script="unit.py", dataset="X", labels=["a"],
                              files=StageFiles.first_stage("/nonexistent", "unit"), epochs=1, seed=0, args={})
    step = engine.Step(optimizer, scheduler, list(model.parameters()), config.grad_clip,
                       torch.amp.GradScaler("cpu", enabled=True))
    mean = engine.train_one_epoch(OneItemUpdates(model, factors, nan_at), step, config, 3)
    return mean, model.weight.detach().clone()


def test_fp16_scaler_skips_overflowing_updates_logs_them_and_leaves_them_out(caplog):
    """docs/METHOD.md §3: an update whose gradients are not finite is skipped (the weights keep their values),
    named in the log at the next read of the loss, and left out of the epoch's mean loss."""
    factors = [1.0] * 12
    factors[2] = factors[3] = float("inf")
    mean, weights = fp16_epoch(factors)
    assert "unit epoch 3: update(s) 3, 4 of 12 skipped by the fp16 gradient scaler" in caplog.text
    assert "scale now 16384" in caplog.text  # halved twice from 2**16
    # The ten applied updates are those of a ten-update epoch: the same weights and the same losses.
    ten_mean, ten_weights = fp16_epoch([1.0] * 10)
    assert torch.equal(weights, ten_weights) and not torch.equal(weights, fp16_epoch([1.0] * 12)[1])
    assert mean == pytest.approx(ten_mean, rel=1e-12)


@pytest.mark.parametrize("factors, nan_at, message", [
    ([float("inf")] * 5, None, r"unit: every update of epoch 3 \(5\) was skipped by the fp16 gradient scaler"),
    ([1.0] * 3 + [float("inf")] * 27, None, r"unit: 20 updates in a row skipped by the fp16 gradient scaler at "
                                            r"epoch 3 \(up to update 23 of 30\)"),
    ([1.0] * 6, 4, r"unit: x of training sample\(s\) \[4\] \(0-based, CSV order\) holds NaN/inf at epoch 3, "
                   r"update 5; stopped before publishing"),
])
def test_fp16_scaler_stops_on_non_finite_inputs_and_on_updates_that_keep_failing(factors, nan_at, message):
    with pytest.raises(NonFiniteError, match=message):
        fp16_epoch(factors, nan_at)


def test_every_epoch_row_records_the_learning_rate_at_its_end(tmp_path: Path) -> None:
    """The metrics document's ``lr``: the rate after the epoch's last update (the schedule, in epochs)."""
    torch.manual_seed(0)
    net = ToyNet()
    splits = {split: loaders.make_loader(Toy(n, seed), 4, split == "train", 0, seed=7)
              for split, n, seed in (("train", 22, 1), ("dev", 6, 2), ("test", 6, 3))}
    config = engine.FitConfig.from_flags({"epochs": 3}, seed=0, stage="toy", script="test", dataset="toy",
                                         labels=["a", "b", "c"], files=StageFiles.first_stage(tmp_path, "toy"),
                                         authors_batch=4)
    data = loaders.SampleBatches(splits, torch.device("cpu"))
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.5)
    scheduler = schedule.reference_schedule(optimizer, data, config)
    doc = engine.fit(net, lambda model, batch: F.cross_entropy(model(batch["x"]), batch["labels"]), data, optimizer,
                     scheduler, config)
    curve = schedule.WarmupDecay(*schedule.schedule_steps(22, 6, 3, anchor_batch=4))  # 6 updates per epoch
    assert [row["lr"] for row in doc["epochs"]] == pytest.approx([0.5 * curve(6 * e) for e in (1, 2, 3)])
    assert doc["epochs"][-1]["lr"] == optimizer.param_groups[0]["lr"]
# --------------------------------------------------------------------------- no host round trip in a step

class HostTraffic(TorchDispatchMode):
    """The meta device stands in for a GPU (docs/METHOD.md §6, "No waiting for the host"): a meta tensor
    has no values, so every read of a device value on the host (``.item()``, ``float()``, ``bool()``: the
    aten op ``_local_scalar_dense``, a synchronisation on CUDA) and every copy between host and device
    (``_to_copy``/``copy_``; a pageable host-to-device copy also synchronises on CUDA) passes through here
    and is counted. Reads return 1, copies to the host zeros, so the code under test runs on."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = self.to_device = self.to_host = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            self.reads += 1
            return True if args[0].dtype == torch.bool else 1
        if func.overloadpacket in (torch.ops.aten._to_copy, torch.ops.aten.to, torch.ops.aten.copy_):
            source = args[1] if func.overloadpacket is torch.ops.aten.copy_ else args[0]
            targets = [a for a in (*args[1:], *kwargs.values()) if isinstance(a, (torch.device, str))]
            target = torch.device(targets[0]) if targets else args[0].device
            if source.device.type == "cpu" and target.type == "meta":
                self.to_device += 1
            elif source.device.type == "meta" and target.type == "cpu":
                self.to_host += 1
                return torch.zeros(source.shape, dtype=kwargs.get("dtype") or source.dtype)
        return func(*args, **kwargs)


def meta_updates(n: int, grad_accum: int = 1):
    """A classifier on the meta device, its AdamW and schedule, and the engine's view of ``n`` batches of 4
    already on the device (as the loaders' ``non_blocking`` copies leave them)."""
    model = ToyNet().to("meta")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batches = [{"x": torch.empty(4, 5, device="meta"), "labels": torch.zeros(4, dtype=torch.long, device="meta")}
               for _ in range(n)]

    class Updates:
        runner, n_train = model, 4 * n

        def micro_batches(self, epoch):
            return iter(batches)

        def updates_per_epoch(self, accum):
            return -(-n // accum)

        def loss(self, batch, config):
            return F.cross_entropy(model(batch["x"]), batch["labels"])

    config = engine.FitConfig(stage="meta", script="unit.py", dataset="X", labels=["a", "b", "c"],
                              files=StageFiles.first_stage("/nonexistent", "meta"), epochs=1, seed=0, args={},
                              grad_accum=grad_accum)
    return Updates(), engine.Step(optimizer, scheduler, list(model.parameters()), config.grad_clip), config


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_a_training_step_makes_no_host_round_trip(grad_accum: int) -> None:
    data, step, config = meta_updates(25 * grad_accum, grad_accum)
    traffic = HostTraffic()
    with traffic:
        step.update(data.runner, list(data.micro_batches(1))[:grad_accum],
                    lambda batch: data.loss(batch, config))
    assert (traffic.reads, traffic.to_device, traffic.to_host) == (0, 0, 0)
    # An epoch of 25 updates reads the summed loss at updates 10 and 20, at its end (the bar) and once for
    # the mean it returns: four reads, each one value, and no copy.
    with traffic:
        engine.train_one_epoch(data, step, config, 1)
    assert (traffic.reads, traffic.to_device, traffic.to_host) == (4, 0, 0)


def test_evaluation_copies_the_predictions_to_the_host_once_per_pass() -> None:
    model = ToyNet().to("meta")
    split = loaders.make_loader(Toy(10, 0), 4, False, 0)  # 3 batches, on the host
    data = loaders.SampleBatches({"dev": split}, torch.device("meta"))
    config = engine.FitConfig(stage="meta", script="unit.py", dataset="X", labels=["a", "b", "c"],
                              files=StageFiles.first_stage("/nonexistent", "meta"), epochs=1, seed=0, args={})
    traffic = HostTraffic()
    with traffic:
        out = data.evaluate(model, "dev", config)
    labels, preds = out.labels, out.preds
    # Per batch: its three tensors to the device (index, x, labels); then one copy back for the whole pass
    # (the finiteness check rides on it), no read.
    assert (traffic.reads, traffic.to_device, traffic.to_host) == (0, 3 * 3, 1)
    assert labels.tolist() == Toy(10, 0).y.tolist() and len(preds) == 10
