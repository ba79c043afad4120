"""The input share of a training step: how long the training loop waits for its next batch, before and after
the loaders prefetch in workers and frames travel as uint8 (docs/METHOD.md §2, "Input").

    python benchmarks/bench_input.py                 # video (224 px frames) and text (512-token prompts)
    python benchmarks/bench_input.py --quick         # fewer batches

Real input sizes through tiny models, so that the input is visible next to the compute (the real models
compute far longer per batch; the share then shrinks, but the GPU they run on computes far faster): 8
stored uint8 frames at 224 px per utterance (the layout video_feature_extract.py writes) into a
1-layer TimeSformer of width 32 at 224 px (32-px patches); prompts of long dialogues (512 tokens) into the 2-layer
RoBERTa stand-in. Each configuration trains epochs of batches of 4 with `magtkd.engine.train_one_epoch`
(forward, backward, clip, AdamW) and times the waits for the next batch; the share is waits / epoch time,
measured on the last epoch (persistent workers are started by then):

- ``before``: the loading as it was: no workers, frames normalised to float32 in the loader (4x the bytes);
- ``after, 0 workers``: uint8 frames normalised by the model (`magtkd.encoders.VideoEncoder.pixels`), no
  workers (the default on CPU);
- ``after, N workers``: the same with ``--num_workers N`` persistent workers (the default on CUDA: 4).

Prints one line per configuration and a table; the bytes column is one batch as it leaves the loader
(what a host-to-device copy moves); the last column is the loader iterated alone (no model), the rate it
can feed a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def video_setup(root: Path, n: int):
    """``n`` utterances of stored 224-px frames, the field reading them and a tiny TimeSformer at 224 px."""
    import torch
    from transformers import TimesformerConfig, TimesformerModel

    from magtkd.dataset import Sample, Utterance
    from magtkd.encoders import VideoEncoder
    from magtkd.frames import FrameCodec, frame_file, save_frames
    from magtkd.loaders import VideoField

    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        utt = Utterance(split="train", row=i + 1, dialogue_id=0, utterance_id=i, text="x", speaker="A",
                        speaker_key="A", emotion="neu", label=i % 3, audio_path=root, video_path=root,
                        start=None, end=None)
        save_frames(frame_file(root, "train", utt.key), rng.integers(0, 256, (8, 3, 224, 224), dtype=np.uint8))
        samples.append(Sample(utt, ("x",), (0,)))

    class Processor:  # the videomae-base processor's statistics (what FrameCodec reads)
        crop_size, rescale_factor = {"height": 224, "width": 224}, 1 / 255
        image_mean, image_std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

    codec = FrameCodec(Processor())
    torch.manual_seed(0)
    backbone = TimesformerModel(TimesformerConfig(image_size=224, patch_size=32, num_frames=8, hidden_size=32,
                                                  num_hidden_layers=1, num_attention_heads=4, intermediate_size=64))
    model = VideoEncoder(backbone, 3, codec.scale, tuple(codec.mean.flatten().tolist()),
                         tuple(codec.std.flatten().tolist()))
    return samples, VideoField(codec, root), model


class FloatVideoField:
    """The frames as the loader gave them before: normalised to float32 in the loading process."""

    name = "video"

    def __init__(self, field: Any) -> None:
        self.field = field

    def load(self, sample: Any):
        return self.field.codec.normalize(self.field.load(sample).numpy())

    def collate(self, items: list) -> dict:
        return self.field.collate(items)


def text_setup(root: Path, n: int):
    """``n`` dialogue-prefix samples of one long dialogue (prompts at the 512-token cap), the text field and the
    tiny RoBERTa stand-in encoder."""
    from magtkd.dataset import Sample, Utterance
    from magtkd.pretrained import load_encoder
    from magtkd.synthetic.__main__ import generate

    if not (root / "pretrained_model" / "roberta-large" / "config.json").is_file():
        generate(root, seed=0, what="models")
    model, field = load_encoder("text", root / "pretrained_model", 3)
    rng = np.random.default_rng(0)
    words = ["well", "I", "think", "we", "should", "go", "now", "really", "no", "why", "because", "today"]
    texts = [" ".join(rng.choice(words, 14)) for _ in range(n + 40)]
    samples = []
    for i in range(n):
        t = i + 40  # at least 40 utterances of context: the prompt reaches the cap
        utt = Utterance(split="train", row=i + 1, dialogue_id=0, utterance_id=t, text=texts[t], speaker="A",
                        speaker_key="A", emotion="neu", label=i % 3, audio_path=root, video_path=root,
                        start=None, end=None)
        samples.append(Sample(utt, tuple(texts[: t + 1]), tuple(j % 2 for j in range(t + 1))))
    return samples, field, model


def measure(samples: list, field: Any, model, workers: int, epochs: int) -> dict[str, float]:
    """Train ``epochs`` epochs through the engine; the last epoch's seconds, waits for batches and batch bytes."""
    import torch
    import torch.nn.functional as F

    from magtkd import engine, loaders
    from magtkd.artifacts import StageFiles

    data = loaders.SampleBatches({"train": loaders.make_loader(loaders.SampleDataset(samples, [field]), 4, True,
                                                               workers, seed=0)}, torch.device("cpu"))
    waits: list[float] = []
    sizes: list[int] = []
    plain = data.micro_batches

    def timed(epoch: int):
        iterator = iter(plain(epoch))
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            waits.append(time.perf_counter() - start)
            sizes.append(sum(v.numel() * v.element_size() for v in batch.values() if torch.is_tensor(v)))
            yield batch

    data.micro_batches = timed
    data.prepare(model, lambda m, b: F.cross_entropy(m.encode(b)[1], b["labels"]), 0)
    config = engine.FitConfig(stage="bench", script="bench_input.py", dataset="X", labels=["a", "b", "c"],
                              files=StageFiles.first_stage(Path("/nonexistent"), "bench"), epochs=1, seed=0, args={})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = engine.Step(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
                       list(model.parameters()), 10.0)
    model.train()
    for epoch in range(1, epochs + 1):
        waits.clear()
        sizes.clear()
        start = time.perf_counter()
        engine.train_one_epoch(data, step, config, epoch)
        seconds = time.perf_counter() - start
    start = time.perf_counter()
    for _ in plain(epochs + 1):  # the loader alone, nothing computed: the rate it can feed
        pass
    alone = len(samples) / (time.perf_counter() - start)
    return {"epoch_s": seconds, "wait_s": sum(waits), "share": sum(waits) / seconds, "batches": len(waits),
            "batch_mb": sizes[0] / 1e6, "loader_per_s": alone}


def main(argv: list[str] | None = None) -> None:
    from magtkd.flag_parser import HelpFormatter  # every flag's default shown once
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--quick", action="store_true", help="24 utterances and 2 epochs instead of 48 and 3")
    p.add_argument("--workers", type=int, default=2, help="worker processes of the 'after' configuration")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    n, epochs = (24, 2) if args.quick else (48, 3)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_input_") as tmp:
        root = Path(tmp)
        samples, field, model = video_setup(root / "feature", n)
        for name, chosen, workers in (("video: before (float32 in the loader, 0 workers)", FloatVideoField(field), 0),
                                      ("video: after, 0 workers (uint8, normalised by the model)", field, 0),
                                      (f"video: after, {args.workers} persistent workers", field, args.workers)):
            rows.append((name, measure(samples, chosen, model, workers, epochs)))
            print(name, rows[-1][1], flush=True)
        samples, field, model = text_setup(root, n)
        for name, workers in (("text: before (0 workers)", 0), (f"text: after, {args.workers} persistent workers",
                                                                 args.workers)):
            rows.append((name, measure(samples, field, model, workers, epochs)))
            print(name, rows[-1][1], flush=True)
    print(f"\n{n} utterances, batch 4, last of {epochs} epochs; torch threads {args.threads}; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}")
    print("| configuration | epoch s | waiting for batches s | input share | MB per batch | loader alone, utterances/s |"
          "\n|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['epoch_s']:.2f} | {r['wait_s']:.2f} | {100 * r['share']:.0f} % | {r['batch_mb']:.2f} | "
              f"{r['loader_per_s']:.0f} |")


if __name__ == "__main__":
    main()
