"""Benchmark the fusion stage (docs/METHOD.md §5) on CPU: our training epoch against the authors' loop.

    python benchmarks/bench_fusion.py            # IEMOCAP- and MELD-sized synthetic features, width 768
    python benchmarks/bench_fusion.py --quick    # a smaller run (width 128, 1/8 of the dialogues)
    python benchmarks/bench_fusion.py --epochs 3 --datasets MELD

The synthetic pickles have the real splits' sizes and spread of dialogue lengths
(``SIZES``), so a batch of 16 random dialogues carries the padding it carries on
the real data. On the same features, each in a fresh subprocess (its peak RSS is
its own), the script times:

- ``authors``: the authors' training loop, rebuilt here from their code's
  structure: a Dataset that turns each dialogue's lists into tensors at every
  access, one-hot speaker matrices, a pandas ``collate_fn`` padding sequence-first,
  lengths read back per dialogue from the utterance mask, the padding speaker set
  in a per-dialogue loop, every layer computed on the padded grid, the default
  (per-tensor) AdamW, ``loss.item()`` and CPU copies of the predictions at every
  step. The model is ours on the padded grid (``packed=False``) with ``F.dropout``,
  which the tests show computes the authors' function; the objective is the stage's.
- ``ours``: ``<DS>/multimodal_fusion.py``'s ``main`` with its defaults: the authors'
  computation bit for bit (padded grid, PyTorch's default AdamW), with dropout masks
  drawn three times faster with the same draws and no host round trip in the step;
  its own per-epoch ``train_seconds``.
- ``packed``: the same with ``--packed True`` (per-utterance layers on the real
  utterances only: the same outputs, gradients up to the order of float sums).

Both: the reference's hyperparameters (batch 16 dialogues, lr 1e-4, dropout 0.5,
8 heads), torch's default threads, the same seed, initial weights and batches.
Their losses are not compared: this rebuild of the authors' loop shuffles with its
own generator and draws batch-first masks. That the stage computes the authors' own
run bit for bit is verified against their code (docs/METHOD.md §5, "The authors'
run, draw for draw"); that a packed step equals the padded one (same dropout draws,
same outputs) is what ``tests/unit/test_packing.py`` checks.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Real splits (docs/METHOD.md §1): split -> (dialogues, utterances, std of dialogue length, longest).
SIZES = {
    "IEMOCAP": {"train": (108, 5163, 15.4, 94), "dev": (12, 647, 24.0, 110), "test": (31, 1623, 17.4, 91)},
    "MELD": {"train": (1038, 9989, 5.8, 24), "dev": (114, 1109, 5.4, 23), "test": (280, 2610, 5.7, 33)},
}
# The stage's defaults per dataset: audio / video feature keys, alpha, beta, L_feat (docs/METHOD.md §5).
OBJECTIVE = {"IEMOCAP": ("audio_kd", "video", 0.7, 0.8, True), "MELD": ("audio_kd", "video_kd", 0.01, 0.08, False)}


def dataset_spec(name: str):
    """The dataset's `magtkd.spec.DatasetSpec`, from its own folder (``<name>/config.py``)."""
    return getattr(importlib.import_module(f"{name}.config"), name)


def authors_epochs(name: str, feature_dir: Path, epochs: int, seed: int = 2024) -> list[dict]:
    """The authors' loop (see the module docstring) for ``epochs`` epochs: per-epoch seconds."""
    import numpy as np
    import pandas as pd
    import torch
    import torch.nn.functional as F
    from torch.nn.utils.rnn import pad_sequence
    from torch.optim.lr_scheduler import LambdaLR
    from torch.utils.data import DataLoader, Dataset

    from magtkd import model, packing
    from magtkd.artifacts import feature_path
    from magtkd.losses import feature_kd_loss, logit_kd_loss
    from magtkd.pickles import load_features
    from magtkd.schedule import WarmupDecay, schedule_steps

    spec = dataset_spec(name)
    audio_key, video_key, alpha, beta, feature_loss = OBJECTIVE[name]

    class AuthorsDataset(Dataset):
        def __init__(self, split: str) -> None:
            self.f = load_features(feature_path(feature_dir, split), keys=("text", audio_key, video_key))
            self.keys = list(self.f["vids"])

        def __len__(self) -> int:
            return len(self.keys)

        def __getitem__(self, i: int):
            vid, f = self.keys[i], self.f
            speakers = f["speakers"][vid]
            return (torch.FloatTensor(np.array(f["text"][vid])), torch.FloatTensor(np.array(f[video_key][vid])),
                    torch.FloatTensor(np.array(f[audio_key][vid])),
                    torch.FloatTensor([[1 if s == k else 0 for k in range(spec.n_speaker)] for s in speakers]),
                    torch.FloatTensor([1] * len(speakers)), torch.LongTensor(f["labels"][vid]), vid)

        @staticmethod
        def collate_fn(data):
            dat = pd.DataFrame(data)
            return [pad_sequence(dat[i]) if i < 4 else pad_sequence(dat[i], True) if i < 6 else dat[i].tolist()
                    for i in dat]

    def objective(out: model.FusionOutput, target: torch.Tensor) -> torch.Tensor:
        def kd(logits, feat):
            loss = F.cross_entropy(logits, target) + logit_kd_loss(logits, out.t_logits)
            return loss + feature_kd_loss(feat, out.t_feat) if feature_loss else loss
        return (F.cross_entropy(out.t_logits, target) + alpha * kd(out.a_logits, out.a_feat)
                + beta * kd(out.v_logits, out.v_feat))

    # The authors' layers call nn.Dropout, i.e. F.dropout, not our faster draw of the same mask (the
    # attention's, in magtkd.model, and the streams', through magtkd.packing.Layout.dropout).
    model.dropout = packing.dropout = F.dropout
    train = AuthorsDataset("train")
    width = int(train.f["text"][train.keys[0]][0].shape[0])
    torch.manual_seed(seed)
    fusion = model.AnchorGatedTransformer(width, spec.num_classes, spec.n_speaker, 8, 0.5)
    optimizer = torch.optim.AdamW(fusion.parameters(), lr=1e-4, weight_decay=1e-6)
    n_batches = math.ceil(len(train) / 16)
    # The stage's schedule (magtkd.schedule.reference_schedule at the authors' global batch 16: counted in
    # steps as they counted it), built from its parts since this loop has no DialogueBatches or FitConfig.
    scheduler = LambdaLR(optimizer, WarmupDecay(*schedule_steps(len(train), n_batches, epochs)))
    # The stage's shuffle (a generator seeded with the seed, one permutation per epoch), so both loops
    # see the same batches; the loader's own generator keeps it off the global one.
    order = torch.Generator().manual_seed(seed)
    rows = []
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        loader = DataLoader(train, batch_size=16, sampler=torch.randperm(len(train), generator=order).tolist(),
                            collate_fn=train.collate_fn, generator=torch.Generator())
        fusion.train()
        losses, preds, labels, masks = [], [], [], []
        for data in loader:
            optimizer.zero_grad()
            textf, visuf, acouf, qmask, umask, label = data[:-1]
            qmask = qmask.permute(1, 0, 2)
            lengths = [(umask[j] == 1).nonzero().tolist()[-1][0] + 1 for j in range(len(umask))]
            spk_idx = torch.argmax(qmask, -1)
            for i, x in enumerate(lengths):
                spk_idx[i, x:] = spec.n_speaker  # the padding row, dialogue by dialogue
            mask = umask.bool()
            out = fusion(textf.permute(1, 0, 2), acouf.permute(1, 0, 2), visuf.permute(1, 0, 2), spk_idx, mask)
            loss = objective(model.FusionOutput(*(o[mask] for o in out)), label[mask])
            preds.append(torch.argmax(out.t_logits, -1).view(-1).cpu().numpy())
            labels.append(label.view(-1).cpu().numpy())
            masks.append(umask.view(-1).cpu().numpy())
            losses.append(loss.item() * masks[-1].sum())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(fusion.parameters(), 10.0)
            optimizer.step()
            scheduler.step()
        rows.append({"epoch": epoch, "train_seconds": time.perf_counter() - start,
                     "train_loss": float(np.sum(losses) / np.sum(np.concatenate(masks)))})
    return rows


def child(args: argparse.Namespace) -> None:
    """Run one loop in this (fresh) process and print one JSON line of measurements."""
    import torch

    start = time.perf_counter()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    feature_dir = Path(args.work) / "feature"
    if args.loop == "authors":
        curve = authors_epochs(args.child, feature_dir, args.epochs)
    else:
        fusion = importlib.import_module(f"{args.child}.multimodal_fusion")
        curve = fusion.main(["--feature_dir", str(feature_dir), "--save_dir", str(Path(args.work) / args.loop),
                             "--epochs", str(args.epochs), "--device", "cpu",
                             "--packed", str(args.loop == "packed")])["epochs"]
    print(json.dumps({
        "train_seconds": [c["train_seconds"] for c in curve],
        "train_loss": [c["train_loss"] for c in curve],
        "total_seconds": time.perf_counter() - start,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_imports_mib": rss_before / 1024,
        "torch_threads": torch.get_num_threads(),
    }))


def run_child(name: str, loop: str, work: str, epochs: int) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", name, "--loop", loop, "--work", work, "--epochs", str(epochs)],
        capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"},
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"{name} {loop} benchmark failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def padding_ratio(feature_dir: Path, seed: int = 0, batch: int = 16, draws: int = 50) -> float:
    """Padded grid cells per real utterance of random batches of the training split."""
    import numpy as np

    from magtkd.artifacts import feature_path
    from magtkd.pickles import load_features

    f = load_features(feature_path(feature_dir, "train"), keys=("text",))
    lengths = np.array([len(f["labels"][v]) for v in f["vids"]])
    rng, ratios = np.random.default_rng(seed), []
    for _ in range(draws):
        order = lengths[rng.permutation(len(lengths))]
        ratios.append(sum(len(c) * c.max() for c in np.array_split(order, math.ceil(len(order) / batch)))
                      / lengths.sum())
    return float(np.mean(ratios))


def parent(args: argparse.Namespace) -> None:
    from magtkd.synthetic.features import write_synthetic_features

    width = 128 if args.quick else 768
    shrink = 8 if args.quick else 1
    rows = []
    for name in args.datasets:
        sizes = {s: (max(1, d // shrink), max(d // shrink, u // shrink)) for s, (d, u, _, _) in SIZES[name].items()}
        with tempfile.TemporaryDirectory(prefix=f"bench_fusion_{name}_") as work:
            write_synthetic_features(Path(work) / "feature", dataset_spec(name), {s: d for s, (d, _) in sizes.items()},
                                     width=width, seed=0, n_utterances={s: u for s, (_, u) in sizes.items()},
                                     length_sd={s: sd for s, (_, _, sd, _) in SIZES[name].items()},
                                     max_len=max(longest for *_, longest in SIZES[name].values()))
            ratio = padding_ratio(Path(work) / "feature")
            measured = {loop: run_child(name, loop, work, args.epochs) for loop in ("authors", "ours", "packed")}
        rows.append((name, sizes["train"], width, ratio, measured))
    load = os.getloadavg()[0]
    print(f"fusion training epoch on CPU ({os.cpu_count()} cores, 1-min load average {load:.1f} at the end), "
          f"batch 16 dialogues, {args.epochs} epochs each; seconds per epoch: mean (min)")
    print(f"{'dataset':8} {'train dlg/utt':>14} {'width':>5} {'padding':>7} {'authors s':>15} {'ours s':>15} "
          f"{'packed s':>15} {'ours/packed':>11} {'peak RSS MiB a/o/p':>19} {'threads':>7}")
    for name, (d, u), w, ratio, m in rows:
        mean = {loop: sum(m[loop]["train_seconds"]) / len(m[loop]["train_seconds"]) for loop in m}
        cells = [f"{mean[loop]:.2f} ({min(m[loop]['train_seconds']):.2f})" for loop in ("authors", "ours", "packed")]
        rss = "/".join(f"{m[loop]['peak_rss_mib']:.0f}" for loop in ("authors", "ours", "packed"))
        print(f"{name:8} {f'{d}/{u}':>14} {w:5d} {ratio:7.2f} {cells[0]:>15} {cells[1]:>15} {cells[2]:>15} "
              f"{mean['ours'] / mean['packed']:10.2f}x {rss:>19} {m['ours']['torch_threads']:7d}")


def main() -> None:
    from magtkd.flag_parser import HelpFormatter  # every flag's default shown once
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--quick", action="store_true", help="width 128 and 1/8 of the dialogues")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per loop")
    p.add_argument("--datasets", nargs="+", default=["IEMOCAP", "MELD"], choices=sorted(SIZES),
                   help="the feature sizes to time")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--loop", choices=("authors", "ours", "packed"), help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    child(args) if args.child else parent(args)


if __name__ == "__main__":
    main()
