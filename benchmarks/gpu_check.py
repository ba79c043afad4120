"""The GPU acceptance run: what must hold on a GPU, PASS/FAIL/SKIP per check, meant to take under 8 minutes on one
H100 (``--budget`` keeps it there; it has not run on one yet).

    python benchmarks/gpu_check.py                    # --device cuda
    python benchmarks/gpu_check.py --device cpu       # the same checks where a CPU can make them (the test suite runs it)
    python benchmarks/gpu_check.py --keep DIR         # keep the generated data, stand-ins and every run's output in DIR

Writes the tiny generated IEMOCAP and MELD releases and model stand-ins (`magtkd.synthetic`, prepared by the
datasets' preprocessing.py) into a temporary folder (on CPU the CSVs are cut to a few utterances) and, on CUDA,
the real-size stand-ins (RoBERTa-large, data2vec-audio-base, TimeSformer-base: 2.6 GB of random weights).
Then, each script in its own process as a user runs it:

- ``versions``: torch and transformers on this machine against requirements.txt's pins (a figure measured
  with other versions is not ours), the device, driver, CUDA, cuDNN and NCCL versions;
- ``real lengths fp32 + fp16 KD``: `benchmarks/real_steps.py`, training updates at the real sequence lengths
  (512-token prompts, 20-25 s clips, 8 frames at 224 px) through the real-size stand-ins, median seconds
  per update and peak memory, for text, audio and video in fp32 and KD in fp16 with its gradient scaler
  (on CPU: the same shapes through the tiny stand-ins, fp32);
- ``real lengths TF32 + bf16`` (CUDA): the same rows with ``--tf32 True`` and ``--amp True``;
- ``no host sync`` (CUDA): in one steady-state update of each of those rows
  (``torch.cuda.set_sync_debug_mode``), no operation of this repository makes the host wait for the GPU,
  and the video stage's whole update none at all (text and audio: Hugging Face's own, listed);
- ``pipeline IEMOCAP`` / ``pipeline MELD``: ``python <DS>/pipeline.py --in_process`` (what run.sh runs) end
  to end (fp32 first stage, fp16 KD with its scaler, fusion with AdamW), every completion record complete;
- ``fusion packed = padded``: the IEMOCAP pipeline's fusion model scored with packed rows and on the
  authors' padded grid: the same logits within 1e-4;
- ``workers`` / ``bf16 accum+checkpointing``: one text.py run with 2 persistent data-loading workers
  (forked after CUDA initialised), --amp True --grad_accum 2 --grad_checkpointing True;
- ``resume KD`` / ``resume fusion``: started with --resume True, killed (SIGKILL) after the first epoch's
  training state, restarted with the same command, complete; KD's gradient scaler continues at the scale
  the state holds (not 2^16 again);
- ``evaluation-only + predict``: text.py and multimodal_fusion.py --train False, and predict.py on a dialogue;
- ``CUDA vs CPU features`` (CUDA): extract_first_stage_features.py on both devices, max |diff|.

Each check prints its line as it finishes; the summary table follows. ``--budget`` (default 450 s on CUDA)
stops starting checks once spent (they SKIP, saying so), so the run fits a 10-minute call. Exit status 1
when any check FAILs. A GPU run's figures go into benchmarks/README.md with the hardware and the date.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
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
LOGIT_TOLERANCE = 1e-4  # packed vs padded fusion logits (fp32, TF32 off)


class CheckFailed(Exception):
    pass


class Context:
    def __init__(self, root: Path, device: str, tiny: bool) -> None:
        self.root, self.device, self.tiny = root, device, tiny
        self.pdir = root / "pretrained_model"
        self.real_rows: list[dict] | None = None  # real_steps.py's rows, shared by the checks that read them
        self.results: list[tuple[str, str, float, str]] = []  # (check, PASS/FAIL/SKIP, seconds, note) so far

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


# --------------------------------------------------------------------------- versions, real lengths, syncs

def pinned(package: str) -> str | None:
    for line in (REPO / "requirements.txt").read_text().splitlines():
        found = re.match(rf"{re.escape(package)}==([^\s#]+)", line.strip())
        if found:
            return found.group(1)
    return None


def check_versions(ctx: Context) -> str:
    import torch
    import transformers

    from magtkd.runtime import driver_version

    have = {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__}
    wrong = {name: (version, pinned(name)) for name, version in have.items() if version != pinned(name)}
    found = f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}"
    if ctx.device.startswith("cuda"):
        found += (f"; {torch.cuda.get_device_name()} (capability {'.'.join(map(str, torch.cuda.get_device_capability()))}"
                  f"), driver {driver_version()}, cuDNN {torch.backends.cudnn.version()}, "
                  f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}")
    if wrong:
        raise CheckFailed(found + "; not requirements.txt's pins: " + ", ".join(
            f"{name} {v} instead of {pin}" for name, (v, pin) in wrong.items()))
    return found


def real_rows(ctx: Context) -> list[dict]:
    """`real_steps.py`'s rows: run once (its lines are printed as they come), then shared."""
    if ctx.real_rows is None:
        root = ctx.root
        if not ctx.tiny:
            from magtkd.synthetic.__main__ import generate

            root = ctx.root / "real_size"
            if not (root / "pretrained_model" / "timesformer-base-finetuned-k400" / "model.safetensors").is_file():
                generate(root, seed=0, what="models", size="real")
        argv = [str(REPO / "benchmarks" / "real_steps.py"), "--root", str(root), "--device", ctx.device]
        # On CPU the rows prove the code path at real lengths (one update of 2, an evaluation batch of 2);
        # the figures that matter are a GPU's
        argv += (["--batch", "2", "--steps", "1", "--warmup", "0", "--eval_batch", "2"] if ctx.tiny
                 else ["--steps", "5", "--warmup", "2"])
        process = subprocess.Popen([sys.executable, *argv], env=ENV, cwd=REPO, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        rows = []
        for line in process.stdout:
            if line.startswith("ROW "):
                rows.append(json.loads(line[4:]))
                r = rows[-1]
                print(f"      {r['stage']} {r['precision']}: {r['median_s']:.3f} s/update (median of {r['steps']}), "
                      f"peak {r['peak_gb']:.2f} GB, eval batch {r['eval_s']:.3f} s"
                      + ("" if r["syncs"] is None else f", {r['syncs']} sync(s)"), flush=True)
            elif line.startswith("|") or line.startswith("real lengths"):
                print("      " + line.rstrip(), flush=True)
        if process.wait() != 0:
            raise CheckFailed(f"real_steps.py exited {process.returncode}: {tail(process.stderr.read())}")
        ctx.real_rows = rows
    return ctx.real_rows


def summary(rows: list[dict]) -> str:
    return "; ".join(f"{r['stage']} {r['precision']} {r['median_s']:.3f} s {r['peak_gb']:.1f} GB" for r in rows)


def check_real_lengths(ctx: Context) -> str:
    rows = [r for r in real_rows(ctx) if r["precision"] in ("fp32", "fp16")]
    bad = [r for r in rows if not (r["median_s"] > 0 and r["peak_gb"] > 0)]
    if len(rows) != 5 or bad:
        raise CheckFailed(f"rows {[(r['stage'], r['precision']) for r in rows]}, without figures: {bad}")
    kd = [r for r in rows if r["stage"].startswith("kd_")]
    if not ctx.tiny and not all(r["precision"] == "fp16" and r["scale"] for r in kd):
        raise CheckFailed(f"KD did not run fp16 with its scaler: {kd}")
    size = "tiny stand-ins at real lengths" if ctx.tiny else "real size"
    return f"{size}: {summary(rows)}" + ("" if ctx.tiny else f"; KD scale {', '.join(str(r['scale']) for r in kd)}")


def check_tf32_bf16(ctx: Context) -> str:
    rows = [r for r in real_rows(ctx) if r["precision"] in ("tf32", "bf16")]
    if len(rows) != 6:
        raise CheckFailed(f"expected text/audio/video in tf32 and bf16, got {[(r['stage'], r['precision']) for r in rows]}")
    return summary(rows)


def check_no_sync(ctx: Context) -> str:
    rows = [r for r in real_rows(ctx) if r["syncs"] is not None]
    ours = {f"{r['stage']} {r['precision']}": [s for s in r["sync_sites"] if s.startswith(("magtkd/", "IEMOCAP/",
                                                                                               "MELD/"))]
            for r in rows}
    video = [r for r in rows if r["stage"] == "video" and r["syncs"]]
    if any(ours.values()) or video or not rows:
        raise CheckFailed(f"syncs from this repository: { {k: v for k, v in ours.items() if v} }; video: "
                          f"{[(r['precision'], r['sync_sites']) for r in video]}")
    others = {f"{r['stage']} {r['precision']}": (r["syncs"], r["sync_sites"][:3]) for r in rows if r["syncs"]}
    return f"none from this repository or in video; elsewhere (per update, first sites): {others}"


# --------------------------------------------------------------------------- the stages as a user runs them

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
    import torch

    from magtkd.artifacts import StageFiles, feature_path
    from magtkd.checkpoints import load_trained_fusion, trained_fusion
    from magtkd.fusion_data import dialogue_logits, load_dialogues
    from magtkd.fusion_settings import FusionRequest

    folders = ctx.out("IEMOCAP", "pipeline")
    device = torch.device(ctx.device)
    files = StageFiles.fusion(folders["save_dir"])
    settings = trained_fusion(files, "IEMOCAP", FusionRequest(default_features=("audio_kd", "video")))
    model = load_trained_fusion(settings, files.checkpoint).to(device).eval()
    test = load_dialogues(feature_path(folders["feature_dir"], "test"), settings.audio_feature,
                          settings.video_feature, device, settings.variant.modalities)
    worst = 0.0
    for batch in (2, 16):  # few dialogues per batch and all of them: little and much padding
        packed = dialogue_logits(model, test, batch, packed=True)
        padded = dialogue_logits(model, test, batch, packed=False)
        worst = max(worst, float((packed - padded).abs().max()))
    if not worst <= LOGIT_TOLERANCE:
        raise CheckFailed(f"max |packed - padded| logit = {worst:.2e} > {LOGIT_TOLERANCE:g}")
    return f"{len(packed)} test utterances: max |packed - padded| logit {worst:.1e} (tolerance {LOGIT_TOLERANCE:g})"


def check_workers(ctx: Context) -> str:
    folders = ctx.out("IEMOCAP", "workers")
    done = ctx.run(["IEMOCAP/text.py", *stage_flags(ctx, "IEMOCAP", folders, "--epochs", "1", "--num_workers", "2",
                                                   "--amp", "True", "--grad_accum", "2", "--grad_checkpointing",
                                                   "True", "--batch_size", "2")])
    line = [x for x in done.stderr.splitlines() if "epoch 1/1:" in x]
    return "2 persistent workers, bf16, accum 2, checkpointing: " + (line[-1].split("|")[-1].strip() if line else "ran")


def kill_after_first_state(argv: list[str], state: Path, timeout: float = 600) -> int:
    """Start ``argv``, SIGKILL it as soon as its first training state exists; the state's scale (KD) or 0."""
    import torch

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
    return torch.load(state, map_location="cpu", weights_only=True)["scaler"].get("scale", 0)


def check_resume(ctx: Context, kind: str) -> str:
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
    argv += ["--resume", "True"]  # the one command: starts saving the state, and restarts from it
    scale = kill_after_first_state(argv, state)
    done = ctx.run(argv)
    if "resuming from epoch" not in done.stderr or not json.loads(record.read_text())["complete"]:
        raise CheckFailed(f"did not resume to a complete run: {tail(done.stderr)}")
    note = f"resumed after epoch {done.stderr.split('resuming from epoch ')[1].split()[0]}"
    if kind == "KD":
        restored = re.search(r"gradient scaler restored at scale (\S+)", done.stderr)
        if not scale or restored is None or abs(float(restored.group(1)) / float(scale) - 1) > 1e-5:  # %g: 6 digits
            raise CheckFailed(f"the state holds scale {scale}, the resumed run says "
                              f"{restored.group(0) if restored else 'nothing'}")
        note += f", scaler continued at the saved scale {float(scale):g}"
    return note


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


# --------------------------------------------------------------------------- the run

def checks(ctx: Context, cuda: bool) -> list[tuple[str, Callable[[], str] | str]]:
    """(name, check or the reason it is skipped), the most telling first (the budget may end the list)."""
    gpu = (lambda check: check) if cuda else (lambda _check: None)
    return [
        ("versions", lambda: check_versions(ctx)),
        ("real lengths fp32 + fp16 KD", lambda: check_real_lengths(ctx)),
        ("real lengths TF32 + bf16", gpu(lambda: check_tf32_bf16(ctx)) or "TF32 and bf16 need a GPU"),
        ("no host sync", gpu(lambda: check_no_sync(ctx)) or "set_sync_debug_mode needs a GPU"),
        ("pipeline IEMOCAP", lambda: check_pipeline(ctx, "IEMOCAP")),
        ("fusion packed = padded", lambda: check_packed_padded(ctx)),
        ("resume KD", lambda: check_resume(ctx, "KD")),
        ("resume fusion", lambda: check_resume(ctx, "fusion")),
        ("workers", lambda: check_workers(ctx)),
        ("bf16 accum+checkpointing", lambda: "the workers run: --amp True --grad_accum 2 --grad_checkpointing True"
         if any(r[0] == "workers" and r[1] == "PASS" for r in ctx.results) else check_workers(ctx)),
        ("evaluation-only + predict", lambda: check_evaluation(ctx)),
        ("CUDA vs CPU features", gpu(lambda: check_cuda_vs_cpu(ctx)) or "needs a GPU"),
        ("pipeline MELD", lambda: check_pipeline(ctx, "MELD")),
    ]


def main(argv: list[str] | None = None) -> int:
    from magtkd.flag_parser import HelpFormatter  # every flag's default shown once
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda or cpu (the same checks at tiny sizes)")
    p.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it; default: a temporary folder, removed")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds after which no further check starts (they SKIP); default: 450 on CUDA, none on CPU")
    args = p.parse_args(argv)
    import torch

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        from magtkd.runtime import cuda_unavailable_hint

        print(f"FAIL  setup: --device {args.device} but CUDA is not available{cuda_unavailable_hint()}")
        return 1
    budget = args.budget if args.budget is not None else (450.0 if cuda else float("inf"))
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
    for name, check in checks(ctx, cuda):
        t0 = time.time()
        if isinstance(check, str):
            status, note = "SKIP", check
        elif t0 - started > budget:
            status, note = "SKIP", f"the time budget ({budget:.0f} s, --budget) is spent"
        else:
            try:
                status, note = "PASS", check()
            except Exception as err:  # any error of a check is its FAIL; the checks after it still run
                status, note = "FAIL", f"{type(err).__name__}: {err}"
        ctx.results.append((name, status, time.time() - t0, note))
        print(f"{status}  {name} ({time.time() - t0:.0f} s): {note}", flush=True)
    print("\n| check | result | seconds | note |\n|---|---|---|---|")
    for name, status, seconds, note in ctx.results:
        print(f"| {name} | {status} | {seconds:.0f} | {note[:400]} |")
    failed = [r for r in ctx.results if r[1] == "FAIL"]
    print(f"\n{len(ctx.results) - len(failed)} of {len(ctx.results)} checks without failure in "
          f"{time.time() - started:.0f} s; {len(failed)} FAIL", flush=True)
    if tmp is not None:
        tmp.cleanup()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
