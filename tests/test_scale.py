"""Real scale: real-size stand-ins, --grad_accum, --grad_checkpointing, torchrun (DDP) and --resume."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from argparse import Namespace
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import REPO, script
from IEMOCAP.config import IEMOCAP
from magtkd import engine, loaders, pretrained, runtime, schedule, utils
from magtkd.artifacts import StageFiles
from magtkd.synthetic.models import write_models
from magtkd.synthetic.text import corpus

# One thread per process: the runs compared bit for bit use the same CPU kernels, and the
# subprocesses do not crowd the (shared) CPU.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# --------------------------------------------------------------------------- real-size stand-ins

def test_real_size_standins_have_the_real_architectures(tmp_path: Path) -> None:
    """``--size real`` configs, tokenizer and processors (weights skipped: RoBERTa-large alone is 1.4 GB)."""
    from transformers import AutoConfig, AutoModel

    write_models(tmp_path, corpus(), seed=0, size="real", weights=False)
    assert not list(tmp_path.rglob("*.safetensors"))

    tok = pretrained.load_tokenizer(tmp_path)
    assert (len(tok), tok.mask_token_id, tok.model_max_length) == (50265, 50264, 512)
    ids = tok("Now <mask>").input_ids
    assert ids[0] == 0 and ids[-2:] == [50264, 2]
    assert max(ids[:-2]) < 5000  # the placeholder entries filling the vocabulary are never produced

    text = AutoConfig.from_pretrained(tmp_path / "roberta-large")
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.intermediate_size,
            text.vocab_size, text.max_position_embeddings) == (24, 1024, 16, 4096, 50265, 514)
    audio = AutoConfig.from_pretrained(tmp_path / "data2vec-audio-base-960h")
    assert (audio.num_hidden_layers, audio.hidden_size, len(audio.conv_dim)) == (12, 768, 7)
    video = AutoConfig.from_pretrained(tmp_path / "timesformer-base-finetuned-k400")
    assert (video.image_size, video.num_frames, video.num_hidden_layers, video.hidden_size,
            video.num_labels) == (224, 8, 12, 768, 400)
    assert pretrained.representation_width(tmp_path) == 768

    with torch.device("meta"):  # parameter counts without allocating them
        counts = {name: sum(p.numel() for p in AutoModel.from_config(AutoConfig.from_pretrained(
            tmp_path / name)).parameters()) for name in ("roberta-large", "data2vec-audio-base-960h",
                                                         "timesformer-base-finetuned-k400")}
    assert 354e6 < counts["roberta-large"] < 357e6
    assert 90e6 < counts["data2vec-audio-base-960h"] < 96e6
    assert 118e6 < counts["timesformer-base-finetuned-k400"] < 124e6

    processor = pretrained.load_image_processor(tmp_path)
    assert (processor.crop_size["height"], processor.size["shortest_edge"]) == (224, 224)
    assert pretrained.load_audio_feature_extractor(tmp_path).sampling_rate == 16000
    with pytest.raises(ValueError, match="expected one of tiny, real"):
        write_models(tmp_path / "x", corpus(), size="huge")


# --------------------------------------------------------------------------- --grad_accum

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
                 per_batch_schedule=False, grad_accum=grad_accum, grad_checkpointing=False, resume=False)
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


# --------------------------------------------------------------------------- --grad_checkpointing

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


# --------------------------------------------------------------------------- small data for subprocess runs

@pytest.fixture(scope="module")
def small_iemocap(generated: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated IEMOCAP CSVs cut to 20 train / 9 dev / 9 test utterances (text reads no media)."""
    root = tmp_path_factory.mktemp("small_iemocap")
    for split, rows in (("train", 20), ("dev", 9), ("test", 9)):
        lines = (generated / "datasets" / "IEMOCAP" / f"IEMOCAP_{split}.csv").read_text(encoding="utf-8").splitlines()
        (root / f"IEMOCAP_{split}.csv").write_text("\n".join(lines[:rows + 1]) + "\n", encoding="utf-8")
    return root


def text_command(data_dir: Path, pretrained_dir: Path, save_dir: Path, *extra: str) -> list[str]:
    return [str(REPO / "IEMOCAP" / "text.py"), "--data_dir", str(data_dir), "--pretrained_dir", str(pretrained_dir),
            "--save_dir", str(save_dir), "--learning_rate", "1e-3", "--device", "cpu", *extra]


def kill_after_first_epoch(command: list[str], state: Path) -> int:
    """Start ``command``; SIGKILL it as soon as the training state of an epoch exists; return that epoch."""
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        while not state.exists():
            assert process.poll() is None, f"{command} ended before writing {state}"
            time.sleep(0.005)
    finally:
        process.kill()
        process.wait()
    return torch.load(state, weights_only=True)["epoch"]


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:5]}"


# --------------------------------------------------------------------------- --resume

@pytest.mark.slow
def test_text_killed_and_resumed_ends_bit_identical(generated: Path, small_iemocap: Path, tmp_path: Path) -> None:
    epochs = ["--epochs", "4"]
    pdir = generated / "pretrained_model"
    full = subprocess.Popen([sys.executable, *text_command(small_iemocap, pdir, tmp_path / "full", *epochs)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    resumed_dir = tmp_path / "resumed"
    command = [sys.executable, *text_command(small_iemocap, pdir, resumed_dir, *epochs)]
    killed_at = kill_after_first_epoch(command, resumed_dir / "text.state.pt")
    assert 1 <= killed_at < 4
    again = subprocess.run(command + ["--resume", "True"], env=ENV, capture_output=True, text=True, cwd=REPO)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming from epoch {killed_at} of 4" in again.stderr
    assert f"epoch {killed_at}/4" not in again.stderr and "epoch 4/4" in again.stderr
    assert full.wait() == 0, full.stderr.read()[-2000:]

    load = lambda path: torch.load(path, map_location="cpu", weights_only=True)  # noqa: E731
    assert_same_tensors(load(resumed_dir / "text.bin"), load(tmp_path / "full" / "text.bin"))
    assert_same_tensors(load(resumed_dir / "text.state.pt")["model"], load(tmp_path / "full" / "text.state.pt")["model"])
    curve = lambda d: [(e["epoch"], e["train_loss"], e["dev"]) for e in json.loads((d / "text.json").read_text())["epochs"]]  # noqa: E731
    assert curve(resumed_dir) == curve(tmp_path / "full")


def fusion_command(features: Path, save_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "IEMOCAP" / "multimodal_fusion.py"), "--feature_dir", str(features),
            "--save_dir", str(save_dir), "--lr", "1e-3", "--batch_size", "2", "--dropout", "0.1", "--device", "cpu",
            *extra]


@pytest.mark.slow
def test_fusion_killed_and_resumed_ends_bit_identical(demo: dict, tmp_path: Path, caplog) -> None:
    features = demo["workdir"] / "IEMOCAP" / "feature"
    epochs = ["--epochs", "6"]
    full = subprocess.run(fusion_command(features, tmp_path / "full", *epochs), env=ENV, capture_output=True,
                          text=True, cwd=REPO)
    assert full.returncode == 0, full.stderr[-2000:]
    save_dir = tmp_path / "resumed"
    killed_at = kill_after_first_epoch(fusion_command(features, save_dir, *epochs), StageFiles.fusion(save_dir).state)
    assert 1 <= killed_at < 6
    again = subprocess.run(fusion_command(features, save_dir, *epochs, "--resume", "True"), env=ENV,
                           capture_output=True, text=True, cwd=REPO)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming from epoch {killed_at} of 6" in again.stderr

    load = lambda path: torch.load(path, map_location="cpu", weights_only=True)  # noqa: E731
    ours, full_files = StageFiles.fusion(save_dir), StageFiles.fusion(tmp_path / "full")
    assert_same_tensors(load(ours.checkpoint), load(full_files.checkpoint))
    assert_same_tensors(load(ours.state)["model"], load(full_files.state)["model"])
    metrics = lambda d: json.loads(StageFiles.fusion(d).metrics.read_text())  # noqa: E731
    strip = lambda curve: [{k: v for k, v in e.items() if not k.endswith(("seconds", "samples_per_second"))} for e in curve]  # noqa: E731
    assert strip(metrics(save_dir)["epochs"]) == strip(metrics(tmp_path / "full")["epochs"])
    assert metrics(save_dir)["complete"] and metrics(save_dir)["selected_epoch"] == metrics(tmp_path / "full")["selected_epoch"]

    # Other training flags: refused, naming them. Without --resume: the state is ignored, and says so.
    fusion = script("IEMOCAP", "multimodal_fusion")
    argv = fusion_command(features, save_dir)[2:]
    with pytest.raises(utils.UserError, match="--epochs 6 then, 7 now"):
        fusion.main(argv + ["--epochs", "7", "--resume", "True"])
    caplog.set_level("INFO", logger="magtkd")
    fusion.main(argv + ["--epochs", "1"])
    assert "ignoring the training state" in caplog.text and "resuming" not in caplog.text
    assert load(ours.state)["epoch"] == 1


# --------------------------------------------------------------------------- torchrun

@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_text(generated: Path, small_iemocap: Path, tmp_path: Path) -> None:
    save_dir = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               *text_command(small_iemocap, generated / "pretrained_model", save_dir, "--epochs", "2")]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stderr
    assert "world_size=2" in log
    # Rank 0 alone logs: one start-up line, one line per epoch
    assert log.count("IEMOCAP text: device cpu world_size=2") == 1
    assert log.count("IEMOCAP text epoch 1/2:") == 1 and log.count("IEMOCAP text epoch 2/2:") == 1
    assert sorted(p.name for p in save_dir.iterdir()) == [
        "text.bin", "text.json", "text.state.pt", "text_confusion.png", "text_curves.png"]
    state = torch.load(save_dir / "text.bin", map_location="cpu", weights_only=True)
    assert "classifier.weight" in state

    # The test report counts each test utterance once (no padded duplicates), per class as in the CSV
    with open(small_iemocap / "IEMOCAP_test.csv", newline="", encoding="utf-8") as fh:
        gold = Counter(IEMOCAP.labels[IEMOCAP.label_id(row["Emotion"])] for row in csv.DictReader(fh))
    test = json.loads((save_dir / "text.json").read_text())["test"]["per_class"]
    assert {name: int(test[name]["support"]) for name in IEMOCAP.labels} == {n: gold.get(n, 0) for n in IEMOCAP.labels}
    assert int(test["weighted avg"]["support"]) == 9


def test_grad_accum_zero_is_refused_at_parsing(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        script("MELD", "multimodal_fusion").main(["--grad_accum", "0"])
    assert exit_.value.code == 2 and "argument --grad_accum: expected an integer >= 1" in capsys.readouterr().err
