"""The GPU acceptance run: every CUDA path of the project once, PASS/FAIL/SKIP per check, a summary table.

    python benchmarks/gpu_check.py                    # --device cuda: one recent GPU, under 10 minutes
    python benchmarks/gpu_check.py --device cpu       # the same checks at tiny sizes, under 5 minutes on 2 cores
    python benchmarks/gpu_check.py --keep DIR         # keep the generated data and every run's output in DIR

Writes the tiny generated IEMOCAP and MELD releases and model stand-ins (`magtkd.synthetic`, prepared
by the datasets' preprocessing.py) into a temporary folder (on CPU the CSVs are cut to a few
utterances), then runs the scripts as a user would, each in its own process:

- ``pipeline IEMOCAP`` / ``pipeline MELD``: `python <DS>/pipeline.py --in_process` (what run.sh runs) end to
  end (fp32 first stage, fp16 KD with its gradient scaler, fusion with AdamW), every completion record complete;
- ``fusion packed`` vs ``fusion padded``: the same test predictions;
- ``workers``: text.py with 2 data-loading workers (forked after CUDA initialised);
- ``bf16 accum+checkpointing``: text.py --amp True --grad_accum 2 --grad_checkpointing True;
- ``resume KD`` / ``resume fusion``: killed (SIGKILL) after the first epoch's training state, resumed
  with --resume True, complete, and KD's state holds the gradient scaler (weights_only load);
- ``evaluation-only``: text.py and multimodal_fusion.py --train False, and predict.py on a dialogue;
- ``CUDA vs CPU features`` (CUDA only): extract_first_stage_features.py on both devices, max |diff|;
- ``real size fp32`` / ``real size bf16`` (CUDA only): benchmarks/bench_real_size.py one-step
  figures and peak memory for every stage.

Exit status 1 when any check FAILs. The figures of a GPU run go into benchmarks/README.md with the
hardware and the date.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
CUT = {"train": 16, "dev": 8, "test": 8}  # rows per split on CPU


class CheckFailed(Exception):
    pass


class Context:
    def __init__(self, root: Path, device: str, tiny: bool) -> None:
        self.root, self.device, self.tiny = root, device, tiny
        self.pdir = root / "pretrained_model"

    def data(self, ds: str) -> Path:
        return self.root / "datasets" / ds

    def out(self, ds: str, name: str) -> dict[str, Path]:
        base = self.root / "runs" / name
        return {"save_dir": base / ds / "save_model", "feature_dir": base / ds / "feature"}

    def run(self, argv: list[str], timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, *argv], env=ENV, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout)
        if check and done.returncode != 0:
            raise CheckFailed(f"{' '.join(argv[:3])} exited {done.returncode}: {tail(done.stderr)}")
        return done


def tail(text: str, lines: int = 3) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def stage_flags(ctx: Context, ds: str, folders: dict[str, Path], *extra: str) -> list[str]:
    return ["--data_dir", str(ctx.data(ds)), "--pretrained_dir", str(ctx.pdir), "--save_dir",
            str(folders["save_dir"]), "--feature_dir", str(folders["feature_dir"]), "--device", ctx.device, *extra]


def fusion_flags(folders: dict[str, Path], device: str, *extra: str) -> list[str]:
    return ["--feature_dir", str(folders["feature_dir"]), "--save_dir", str(folders["save_dir"]), "--device",
            device, "--lr", "1e-3", "--batch_size", "2", "--dropout", "0.1", *extra]


def prepare(ctx: Context) -> None:
    from IEMOCAP.preprocessing import main as prepare_iemocap
    from MELD.preprocessing import main as prepare_meld
    from magtkd.synthetic.__main__ import generate

    generate(ctx.root, seed=0)
    prepare_iemocap(["--data_dir", str(ctx.data("IEMOCAP"))])
    prepare_meld(["--data_dir", str(ctx.data("MELD"))])
    if ctx.tiny:
        for ds in ("IEMOCAP", "MELD"):
            spec = getattr(importlib.import_module(f"{ds}.config"), ds)  # the dataset's DatasetSpec
            for split, rows in CUT.items():
                path = ctx.data(ds) / spec.csv_names[split]
                lines = path.read_text(encoding="utf-8").splitlines()
                path.write_text("\n".join(lines[:rows + 1]) + "\n", encoding="utf-8")


def records_complete(folders: dict[str, Path]) -> list[str]:
    names = ["text.json", "audio.json", "video.json", "text_KD_audio.json", "text_KD_video.json",
             "multimodal_fusion_metrics.json"]
    paths = [folders["save_dir"] / n for n in names] + [folders["feature_dir"] / "first_stage_features.json",
                                                         folders["feature_dir"] / "video" / "extraction.json"]
    return [str(p) for p in paths if not p.is_file() or json.loads(p.read_text()).get("complete") is not True]


def check_pipeline(ctx: Context, ds: str) -> str:
    folders = ctx.out(ds, "pipeline")
    ctx.run([f"{ds}/pipeline.py", "--data_dir", str(ctx.data(ds)), "--pretrained_dir", str(ctx.pdir),
             "--save_dir", str(folders["save_dir"]), "--feature_dir", str(folders["feature_dir"]),
             "--device", ctx.device, "--epochs", "1", "--learning_rate", "1e-3", "--fusion_epochs", "2",
             "--fusion_args", "--lr 1e-3 --batch_size 2 --dropout 0.1", "--in_process"], timeout=900)
    missing = records_complete(folders)
    if missing:
        raise CheckFailed(f"incomplete records: {missing}")
    doc = json.loads((folders["save_dir"] / "multimodal_fusion_metrics.json").read_text())
    return f"fusion test wF1 {doc['test']['weighted_f1']:.4f}"


def check_packed_padded(ctx: Context) -> str:
    base = ctx.out("IEMOCAP", "pipeline")
    preds = {}
    for packed in ("True", "False"):
        folders = {"feature_dir": base["feature_dir"], "save_dir": ctx.out("IEMOCAP", f"packed_{packed}")["save_dir"]}
        ctx.run(["IEMOCAP/multimodal_fusion.py", *fusion_flags(folders, ctx.device, "--epochs", "2", "--packed",
                                                               packed)])
        preds[packed] = json.loads((folders["save_dir"] / "multimodal_fusion_best.json").read_text())["preds"]
    if preds["True"] != preds["False"]:
        raise CheckFailed("packed and padded test predictions differ")
    return f"{len(preds['True'])} test predictions equal"


def check_text(ctx: Context, name: str, *extra: str) -> str:
    folders = ctx.out("IEMOCAP", name)
    done = ctx.run(["IEMOCAP/text.py", *stage_flags(ctx, "IEMOCAP", folders, "--epochs", "1", *extra)])
    line = [x for x in done.stderr.splitlines() if "epoch 1/1:" in x]
    return line[-1].split("|")[-1].strip() if line else "ran"


def kill_after_first_state(argv: list[str], state: Path, timeout: float = 600) -> None:
    process = subprocess.Popen([sys.executable, *argv], env=ENV, cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    started = time.time()
    try:
        while not state.exists():
            if process.poll() is not None:
                raise CheckFailed(f"{argv[0]} ended (exit {process.returncode}) before writing {state}")
            if time.time() - started > timeout:
                raise CheckFailed(f"no training state after {timeout:.0f} s")
            time.sleep(0.01)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


def check_resume(ctx: Context, kind: str) -> str:
    import torch

    base = ctx.out("IEMOCAP", "pipeline")
    folders = {**ctx.out("IEMOCAP", f"resume_{kind}"), "feature_dir": base["feature_dir"]}
    save = folders["save_dir"]
    save.mkdir(parents=True, exist_ok=True)
    if kind == "KD":
        for name in ("text.bin", "text.json", "audio.bin", "audio.json"):
            shutil.copy2(base["save_dir"] / name, save / name)
        argv = ["IEMOCAP/KD.py", "--student", "audio", *stage_flags(ctx, "IEMOCAP", folders, "--epochs", "3")]
        state, record = save / "text_KD_audio.state.pt", save / "text_KD_audio.json"
    else:
        argv = ["IEMOCAP/multimodal_fusion.py", *fusion_flags(folders, ctx.device, "--epochs", "3")]
        state, record = save / "multimodal_fusion.state.pt", save / "multimodal_fusion_metrics.json"
    kill_after_first_state(argv, state)
    done = ctx.run(argv + ["--resume", "True"])
    if "resuming from epoch" not in done.stderr or not json.loads(record.read_text())["complete"]:
        raise CheckFailed(f"did not resume to a complete run: {tail(done.stderr)}")
    saved = torch.load(state, map_location="cpu", weights_only=True)
    if kind == "KD" and not saved["scaler"]:
        raise CheckFailed("the KD training state holds no gradient-scaler state")
    return f"resumed after epoch {done.stderr.split('resuming from epoch ')[1].split()[0]}" + (
        f", scale {saved['scaler']['scale']:g}" if kind == "KD" else "")


def check_evaluation(ctx: Context) -> str:
    import csv

    folders = ctx.out("IEMOCAP", "pipeline")
    ctx.run(["IEMOCAP/text.py", *stage_flags(ctx, "IEMOCAP", folders, "--train", "False")])
    ctx.run(["IEMOCAP/multimodal_fusion.py", *fusion_flags(folders, ctx.device, "--train", "False")])
    with open(ctx.data("IEMOCAP") / "IEMOCAP_test.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    first = [r for r in rows if r["Dialogue_ID"] == rows[0]["Dialogue_ID"]]
    conversation, out = ctx.root / "conversation.csv", ctx.root / "predictions.csv"
    with open(conversation, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(first[0]))
        writer.writeheader()
        writer.writerows(first)
    ctx.run(["IEMOCAP/predict.py", *stage_flags(ctx, "IEMOCAP", folders), "--conversation", str(conversation),
             "--out", str(out)])
    n = len(out.read_text(encoding="utf-8").splitlines()) - 1
    if n != len(first):
        raise CheckFailed(f"predict.py wrote {n} rows for {len(first)} utterances")
    return f"text/fusion --train False, predict.py: {n} utterances"


def check_cuda_vs_cpu(ctx: Context) -> str:
    import numpy as np

    from magtkd.artifacts import feature_path
    from magtkd.pickles import FEATURE_KEYS, load_features

    base = ctx.out("IEMOCAP", "pipeline")
    cpu = ctx.root / "runs" / "cpu_features"
    cpu.mkdir(parents=True, exist_ok=True)
    if not (cpu / "video").exists():
        os.symlink(base["feature_dir"] / "video", cpu / "video")
    ctx.run(["IEMOCAP/extract_first_stage_features.py", "--data_dir", str(ctx.data("IEMOCAP")), "--pretrained_dir",
             str(ctx.pdir), "--save_dir", str(base["save_dir"]), "--feature_dir", str(cpu), "--device", "cpu"])
    worst = 0.0
    for split in ("train", "dev", "test"):
        a = load_features(feature_path(base["feature_dir"], split))
        b = load_features(feature_path(cpu, split))
        for key in FEATURE_KEYS:
            for vid in a["vids"]:
                worst = max(worst, float(np.abs(np.asarray(a[key][vid]) - np.asarray(b[key][vid])).max()))
    if worst > 1e-2:
        raise CheckFailed(f"max |cuda - cpu| = {worst:.2e} > 1e-2")
    return f"max |cuda - cpu| = {worst:.2e} (tolerance 1e-2; fp32, TF32 off)"


def check_real_size(ctx: Context, amp: str) -> str:
    done = ctx.run(["benchmarks/bench_real_size.py", "--device", ctx.device, "--amp", amp], timeout=900)
    print(done.stdout[-4000:], flush=True)
    return "figures printed above"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (the same checks at tiny sizes)")
    p.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    p.add_argument("--real_size", default="auto", choices=("auto", "skip"),
                   help="run bench_real_size.py on CUDA (auto) or skip it")
    args = p.parse_args(argv)
    import torch

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        from magtkd.runtime import cuda_unavailable_hint

        print(f"FAIL  setup: --device {args.device} but CUDA is not available{cuda_unavailable_hint()}")
        return 1
    hardware = torch.cuda.get_device_name(torch.device(args.device)) if cuda else f"CPU, {os.cpu_count()} cores"
    print(f"gpu_check on {args.device} ({hardware}), torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    tmp = None if args.keep else tempfile.TemporaryDirectory(prefix="gpu_check_")
    root = args.keep or Path(tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    ctx = Context(root, args.device, tiny=not cuda)
    started = time.time()
    prepare(ctx)
    print(f"generated data and stand-ins in {time.time() - started:.0f} s", flush=True)
    checks: list[tuple[str, Callable[[], str] | str]] = [
        ("pipeline IEMOCAP", lambda: check_pipeline(ctx, "IEMOCAP")),
        ("pipeline MELD", lambda: check_pipeline(ctx, "MELD")),
        ("fusion packed = padded", lambda: check_packed_padded(ctx)),
        ("workers", lambda: check_text(ctx, "workers", "--num_workers", "2")),
        ("bf16 accum+checkpointing", lambda: check_text(ctx, "bf16", "--amp", "True", "--grad_accum", "2",
                                                        "--grad_checkpointing", "True", "--batch_size", "2")),
        ("resume KD", lambda: check_resume(ctx, "KD")),
        ("resume fusion", lambda: check_resume(ctx, "fusion")),
        ("evaluation-only + predict", lambda: check_evaluation(ctx)),
        ("CUDA vs CPU features", (lambda: check_cuda_vs_cpu(ctx)) if cuda else "needs a GPU"),
        ("real size fp32", (lambda: check_real_size(ctx, "False")) if cuda and args.real_size == "auto"
         else "real sizes only make sense on a GPU" if not cuda else "--real_size skip"),
        ("real size bf16", (lambda: check_real_size(ctx, "True")) if cuda and args.real_size == "auto"
         else "real sizes only make sense on a GPU" if not cuda else "--real_size skip"),
    ]
    results = []
    for name, check in checks:
        t0 = time.time()
        if isinstance(check, str):
            status, note = "SKIP", check
        else:
            try:
                status, note = "PASS", check()
            except (CheckFailed, subprocess.TimeoutExpired, OSError, ValueError, KeyError) as err:
                status, note = "FAIL", f"{type(err).__name__}: {err}"
        results.append((name, status, time.time() - t0, note))
        print(f"{status}  {name} ({time.time() - t0:.0f} s): {note}", flush=True)
    print("\n| check | result | seconds | note |\n|---|---|---|---|")
    for name, status, seconds, note in results:
        print(f"| {name} | {status} | {seconds:.0f} | {note[:160]} |")
    failed = [r for r in results if r[1] == "FAIL"]
    print(f"\n{len(results) - len(failed)} of {len(results)} checks without failure in {time.time() - started:.0f} s; "
          f"{len(failed)} FAIL", flush=True)
    if tmp is not None:
        tmp.cleanup()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
