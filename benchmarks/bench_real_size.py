"""Every first-stage step at the real model sizes: seconds per step and peak memory.

    python benchmarks/bench_real_size.py                          # CPU, fp32
    python benchmarks/bench_real_size.py --device cuda --amp True # a GPU in bf16 autocast
    python benchmarks/bench_real_size.py --device cuda --amp False
    python benchmarks/bench_real_size.py --grad_checkpointing True  # the memory knob's effect
    python benchmarks/bench_real_size.py --keep DIR               # reuse/keep the 2.6 GB stand-ins in DIR
    python benchmarks/bench_real_size.py --stages kd_audio kd_audio_cached   # KD: teacher in the step vs cached
    python benchmarks/bench_real_size.py --size tiny --steps 20   # the tiny stand-ins; median of 20 updates

It writes, into a temporary folder, the tiny generated IEMOCAP release
(`magtkd.synthetic`, prepared by IEMOCAP/preprocessing.py) and the REAL-SIZE
random-weight stand-ins (``python -m magtkd.synthetic --size real``: RoBERTa-large,
data2vec-audio-base-960h, TimeSformer-base at 224 px x 8 frames, the videomae-base
processor at 224 px). Then each stage runs in its own process, so that its peak
memory is its own:

- ``frames``: IEMOCAP/video_feature_extract.py over every utterance (224 px crops);
  seconds per utterance.
- ``text``, ``audio``, ``video``, ``KD audio``, ``KD video``: the stage's encoders
  built as the scripts build them (`magtkd.pretrained.load_encoder`, the text teacher of
  KD frozen), batches from the stages' own loaders at the reference batch size 4,
  then ONE training update exactly as `magtkd.engine.fit` does it
  (`magtkd.engine.Step.update`: forward, loss, backward, grad clip 10, AdamW, schedule
  step) and ONE evaluation batch (inference mode, as `magtkd.loaders.SampleBatches.evaluate`).
  The objectives are the scripts': cross-entropy, and for KD cross-entropy +
  the correlation logit loss (IEMOCAP's defaults).
- ``KD audio cached``, ``KD video cached``: the same KD update with the teacher's outputs
  read from a cache (`magtkd.teacher_cache.TeacherOutputs`, KD.py's default) instead of
  running the teacher in the step. The cached outputs are computed beforehand with each
  sample alone (no padding, where the step pads to the batch's longest prompt), and the
  note gives the difference of the two losses on the same batch with the same draws.
- ``extract text/audio/video``: one batch of 4 test utterances (the features do not
  depend on the batch size; extract_first_stage_features.py defaults to 16) through
  the encoders that share that input (`magtkd.extract.representations`: text;
  audio + audio_kd; video + video_kd).

Columns: parameters (trainable / total in the process), seconds of the update and
of the evaluation batch, peak memory (the process's peak RSS on CPU, including
the ~0.5 GB of imports; ``torch.cuda.max_memory_allocated`` on CUDA), and the
size of the training state `fit` saves every epoch for ``--resume`` (weights +
two AdamW moments). A single step includes first-call overheads; it is a floor
for memory and an upper bound for time, not a throughput figure (``--steps N``:
the median of N updates on the same batch).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TRAIN_STAGES = ("text", "audio", "video", "kd_audio", "kd_video", "kd_audio_cached", "kd_video_cached")
EXTRACT_STAGES = ("extract_text", "extract_audio", "extract_video")
STAGES = ("frames", *TRAIN_STAGES, *EXTRACT_STAGES)
LABELS = {"frames": "frame extraction", "text": "text", "audio": "audio", "video": "video",
          "kd_audio": "KD text->audio", "kd_video": "KD text->video", "kd_audio_cached": "KD text->audio, teacher cached",
          "kd_video_cached": "KD text->video, teacher cached", "extract_text": "extract text",
          "extract_audio": "extract audio + audio_kd", "extract_video": "extract video + video_kd"}
LEARNING_RATES = {"text": 1e-5, "audio": 5e-6, "video": 1e-5, "kd_audio": 1e-5, "kd_video": 1e-5,  # IEMOCAP's
                  "kd_audio_cached": 1e-5, "kd_video_cached": 1e-5}
BATCH, EXTRACT_BATCH, NUM_CLASSES = 4, 4, 6


def prepare(root: Path, size: str = "real") -> None:
    """The tiny IEMOCAP release (prepared) and the stand-ins of ``size`` under ``root`` (skipped if present)."""
    from IEMOCAP.preprocessing import main as prepare_iemocap
    from magtkd.synthetic.__main__ import generate
    from magtkd.synthetic.iemocap import write_iemocap

    if not (root / "datasets" / "IEMOCAP" / "IEMOCAP_test.csv").is_file():
        write_iemocap(root / "datasets" / "IEMOCAP", 0)
        prepare_iemocap(["--data_dir", str(root / "datasets" / "IEMOCAP")])
    if not (root / "pretrained_model" / "timesformer-base-finetuned-k400" / "model.safetensors").is_file():
        generate(root, seed=0, what="models", size=size)


def peak_memory(device) -> float:
    """GB: torch.cuda.max_memory_allocated on CUDA, else the process's peak RSS."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    # VmHWM: the peak RSS of this process image. (ru_maxrss would also count the parent's
    # RSS at fork time, which Linux carries over the exec.)
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


def run_stage(stage: str, root: Path, device_name: str | None, amp: bool, checkpointing: bool, steps: int = 1) -> dict:
    """One stage in this process; returns its row."""
    import torch
    import torch.nn.functional as F
    from torch.optim.lr_scheduler import LambdaLR

    from IEMOCAP.config import IEMOCAP
    from magtkd import dataset, engine, pretrained, runtime
    from magtkd.extract import representations
    from magtkd.loaders import ObjectiveModule, SampleDataset, make_loader, split_loaders, to_device
    from magtkd.losses import logit_kd_loss
    from magtkd.schedule import WarmupDecay, schedule_steps

    runtime.setup_logging()
    device = runtime.resolve_device(device_name)
    pdir, data_dir, fdir = root / "pretrained_model", root / "datasets" / "IEMOCAP", root / "feature"
    torch.manual_seed(0)
    if stage == "frames":
        from IEMOCAP.video_feature_extract import main as extract

        start = time.perf_counter()
        out = extract(["--data_dir", str(data_dir), "--pretrained_dir", str(pdir), "--feature_dir", str(fdir)])
        seconds = time.perf_counter() - start
        n = max(out["extracted"], 1)
        return {"params": "-", "train_s": f"{seconds / n:.3f} s/utt", "eval_s": "-",
                "peak_gb": peak_memory(torch.device("cpu")), "state_gb": "-",
                "note": f"{out['extracted']} utterances from {out['videos']} videos in {seconds:.1f} s"}

    samples = dataset.load_samples(IEMOCAP, data_dir)
    if stage.startswith("extract_"):
        modality = stage.split("_")[1]
        keys = [modality] if modality == "text" else [modality, f"{modality}_kd"]
        encoders, field = {}, None
        for key in keys:
            encoder, field = pretrained.load_encoder(modality, pdir, NUM_CLASSES, fdir)
            encoders[key] = encoder.to(device).eval()
        loader = make_loader(SampleDataset(samples["test"][:EXTRACT_BATCH], [field]),
                             EXTRACT_BATCH, shuffle=False, num_workers=0)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        representations(encoders, loader, device, amp)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        total = sum(p.numel() for e in encoders.values() for p in e.parameters())
        return {"params": f"0 / {total / 1e6:.1f}M", "train_s": "-",
                "eval_s": f"{time.perf_counter() - start:.2f}", "peak_gb": peak_memory(device), "state_gb": "-",
                "note": f"one batch of {EXTRACT_BATCH}"}

    # Training stages: the encoders and fields the scripts build
    kd, cached = stage.startswith("kd_"), stage.endswith("_cached")
    modality = stage.split("_")[1] if kd else stage
    student, s_field = pretrained.load_encoder(modality, pdir, NUM_CLASSES, fdir)
    fields, teacher = [s_field], None
    if kd:
        teacher, t_field = pretrained.load_encoder("text", pdir, NUM_CLASSES)
        teacher.to(device).eval().requires_grad_(False)
        fields = [t_field, s_field]
    student.to(device)
    if checkpointing:
        engine.enable_grad_checkpointing(student)

    def step(batch: dict, train: bool):
        s_rep, s_logits = student.encode(batch)
        if not train:
            return None, s_logits
        loss = F.cross_entropy(s_logits.float(), batch["labels"])
        if kd:
            with torch.no_grad():
                _, t_logits = source["teacher"].encode(batch)
            loss = loss + logit_kd_loss(s_logits.float(), t_logits.float())
        return loss, s_logits

    source = {"teacher": teacher}  # where the KD step reads the teacher's outputs: the model, or its cache

    train = next(iter(split_loaders(samples, fields, BATCH, 0, 2024, ("train",))["train"]))
    dev = next(iter(split_loaders(samples, [s_field], BATCH, 0, 2024, ("dev",))["dev"]))
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATES[stage])
    # The authors' schedule as `magtkd.schedule.reference_schedule` builds it (counted in steps), from its parts
    n_samples = len(samples["train"])
    scheduler = LambdaLR(optimizer, WarmupDecay(*schedule_steps(n_samples, n_samples // BATCH, 10)))
    runner = ObjectiveModule(student, lambda _model, batch: step(batch, True)[0])

    def loss_of(batch: dict) -> torch.Tensor:
        batch = to_device(batch, device)
        with runtime.autocast(device, amp):
            return runner(batch)

    student.train()
    note, n_teacher = "", sum(p.numel() for p in teacher.parameters()) if teacher is not None else 0
    if cached:
        note, n_teacher = agreement(teacher, t_field, samples["train"], train, source, loss_of, device, amp), 0
        teacher = None  # the steps no longer hold the teacher
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for _ in range(steps):  # the same batch each time; the median leaves the first call's overheads out
        start = time.perf_counter()
        engine.Step(optimizer, scheduler, params, 10.0).update(runner, [train], loss_of)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    train_s = statistics.median(seconds)
    student.eval()
    start = time.perf_counter()
    with torch.inference_mode(), runtime.autocast(device, amp):
        step(to_device(dev, device), False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    eval_s = time.perf_counter() - start
    n_train = sum(p.numel() for p in params)
    n_total = n_train + sum(p.numel() for p in student.parameters() if not p.requires_grad)
    n_total += n_teacher
    shape = {k: tuple(v.shape) for k, v in train.items() if k in ("text_ids", "audio_values", "video_pixels")}
    return {"params": f"{n_train / 1e6:.1f}M / {n_total / 1e6:.1f}M", "train_s": f"{train_s:.2f}",
            "eval_s": f"{eval_s:.2f}", "peak_gb": peak_memory(device),
            "state_gb": f"{(sum(p.numel() for p in student.parameters()) * 4 + n_train * 8) / 1e9:.2f}",
            "note": "train batch " + ", ".join(f"{k} {v}" for k, v in shape.items()) + note}


def agreement(teacher, field, samples, batch: dict, source: dict, loss_of, device, amp: bool) -> str:
    """Put the teacher's outputs for ``batch``'s samples, each computed alone (no padding), into a
    `magtkd.teacher_cache.TeacherOutputs` over the training split as ``source["teacher"]``; return the
    note comparing the KD loss of ``batch`` with the teacher in the step (padded to the batch's longest
    prompt) and cached, at the same dropout and time-mask draws."""
    import numpy as np
    import torch

    from magtkd import runtime
    from magtkd.loaders import SampleDataset, to_device
    from magtkd.teacher_cache import TeacherOutputs

    dataset, index = SampleDataset(samples, [field]), batch["index"].tolist()
    with torch.inference_mode(), runtime.autocast(device, amp):
        alone = [teacher.encode(to_device(dataset.collate([dataset[i]]), device)) for i in index]
    rep = torch.zeros(len(samples), alone[0][0].shape[-1], device=device)
    logits = torch.zeros(len(samples), alone[0][1].shape[-1], device=device)
    for i, (r, z) in zip(index, alone):
        rep[i], logits[i] = r[0].float(), z[0].float()
    losses = []
    for outputs in (teacher, TeacherOutputs(rep, logits)):
        source["teacher"] = outputs
        torch.manual_seed(1)
        np.random.seed(1)  # data2vec draws its time masks with numpy
        with torch.no_grad():
            losses.append(float(loss_of(batch)))
    in_step, read = losses
    return (f"; KD loss with the teacher in the step {in_step:.6f}, cached {read:.6f} "
            f"(|difference| {abs(in_step - read):.1e}, relative {abs(in_step - read) / abs(in_step):.1e})")


def main(argv=None) -> None:
    from magtkd.flag_parser import HelpFormatter  # every flag's default shown once
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--device", default=None, help="cpu, cuda; default: CUDA when available")
    p.add_argument("--amp", default="False", choices=("True", "False"), help="bf16 autocast (CUDA only)")
    p.add_argument("--grad_checkpointing", default="False", choices=("True", "False"),
                   help="recompute the backbones' activations in backward")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="the stages to time")
    p.add_argument("--keep", type=Path, default=None,
                   help="folder for the stand-ins (kept; reused when present, whatever their --size); default: a "
                        "temporary one")
    p.add_argument("--size", choices=("real", "tiny"), default="real",
                   help="the stand-ins: the real architectures (2.6 GB) or the tiny ones of the tests")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: as many as torch picks)")
    p.add_argument("--steps", type=int, default=1,
                   help="training updates timed per stage (the same batch); the median is reported")
    p.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    p.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    amp, checkpointing = args.amp == "True", args.grad_checkpointing == "True"
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.child:
        row = run_stage(args.child, args.root, args.device, amp, checkpointing, args.steps)
        print("RESULT " + json.dumps(row), flush=True)
        return

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_real_size_") as tmp:
        root = args.keep or Path(tmp)
        t0 = time.perf_counter()
        prepare(root, args.size)
        setup_s = time.perf_counter() - t0
        rows = []
        order = [s for s in STAGES if s in args.stages]
        if "frames" not in order and not (root / "feature" / "video").is_dir():
            order.insert(0, "frames")  # the video stages read the stored frames
        if "frames" in order:
            shutil.rmtree(root / "feature" / "video", ignore_errors=True)  # time a full extraction
        for stage in order:
            cmd = [sys.executable, __file__, "--child", stage, "--root", str(root), "--amp", args.amp,
                   "--grad_checkpointing", args.grad_checkpointing, "--threads", str(args.threads),
                   "--steps", str(args.steps)]
            if args.device:
                cmd += ["--device", args.device]
            t0 = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            wall = time.perf_counter() - t0
            result = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not result:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"stage {stage} failed (exit {done.returncode})")
            row = json.loads(result[-1][len("RESULT "):])
            rows.append({"stage": LABELS[stage], **row, "process_s": wall})
            print(f"  {LABELS[stage]}: {row} ({wall:.0f} s with start-up)", flush=True)

    import platform

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    hardware = torch.cuda.get_device_name() if device.startswith("cuda") else \
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs"
    print(f"\n{args.size}-size stand-ins, IEMOCAP tiny data, batch {BATCH}, median of {args.steps} update(s); "
          f"device {device} ({hardware}), "
          f"amp {'bf16' if amp and device.startswith('cuda') else 'fp32'}, grad checkpointing {checkpointing}, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print(f"writing the data and stand-ins: {setup_s:.0f} s; load average at the end "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    memory = "peak CUDA GB" if device.startswith("cuda") else "peak RSS GB"
    print(f"| stage | params (trainable / total) | s per update | s per eval batch | {memory} | state GB | notes |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['params']} | {r['train_s']} | {r['eval_s']} | {r['peak_gb']:.2f} | "
              f"{r['state_gb']} | {r['note']} |")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
