"""Training steps at the real sequence lengths: median seconds per update, peak memory and, on CUDA, the host
synchronisations of a steady-state update, per stage and precision.

    python benchmarks/real_steps.py --root DIR --device cuda     # DIR/pretrained_model: the real-size stand-ins
    python benchmarks/real_steps.py --root DIR --device cpu      # the same shapes through any stand-ins (tiny ones)
    python -m magtkd.synthetic --out DIR --size real              # writes DIR/pretrained_model (2.6 GB); tiny: no --size

The inputs are built at the lengths the real datasets reach, not read from a dataset: text prompts of
512 tokens (the cap; prompts of long dialogues reach it), audio clips of 20 to 25 s (the stage keeps at
most 25 s of a clip), 8 uint8 frames at the image processor's crop size (224 px for the real models). Each
row builds the stage's encoder as the scripts do (`magtkd.pretrained.load_encoder`; KD: the frozen text
teacher in eval mode and MELD's objective, CE + 0.1 L_logit + L_feat, `MELD/KD.py`), then makes
``--warmup`` updates and ``--steps`` timed updates exactly as `magtkd.engine.fit` makes them
(`magtkd.engine.Step.update`: forward, loss, backward, clip 10, AdamW; batches of ``--batch`` copied from
pinned host memory with ``non_blocking``, as the loaders hand them over), and times one evaluation batch
of ``--eval_batch`` in inference mode.

Precisions: ``fp32`` (TF32 off, the authors'), ``tf32`` (``--tf32 True``), ``bf16`` (``--amp True``) for the
unimodal stages; ``fp16`` autocast with the gradient scaler for KD (its default). On CPU every forward is
fp32 (``fp32`` rows; KD with its scaler, as KD runs there). On CUDA one more update of each row runs under
``torch.cuda.set_sync_debug_mode("warn")``: every operation that makes the host wait for the GPU is
counted, with the file and line that called it (``syncs``, ``sync_sites``).

Prints ``ROW {json}`` per row as it finishes, then a table. `benchmarks/gpu_check.py` runs it as a check.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TEXT_TOKENS = 512  # the prompt cap (docs/METHOD.md §2)
AUDIO_SECONDS = (20.0, 25.0)  # 25 s = the 400000 samples the audio stages keep
NUM_CLASSES = 7  # MELD's (KD rows use MELD's objective)
UNIMODAL = ("text", "audio", "video")
KD = ("kd_audio", "kd_video")


def real_length_batch(modality: str, field: Any, n: int, rng: np.random.Generator) -> dict[str, Any]:
    """A collated batch of ``n`` items of ``modality`` at the real lengths, built by ``field``'s own collate."""
    if modality == "text":
        tokenizer = field.tokenizer
        low, high = 10, len(tokenizer) - 10  # ordinary tokens, clear of the special ones at either end
        items = [rng.integers(low, high, TEXT_TOKENS - 1).tolist() + [tokenizer.mask_token_id] for _ in range(n)]
    elif modality == "audio":
        items = [(rng.standard_normal(int(rng.uniform(*AUDIO_SECONDS) * 16000)).astype(np.float32)[:400_000], None)
                 for _ in range(n)]
    else:
        import torch

        shape = (8, 3, field.codec.height, field.codec.width)
        items = [torch.from_numpy(rng.integers(0, 256, shape, dtype=np.uint8)) for _ in range(n)]
    batch = field.collate(items)
    return {key: value for key, value in batch.items() if not key.endswith("_problems")}


def count_syncs(update: Callable[[], Any]) -> tuple[int, list[str]]:
    """Host synchronisations of ``update()`` on CUDA (``set_sync_debug_mode("warn")``): their number and
    where they were called from (``file:line``, repository files first)."""
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            update()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    sites = [f"{Path(w.filename).resolve()}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    ours = [s.replace(str(REPO) + "/", "") for s in sites if s.startswith(str(REPO))]
    return len(sites), ours + [s.split("site-packages/")[-1] for s in sites if not s.startswith(str(REPO))]


def peak_gb(device) -> float:
    """GB: torch.cuda.max_memory_allocated since the last reset on CUDA, else the process's peak RSS."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def timed_row(stage: str, precision: str, model, objective, batch: dict, eval_batch: dict, device,
              steps: int, warmup: int) -> dict[str, Any]:
    """``warmup`` + ``steps`` updates of ``model`` (the engine's `Step`) in ``precision``, one more under the
    sync counter (CUDA), and one evaluation batch; the row's figures."""
    import torch

    from magtkd import engine, loaders, runtime

    runtime.set_precision(device, precision == "tf32")
    amp, dtype = precision in ("bf16", "fp16"), torch.float16 if precision == "fp16" else torch.bfloat16
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16") if stage in KD else None
    step = engine.Step(optimizer, scheduler, params, 10.0, scaler)
    runner = loaders.ObjectiveModule(model, objective)
    pinned = {k: v.pin_memory() for k, v in batch.items()} if device.type == "cuda" else batch

    def loss_of(b: dict) -> torch.Tensor:
        with runtime.autocast(device, amp, dtype):
            return runner(loaders.to_device(b, device))

    def update() -> None:
        step.update(runner, [pinned], loss_of)

    def wait() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    model.train()
    for _ in range(warmup):
        update()
    wait()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        update()
        wait()
        seconds.append(time.perf_counter() - start)
    syncs, sites = count_syncs(update) if device.type == "cuda" else (None, [])
    peak = peak_gb(device)
    model.eval()
    with torch.inference_mode(), runtime.autocast(device, amp, dtype):
        encode = model.encode
        encode(loaders.to_device(eval_batch, device))  # first call: kernels chosen, memory allocated
        wait()
        start = time.perf_counter()
        encode(loaders.to_device(eval_batch, device))
        wait()
        eval_s = time.perf_counter() - start
    scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else None
    return {"stage": stage, "precision": precision, "median_s": statistics.median(seconds), "min_s": min(seconds),
            "steps": steps, "peak_gb": round(peak, 3), "eval_s": eval_s, "syncs": syncs, "sync_sites": sites[:8],
            "scale": scale, "shapes": {k: list(v.shape) for k, v in batch.items() if k.endswith(
                ("_ids", "_values", "_pixels"))}}


def stage_models(stage: str, pdir: Path, feature_dir: Path, device) -> tuple[Any, Any, list[tuple[str, Any]]]:
    """(student, objective, [(modality, field) of its training batch]) for ``stage``, as the scripts build them."""
    from magtkd import encoders, pretrained

    if stage in UNIMODAL:
        model, field = pretrained.load_encoder(stage, pdir, NUM_CLASSES, feature_dir)
        return model.to(device), encoders.encoder_cross_entropy, [(stage, field)]
    from MELD import KD as meld_kd

    modality = stage.split("_")[1]
    student, s_field = pretrained.load_encoder(modality, pdir, NUM_CLASSES, feature_dir)
    teacher, t_field = pretrained.load_encoder("text", pdir, NUM_CLASSES)
    teacher.to(device).eval().requires_grad_(False)
    objective = functools.partial(meld_kd.objective, teacher=teacher, tau=2.0, **meld_kd.KD_WEIGHTS)
    return student.to(device), objective, [("text", t_field), (modality, s_field)]


def run(root: Path, device_name: str, precisions: list[str], stages: list[str], batch: int, eval_batch: int,
        steps: int, warmup: int) -> list[dict[str, Any]]:
    import torch

    from magtkd import runtime

    device = runtime.resolve_device(device_name)
    rows = []
    for stage in stages:
        torch.manual_seed(0)
        rng = np.random.default_rng(0)
        model, objective, fields = stage_models(stage, root / "pretrained_model", root / "feature", device)
        train = {}
        for modality, field in fields:
            train.update(real_length_batch(modality, field, batch, rng))
        train.update(labels=torch.from_numpy(rng.integers(0, NUM_CLASSES, batch)), index=torch.arange(batch))
        modality, field = fields[-1]
        evaluation = real_length_batch(modality, field, eval_batch, rng)
        wanted = ["fp16"] if stage in KD else [p for p in precisions if p != "fp16"]
        for precision in wanted if device.type == "cuda" else wanted[:1]:
            row = timed_row(stage, precision, model, objective, train, evaluation, device, steps, warmup)
            row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
            print("ROW " + json.dumps(row), flush=True)
            rows.append(row)
            if device.type == "cuda":  # this row's optimizer state is gone: free its cached blocks
                torch.cuda.empty_cache()
        del model, objective
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> None:
    from magtkd.flag_parser import HelpFormatter  # every flag's default shown once
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--root", type=Path, required=True, help="folder holding pretrained_model/ (stand-ins)")
    p.add_argument("--device", default=None, help="cuda or cpu; default: CUDA when available")
    p.add_argument("--precisions", nargs="+", default=["fp32", "tf32", "bf16"], choices=("fp32", "tf32", "bf16"),
                   help="of the unimodal rows on CUDA (the CPU runs fp32; KD runs fp16 with its scaler)")
    p.add_argument("--stages", nargs="+", default=[*UNIMODAL, *KD], choices=(*UNIMODAL, *KD),
                   help="the stages to time")
    p.add_argument("--batch", type=int, default=4, help="training batch (the authors' 4)")
    p.add_argument("--eval_batch", type=int, default=16, help="evaluation batch (--eval_batch_size)")
    p.add_argument("--steps", type=int, default=5, help="timed updates per row")
    p.add_argument("--warmup", type=int, default=2, help="untimed updates first (kernel choice, allocator)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    rows = run(args.root, args.device, args.precisions, args.stages, args.batch, args.eval_batch, args.steps,
               args.warmup)
    import torch

    print(f"\nreal lengths ({TEXT_TOKENS} tokens, {AUDIO_SECONDS[0]:g}-{AUDIO_SECONDS[1]:g} s clips, 8 frames), "
          f"batch {args.batch}, eval batch {args.eval_batch}; torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}, load average {os.getloadavg()[0]:.1f}, {time.perf_counter() - started:.0f} s")
    print("| stage | precision | params M | median s/update | peak GB | eval s/batch | syncs per update | "
          "input shapes |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['precision']} | {r['params_m']} | {r['median_s']:.3f} | {r['peak_gb']:.2f} | "
              f"{r['eval_s']:.3f} | {'-' if r['syncs'] is None else r['syncs']} | {r['shapes']} |")


if __name__ == "__main__":
    main()
