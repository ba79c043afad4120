"""Benchmark the fusion stage (docs/METHOD.md §5) on CPU: seconds per training epoch and peak RSS.

    python benchmarks/bench_fusion.py            # IEMOCAP- and MELD-sized synthetic features, width 768
    python benchmarks/bench_fusion.py --quick    # a smaller run (width 128, 1/8 of the dialogues)

Each dataset runs in a fresh subprocess (so its peak RSS is its own) through
``<DS>/multimodal_fusion.py``'s ``main`` with the reference's hyperparameters (batch 16
dialogues, lr 1e-4, dropout 0.5, 8 heads). The synthetic pickles are written
to a temporary folder by the parent first. Training seconds are the stage's own
per-epoch ``train_seconds``; ``eval`` is dev + test prediction per epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Real split sizes (docs/METHOD.md §1): split -> (dialogues, utterances).
SIZES = {
    "IEMOCAP": {"train": (108, 5163), "dev": (12, 647), "test": (31, 1623)},
    "MELD": {"train": (1038, 9989), "dev": (114, 1109), "test": (280, 2610)},
}


def child(args: argparse.Namespace) -> None:
    """Run the stage in this (fresh) process and print one JSON line of measurements."""
    from magtkd.pipeline import REPO, load_script

    fusion = load_script(REPO / args.child / "multimodal_fusion.py")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    result = fusion.main([
        "--feature_dir", str(Path(args.work) / "feature"), "--save_dir", str(Path(args.work) / "save"),
        "--epochs", str(args.epochs), "--device", "cpu",
    ])
    curve = result["curve"]
    print(json.dumps({
        "train_seconds": [c["train_seconds"] for c in curve],
        "eval_seconds": [c["eval_seconds"] for c in curve],
        "total_seconds": time.perf_counter() - start,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_imports_mib": rss_before / 1024,
        "torch_threads": __import__("torch").get_num_threads(),
    }))


def parent(args: argparse.Namespace) -> None:
    from magtkd.pipeline import dataset_spec
    from magtkd.synthetic.features import write_synthetic_features

    width = 128 if args.quick else 768
    shrink = 8 if args.quick else 1
    rows = []
    for name in args.datasets:
        sizes = {s: (max(1, d // shrink), max(d // shrink, u // shrink)) for s, (d, u) in SIZES[name].items()}
        with tempfile.TemporaryDirectory(prefix=f"bench_fusion_{name}_") as work:
            t0 = time.perf_counter()
            write_synthetic_features(Path(work) / "feature", dataset_spec(name), {s: d for s, (d, _) in sizes.items()},
                                     width=width, seed=0, n_utterances={s: u for s, (_, u) in sizes.items()})
            write_s = time.perf_counter() - t0
            proc = subprocess.run(
                [sys.executable, __file__, "--child", name, "--work", work, "--epochs", str(args.epochs)],
                capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"},
            )
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr)
                raise SystemExit(f"{name} benchmark failed (exit {proc.returncode})")
            m = json.loads(proc.stdout.strip().splitlines()[-1])
        train = m["train_seconds"]
        rows.append((name, sizes["train"], width, sum(train) / len(train), min(train),
                     sum(m["eval_seconds"]) / len(train), m["peak_rss_mib"], m["rss_after_imports_mib"],
                     m["torch_threads"], write_s))
    print(f"fusion benchmark on CPU ({os.cpu_count()} cores), batch 16 dialogues, {args.epochs} epochs each")
    print(f"{'dataset':8} {'train dlg/utt':>14} {'width':>5} {'s/epoch':>8} {'min':>7} {'eval s':>7} "
          f"{'peak RSS MiB':>12} {'of it imports':>13} {'threads':>7} {'write s':>7}")
    for name, (d, u), w, mean, fastest, ev, rss, base, threads, ws in rows:
        print(f"{name:8} {f'{d}/{u}':>14} {w:5d} {mean:8.2f} {fastest:7.2f} {ev:7.2f} {rss:12.0f} {base:13.0f} "
              f"{threads:7d} {ws:7.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="width 128 and 1/8 of the dialogues")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--datasets", nargs="+", default=["IEMOCAP", "MELD"], choices=sorted(SIZES))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    child(args) if args.child else parent(args)


if __name__ == "__main__":
    main()
