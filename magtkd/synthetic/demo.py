"""The demo: tiny generated data and models through both datasets' full pipelines, on CPU.

    python -m magtkd.synthetic.demo --workdir DIR

1. writes the tiny IEMOCAP and MELD release trees (real raw formats, with a
   learnable label signal) into ``DIR/datasets/`` and tiny random-weight
   stand-ins of the four pretrained models into ``DIR/pretrained_model/``;
2. runs, per dataset, the same pipeline as ``<DS>/run.sh`` (preparation + the
   eight stage scripts) with every artifact under ``DIR/<DS>/``; the two datasets
   side by side in two processes on a machine with two cores or more (``--jobs``);
3. writes ``DIR/results.json`` (test accuracy / weighted F1 of the kept fusion
   model, ``multimodal_fusion_best.bin`` = the best dev seed, its seed named,
   beside the mean ± std over seeds, the majority-class baseline, seconds per
   stage, and the seeds summary) and ``DIR/results.md`` (led by the mean ± std
   over the fusion seeds, the test-selected column for comparison with papers,
   the kept model's figure, per-class F1, plots).

Random-weight stand-ins learn nothing at the learning rates meant for pretrained
models (1e-5), so the demo trains the first stage for 5 epochs at
``--learning_rate 1e-3`` with a per-batch schedule, and the fusion model (16-40
tiny training dialogues) for 60 epochs with ``--lr 1e-3 --batch_size 2
--dropout 0.1 --schedule_epochs False`` (the authors' schedule counted in steps of
this batch: a 2-epoch warmup, as the demo ran before the schedule followed the
authors' curve in epochs by default) and three seeds (``--fusion_seeds``); every
other setting is the stage's default.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from ..cli import HelpFormatter
from ..artifacts import StageFiles, feature_path, read_record, write_json, write_text
from ..pickles import load_features
from ..pipeline import REPO, RUN_RECORD, PipelineError
from ..results import SEED_SUMMARY_NOTE, TEST_SELECTED_NOTE, majority_weighted_f1, summary
from ..runtime import setup_logging
from ..utils import nonnegative_int, positive_float, positive_int

log = logging.getLogger("magtkd")
DATASETS = ("IEMOCAP", "MELD")


def dataset_results(workdir: Path, name: str, seconds: dict[str, float], seeds: Sequence[int]) -> dict:
    """The headline test metrics are the KEPT model's (``multimodal_fusion_best.bin``: the best dev seed),
    recomputed from its predictions (``multimodal_fusion_best.json``), with its seed named; beside them the
    mean ± std over seeds (the figure to quote), the majority-class baseline and the seeds summary."""
    save_dir = workdir / name / "save_model"
    usual = StageFiles.fusion(save_dir)
    out = json.loads(usual.predictions.read_text(encoding="utf-8"))
    scores = summary(out["labels"], out["preds"])
    train = load_features(feature_path(workdir / name / "feature", "train"), keys=("text",))
    train_labels = [y for vid in train["vids"] for y in train["labels"][vid]]
    doc = json.loads(usual.seeds_summary.read_text(encoding="utf-8")) if len(seeds) > 1 else None
    result = {
        "test_accuracy": scores["accuracy"],
        "test_weighted_f1": scores["weighted_f1"],
        "kept_model": {"seed": doc["best_seed"] if doc else seeds[0], "checkpoint": usual.checkpoint.name,
                       "predictions": usual.predictions.name, "selection": "best dev weighted F1 over seeds"},
        "majority_weighted_f1": majority_weighted_f1(train_labels, out["labels"]),
        "test_utterances": len(out["labels"]),
        "seconds": seconds,
    }
    if doc:
        for key in ("test_accuracy", "test_weighted_f1"):
            result[f"{key}_mean"], result[f"{key}_std"] = doc["mean"][key], doc["std"][key]
        result["seeds"] = doc
    return result


def markdown(results: dict, seeds: Sequence[int]) -> str:
    """results.md: one row per dataset (mean ± std over seeds, the figure to quote), the kept model's figure,
    then per-class F1 and the plots."""
    if len(seeds) == 1:
        lines = [f"Fusion model, seed {seeds[0]}, epoch selected on dev.", "",
                 "| dataset | test accuracy | test weighted F1 | majority-class weighted F1 | seconds |",
                 "|---|---|---|---|---|"]
        for name, r in results.items():
            lines.append(f"| {name} | {r['test_accuracy']:.4f} | {r['test_weighted_f1']:.4f} | "
                         f"{r['majority_weighted_f1']:.4f} | {sum(r['seconds'].values()):.1f} |")
        return "\n".join(lines) + "\n"

    def pm(doc: dict, key: str, sub: str | None = None) -> str:
        mean, std = (doc["mean"][key], doc["std"][key]) if sub is None else \
            (doc["mean"][key][sub], doc["std"][key][sub])
        return f"{mean:.4f} ± {std:.4f}"

    lines = [f"Fusion model, {len(seeds)} seeds ({' '.join(map(str, seeds))}) per dataset. {SEED_SUMMARY_NOTE}",
             TEST_SELECTED_NOTE, "",
             "| dataset | test accuracy | test weighted F1 | test-selected weighted F1 (authors' protocol, "
             "comparison only) | majority-class weighted F1 | seconds |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        doc = r["seeds"]
        lines.append(f"| {name} | {pm(doc, 'test_accuracy')} | {pm(doc, 'test_weighted_f1')} | "
                     f"{pm(doc, 'test_selected_weighted_f1')} | {r['majority_weighted_f1']:.4f} | "
                     f"{sum(r['seconds'].values()):.1f} |")
    lines += ["", "Kept model (`multimodal_fusion_best.bin`, the best dev seed, the one `predict.py` uses; "
              "`test_accuracy` / `test_weighted_f1` in results.json, recomputed from its predictions in "
              "`multimodal_fusion_best.json`): "
              + ", ".join(f"{name} seed {r['kept_model']['seed']}: {r['test_accuracy']:.4f} / "
                          f"{r['test_weighted_f1']:.4f}" for name, r in results.items()) + "."]
    for name, r in results.items():
        doc, save = r["seeds"], f"{name}/save_model"
        labels = list(doc["mean"]["test_per_class_f1"])
        best = r["kept_model"]["seed"]
        lines += ["", f"## {name}", "", "Per-class test F1 (mean ± std over seeds):", "",
                  "| " + " | ".join(labels) + " |", "|" + "---|" * len(labels),
                  "| " + " | ".join(pm(doc, "test_per_class_f1", label) for label in labels) + " |", "",
                  f"Per seed: [{save}/multimodal_fusion_seeds.md]({save}/multimodal_fusion_seeds.md). "
                  "Curves and confusion matrix of each seed: "
                  + ", ".join(f"{seed} ([curves]({save}/multimodal_fusion_seed{seed}_curves.png), "
                              f"[confusion]({save}/multimodal_fusion_seed{seed}_confusion.png))" for seed in seeds)
                  + ".", "", f"Best dev seed ({best}), the kept model:", "",
                  f"![{name} curves]({save}/multimodal_fusion_curves.png)",
                  f"![{name} confusion matrix]({save}/multimodal_fusion_confusion.png)"]
    return "\n".join(lines) + "\n"


def run_dataset(workdir: Path, name: str, flags: Sequence[str], threads: int, quiet: bool = False) -> subprocess.Popen:
    """Start one dataset's pipeline: ``<DS>/pipeline.py`` (what ``<DS>/run.sh`` runs: preparation + the eight
    stage scripts) as its own process, with its folders under ``workdir`` and the pipeline ``flags``.
    ``threads``: torch's intra-op threads (0: torch's default). ``quiet``: this process runs beside the other
    dataset's (tqdm bars off, so two processes do not draw over each other; the epoch lines stay)."""
    env = dict(os.environ)
    if quiet:
        env["TQDM_DISABLE"] = "1"
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads in the pipeline and its stages
    folders = ["--data_dir", str(workdir / "datasets" / name), "--pretrained_dir", str(workdir / "pretrained_model"),
               "--save_dir", str(workdir / name / "save_model"), "--feature_dir", str(workdir / name / "feature")]
    return subprocess.Popen([sys.executable, str(REPO / name / "pipeline.py"), *folders, *flags], env=env)


def finish_dataset(workdir: Path, name: str, process: subprocess.Popen, seeds: Sequence[int]) -> dict:
    """Wait for a dataset's pipeline and return its `dataset_results`; a failed pipeline stops the demo
    (its stage printed the reason)."""
    status = process.wait()
    if status != 0:
        raise PipelineError(f"demo: the {name} pipeline failed (exit status {status}; its message is above)",
                            status if status > 0 else 1)
    record = read_record(workdir / name / "save_model" / RUN_RECORD) or {}
    result = dataset_results(workdir, name, record.get("seconds", {}), seeds)
    log.info("demo %s: %s", name, {k: v for k, v in result.items() if k not in ("seconds", "seeds")})
    return result


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--workdir", type=Path, required=True,
                   help="folder for the generated data and models, every stage's outputs and results.json/.md")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated data and models")
    p.add_argument("--device", default="cpu",
                   help="the device of every stage (cuda, cuda:1; default cpu: the figures the README quotes)")
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS), help="the datasets to run")
    p.add_argument("--epochs", type=positive_int, default=5, help="first-stage and KD epochs")
    p.add_argument("--learning_rate", type=positive_float, default=1e-3, help="first-stage and KD learning rate")
    p.add_argument("--fusion_epochs", type=positive_int, default=60, help="fusion epochs")
    p.add_argument("--fusion_args", default="--lr 1e-3 --batch_size 2 --dropout 0.1 --schedule_epochs False",
                   help="flags for multimodal_fusion.py (a few tiny dialogues need small batches; the schedule "
                        "counted in steps of 2 dialogues, a 2-epoch warmup, as the demo has always run)")
    p.add_argument("--fusion_seeds", type=int, nargs="+", default=[2024, 2025, 2026],
                   help="one fusion model per seed; results.json's headline figures are the kept (best dev) seed's")
    p.add_argument("--threads", type=nonnegative_int, default=1,
                   help="torch CPU threads (tiny models run fastest on one; 0: as many as torch picks)")
    p.add_argument("--subprocess", action="store_true",
                   help="run every stage as its own process, exactly like run.sh (slower)")
    p.add_argument("--jobs", type=nonnegative_int, default=0,
                   help="datasets run side by side in this many processes (0 = one per dataset, at most one per "
                        "CPU core; 1 = one after the other)")
    args = p.parse_args(None if argv is None else list(argv))
    setup_logging()
    workdir = args.workdir.resolve()
    started = time.time()

    from .__main__ import generate

    generate(workdir, seed=args.seed)
    # The datasets' pipelines share nothing but the generated pretrained folder (read only), and each
    # runs on one thread: side by side in their own processes they finish in the time of the longer one.
    jobs = min(args.jobs or os.cpu_count() or 1, len(args.datasets))
    # The pipeline's flags (the module docstring says why these), the same for every dataset
    flags = ["--device", args.device, "--epochs", str(args.epochs), "--learning_rate", str(args.learning_rate),
             "--per_batch_schedule", "--fusion_epochs", str(args.fusion_epochs),
             "--fusion_args", f"{args.fusion_args} --seeds {' '.join(map(str, args.fusion_seeds))}", "--force",
             *([] if args.subprocess else ["--in_process"])]
    results = {}
    for start in range(0, len(args.datasets), jobs):
        names = args.datasets[start:start + jobs]
        running = {name: run_dataset(workdir, name, flags, args.threads, quiet=jobs > 1) for name in names}
        results.update({name: finish_dataset(workdir, name, process, args.fusion_seeds)
                        for name, process in running.items()})
    total = round(time.time() - started, 1)
    write_json(workdir / "results.json", results)
    table = markdown(results, args.fusion_seeds) + f"\nTotal wall time {total} s (data generation included).\n"
    write_text(workdir / "results.md", table)
    print(table + f"Results: {workdir / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
