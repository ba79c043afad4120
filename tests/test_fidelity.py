"""Where we compute what the authors' code computes, and the switches where we fix it (docs/METHOD.md §7):
mixed precision of KD and its gradient clipping, seeding, and first-stage checkpoints written by the
authors' code. (Frame choice: tests/test_media.py and tests/test_first_stage.py; fusion initialisation:
tests/test_fusion.py.)"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from helpers import copy_checkpoints, flags, script, stage_paths
from IEMOCAP.config import IEMOCAP
from magtkd import cli, engine, loaders, pretrained, runtime, schedule
from magtkd.artifacts import StageFiles
from magtkd.checkpoints import CheckpointError
from magtkd.checkpoints import load_checkpoint

# --------------------------------------------------------------------------- KD precision and clipping

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


def _help(dataset: str, name: str) -> str:
    import subprocess
    import sys

    from helpers import REPO

    done = subprocess.run([sys.executable, str(REPO / dataset / f"{name}.py"), "--help"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return " ".join(done.stdout.split())


@pytest.mark.slow
def test_precision_defaults_of_the_stage_flags():
    text, kd_help = _help("IEMOCAP", "text"), _help("MELD", "KD")
    assert "--amp AMP bf16 autocast on CUDA; default False: fp32, as the authors (CPU always runs fp32)" in text
    assert "(default: False) --" not in text.split("--amp AMP", 1)[1][:200]  # the default shown once
    assert "--deterministic DETERMINISTIC" in text and "reference_kd_clip" not in text
    assert "--amp AMP fp16 autocast on CUDA with a gradient scaler" in kd_help
    assert "--reference_kd_clip REFERENCE_KD_CLIP clip the still-SCALED gradients" in kd_help
    args = cli.training_parser(IEMOCAP, ".", None, epochs=1, batch_size=1, learning_rate=1e-5).parse_args([])
    assert args.amp is False and args.deterministic is True and not hasattr(args, "reference_kd_clip")
    kd = cli.training_parser(IEMOCAP, ".", None, epochs=1, batch_size=1, learning_rate=1e-5, kd=True)
    args = kd.parse_args([])
    assert args.amp is True and args.reference_kd_clip is False and args.deterministic is True
    assert kd.parse_args(["--reference_kd_clip", "True", "--amp", "False"]).reference_kd_clip is True
    with pytest.raises(SystemExit):
        kd.parse_args(["--reference_kd_clip", "maybe"])


def test_set_seed_as_the_authors(monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        runtime.set_seed(2024)
        import os

        assert os.environ["PYTHONHASHSEED"] == "2024"
        assert torch.backends.cudnn.deterministic is True and torch.backends.cudnn.benchmark is False
        a = torch.rand(2)
        runtime.set_seed(2024, deterministic=False)  # variable-length inputs: no cuDNN tuning per new shape
        assert torch.backends.cudnn.deterministic is False and torch.backends.cudnn.benchmark is False
        assert torch.equal(a, torch.rand(2))
        runtime.set_seed(2024, deterministic=False, fixed_shapes=True)  # the video stage's 8 frames
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before


# --------------------------------------------------------------------------- the authors' first-stage checkpoints


def authors_layout(state: dict, modality: str, hidden: int, classifier: str = "W", projection: str = "fc") -> dict:
    """``state`` (ours) renamed as the authors' modules write it: ``text_model`` (RobertaModel with its pooler
    and position_ids buffer) or ``model``; ``W`` for the classifier; the text projection under ``projection``."""
    backbone = "text_model." if modality == "text" else "model."
    out = {}
    for key, value in state.items():
        if key.startswith("backbone."):
            out[backbone + key[len("backbone."):]] = value
        elif key.startswith("classifier."):
            out[classifier + key[len("classifier"):]] = value
        else:
            out[projection + key[len("project"):]] = value
    if modality == "text":
        g = torch.Generator().manual_seed(1)
        out["text_model.pooler.dense.weight"] = torch.randn(hidden, hidden, generator=g)
        out["text_model.pooler.dense.bias"] = torch.randn(hidden, generator=g)
        out["text_model.embeddings.position_ids"] = torch.arange(514)[None]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("dataset, modality", [("IEMOCAP", "text"), ("MELD", "audio"), ("IEMOCAP", "video")])
def test_authors_checkpoint_evaluates_like_ours(demo, tmp_path, dataset, modality):
    # --train False on a checkpoint laid out as the authors' code writes it gives the test metrics of
    # the same weights saved by us.
    demo_paths = stage_paths(demo["workdir"], dataset)
    paths = copy_checkpoints(demo_paths, tmp_path, f"{modality}.bin")
    ours = torch.load(paths["save_dir"] / f"{modality}.bin", weights_only=True)
    hidden = next(v for k, v in ours.items() if k.endswith("embeddings.word_embeddings.weight")).shape[1] \
        if modality == "text" else 0
    torch.save(authors_layout(ours, modality, hidden), paths["save_dir"] / f"{modality}.bin")
    result = script(dataset, modality).main(flags(paths, train="False", device="cpu"))
    saved = json.loads((demo_paths["save_dir"] / f"{modality}.json").read_text(encoding="utf-8"))["test"]
    assert result["accuracy"] == saved["accuracy"] and result["per_class"] == saved["per_class"]


def test_authors_text_checkpoint_maps_by_shape_and_names_what_does_not_fit(generated, tmp_path, caplog):
    encoder, _ = pretrained.load_encoder("text", generated / "pretrained_model", IEMOCAP.num_classes)
    ours = {k: v.clone() for k, v in encoder.state_dict().items()}
    hidden = encoder.backbone.config.hidden_size
    # Whichever of the two Linears is called W (classifier or projection), shapes decide.
    for classifier, projection in (("W", "fc"), ("classifier_head", "W")):
        torch.nn.init.zeros_(encoder.classifier.weight)
        path = tmp_path / f"{classifier}.bin"
        torch.save(authors_layout(ours, "text", hidden, classifier, projection), path)
        caplog.set_level("INFO", logger="magtkd")
        load_checkpoint(encoder, path, "the authors' text stage")
        assert all(torch.equal(encoder.state_dict()[k], ours[k]) for k in ours)
        assert "laid out as the authors' code writes it" in caplog.text and "text_model.pooler" in caplog.text

    state = authors_layout(ours, "text", hidden)
    state["unknown_head.weight"] = torch.zeros(3, 3)
    del state["text_model.encoder.layer.0.attention.self.query.weight"]
    torch.save(state, tmp_path / "bad.bin")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(encoder, tmp_path / "bad.bin", "the authors' text stage")
    message = str(err.value)
    assert "bad.bin" in message and "unknown_head.weight" in message
    assert "missing keys: backbone.encoder.layer.0.attention.self.query.weight" in message
