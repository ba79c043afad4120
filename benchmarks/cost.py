"""What each model costs: parameters, forward FLOPs per utterance, peak memory of a training step and of
inference, and inference latency per utterance and per dialogue (README "Cost").

    python benchmarks/cost.py                        # real size and the demo's size, on CPU
    python benchmarks/cost.py --sizes demo           # the demo's tiny stand-ins only (a minute)
    python benchmarks/cost.py --device cuda          # on a GPU (memory: torch.cuda.max_memory_allocated)
    python benchmarks/cost.py --pretrained_dir pretrained_model   # the real downloaded models
    python benchmarks/cost.py --keep DIR             # keep / reuse the real-size stand-ins (2.6 GB) in DIR
    python benchmarks/cost.py --out cost.md          # also write the table, and cost.json beside it

Models, built as the stages build them (`magtkd.pretrained.load_encoder`, `magtkd.model`): the three
encoders (text: RoBERTa-large prompt encoder; audio: data2vec-audio-base; video: TimeSformer-base), the
distilled students (KD text->audio / text->video: the audio / video architecture, whose training step also
runs the frozen text teacher; their inference is the audio / video row's), and the fusion model (width =
the encoders' representation width, 8 heads, IEMOCAP's 6 classes and 2 speakers). Real size: the real
folders (``--pretrained_dir``) or random-weight stand-ins of the real architectures (``python -m
magtkd.synthetic --size real``); demo size: the demo's tiny stand-ins.

Inputs, stated in the table: a text prompt of ``--text_tokens`` tokens, ``--audio_seconds`` of 16 kHz
audio, 8 frames at the image processor's size (224 px real, 32 px demo); the fusion reads dialogues of
``--dialogue_length`` utterances (48: IEMOCAP's mean; MELD's is about 10).

- parameters: total and trainable in the training step (KD: the student trains, the teacher is frozen);
- forward FLOPs per utterance: ``torch.utils.flop_counter.FlopCounterMode`` over one forward at batch 1
  (matrix products, convolutions, attention; 2 FLOPs per multiply-add); the fusion: one dialogue / L;
- peak memory: each model in its own process: the bytes of its weights (and buffers; KD's training step:
  the teacher's too; each weight read once before, so that memory-mapped weights count once) plus the
  peak above the memory in use before the phase, on CPU the process's peak RSS (VmHWM, reset
  through /proc/self/clear_refs) above its RSS, on CUDA ``torch.cuda.max_memory_allocated`` above the
  allocated bytes: activations, gradients and AdamW's state for training. A training step =
  forward, loss, backward, clip, AdamW at the authors' batch (4 utterances; the fusion 16 dialogues);
  inference = one forward at batch 1 (the fusion: one dialogue) in inference mode;
- latency: the median of ``--repeats`` inference forwards after one warm-up; per dialogue: the encoders
  see one utterance at a time, so L x per utterance; the fusion reads the whole dialogue in one forward.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = ("text", "audio", "video", "kd_audio", "kd_video", "fusion")
TITLES = {"text": "text (RoBERTa prompt encoder)", "audio": "audio (data2vec-audio)", "video": "video (TimeSformer)",
          "kd_audio": "audio distilled (KD text->audio)", "kd_video": "video distilled (KD text->video)",
          "fusion": "fusion (anchor gated transformer)"}
CLASSES, SPEAKERS, TRAIN_BATCH, FUSION_BATCH = 6, 2, 4, 16


def rss() -> int:
    """Bytes: the process's current RSS (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_since(start: int, device) -> int:
    """Bytes above ``start`` at the peak since `reset_peak`."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) - start
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 - start
    return 0


def reset_peak(device) -> int:
    """Start a new peak from the memory in use now, and return that (bytes)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    return rss()


def inputs(model: str, encoder, args, batch: int, pixels: int) -> dict:
    """A batch of the stated input lengths for an encoder's ``encode``."""
    import torch

    g = torch.Generator().manual_seed(0)
    if model == "text":
        vocab = encoder.backbone.config.vocab_size
        return {"text_ids": torch.randint(5, vocab - 10, (batch, args.text_tokens), generator=g),
                "text_mask": torch.ones(batch, args.text_tokens, dtype=torch.long)}
    if model in ("audio", "kd_audio"):
        samples = int(args.audio_seconds * 16000)
        return {"audio_values": torch.randn(batch, samples, generator=g),
                "audio_mask": torch.ones(batch, samples, dtype=torch.long)}
    return {"video_pixels": torch.randn(batch, 8, 3, pixels, pixels, generator=g)}


def build(model: str, pdir: Path, feature_dir: Path):
    """(trained module, frozen teacher or None, width, pixels) as the stage builds them."""
    from magtkd.pretrained import load_encoder, load_image_processor, representation_width

    pixels = int(load_image_processor(pdir).crop_size["height"])
    if model == "fusion":
        from magtkd.model import AnchorGatedTransformer

        width = representation_width(pdir)
        return AnchorGatedTransformer(width, CLASSES, SPEAKERS, n_head=8, dropout=0.5), None, width, pixels
    modality = {"kd_audio": "audio", "kd_video": "video"}.get(model, model)
    encoder, _ = load_encoder(modality, pdir, CLASSES, feature_dir)
    teacher = None
    if model.startswith("kd_"):
        teacher, _ = load_encoder("text", pdir, CLASSES)
        teacher.eval().requires_grad_(False)
    return encoder, teacher, encoder.width, pixels


def resident(*modules) -> None:
    """Read every weight once: weights that were loaded memory-mapped (safetensors) join the RSS now, and
    are not counted again inside the first measured phase."""
    import torch

    with torch.no_grad():
        for module in modules:
            for t in [*module.parameters(), *module.buffers()] if module is not None else []:
                t.sum()


def fusion_batch(width: int, dialogues: int, length: int):
    """``dialogues`` random dialogues of ``length`` utterances as one packed batch."""
    import torch

    from magtkd.fusion_data import DialogueSet

    g = torch.Generator().manual_seed(0)
    data = DialogueSet(path=None, vids=list(range(dialogues)),
                       text=[torch.randn(length, width, generator=g) for _ in range(dialogues)],
                       audio=[torch.randn(length, width, generator=g) for _ in range(dialogues)],
                       video=[torch.randn(length, width, generator=g) for _ in range(dialogues)],
                       speakers=[torch.randint(0, SPEAKERS, (length,), generator=g) for _ in range(dialogues)],
                       labels=[torch.randint(0, CLASSES, (length,), generator=g) for _ in range(dialogues)])
    return data.collate(list(range(dialogues)), SPEAKERS, packed=True)


def measure(model: str, pdir: Path, args) -> dict:
    """One model in this process: its row of the table."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from magtkd.losses import logit_kd_loss
    from magtkd.runtime import resolve_device

    device = resolve_device(args.device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as feature_dir:
        module, teacher, width, pixels = build(model, pdir, Path(feature_dir))
        module.to(device)
        if teacher is not None:
            teacher.to(device)
        resident(module, teacher)
        length = args.dialogue_length
        # What the weights take, then each phase's peak above the memory in use before it: building the model
        # also imports its libraries, which are not the model's cost
        own = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
        weights = own + (sum(t.numel() * t.element_size() for t in [*teacher.parameters(), *teacher.buffers()])
                         if teacher is not None else 0)  # the training step holds the frozen teacher too

        def forward(batch_size: int):
            if model == "fusion":
                batch = fusion_batch(width, batch_size, length)
                moved = [x.to(device) if torch.is_tensor(x) else x for x in batch.inputs]
                return lambda: module(*moved), batch
            batch = {k: v.to(device) for k, v in inputs(model, module, args, batch_size, pixels).items()}
            return lambda: module.encode(batch), batch

        # Inference: batch 1 (the fusion: one dialogue), eval mode, no autograd
        module.eval()
        run_once, _ = forward(1)
        start = reset_peak(device)
        seconds = []
        with torch.inference_mode():
            for i in range(args.repeats + 1):
                begun = time.perf_counter()
                run_once()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i:
                    seconds.append(time.perf_counter() - begun)
            inference_peak = own + peak_since(start, device)  # a distilled student runs alone
            with FlopCounterMode(display=False) as counter:
                run_once()
        per_call = statistics.median(seconds)
        per_utterance = per_call / length if model == "fusion" else per_call

        # One training step at the authors' batch: forward, loss, backward, clip 10, AdamW
        module.train()
        step, batch = forward(FUSION_BATCH if model == "fusion" else TRAIN_BATCH)
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5)
        start = reset_peak(device)
        begun = time.perf_counter()
        out = step()
        if model == "fusion":
            loss = F.cross_entropy(batch.rows(out.t_logits), batch.rows(batch.labels.to(device)))
        else:
            labels = torch.zeros(out[1].shape[0], dtype=torch.long, device=device)
            loss = F.cross_entropy(out[1].float(), labels)
            if teacher is not None:
                with torch.no_grad():
                    text = inputs("text", teacher, args, TRAIN_BATCH, pixels)
                    _, t_logits = teacher.encode({k: v.to(device) for k, v in text.items()})
                loss = loss + logit_kd_loss(out[1].float(), t_logits.to(device).float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 10.0)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_seconds = time.perf_counter() - begun
        train_peak = weights + peak_since(start, device)
    params = sum(p.numel() for p in module.parameters()) + (sum(p.numel() for p in teacher.parameters())
                                                             if teacher is not None else 0)
    return {"model": model, "params": params, "trainable": sum(p.numel() for p in module.parameters()
                                                                if p.requires_grad),
            "gflops_per_utterance": counter.get_total_flops() / (length if model == "fusion" else 1) / 1e9,
            "train_peak_mib": train_peak / 2**20, "train_step_s": train_seconds,
            "inference_peak_mib": inference_peak / 2**20, "latency_utterance_ms": per_utterance * 1e3,
            "latency_dialogue_s": per_utterance * length, "pixels": pixels, "device": str(device)}


def stand_ins(size: str, root: Path) -> Path:
    """The pretrained folder of ``size`` (real / demo) stand-ins under ``root``, written when absent."""
    from magtkd.synthetic.__main__ import generate

    pdir = root / size / "pretrained_model"
    if not (pdir / "timesformer-base-finetuned-k400" / "config.json").is_file():
        generate(root / size, seed=0, what="models", size="real" if size == "real" else "tiny")
    return pdir


def run_one(model: str, pdir: Path, args) -> dict:
    """`measure` in a fresh process, so that its peak memory is its own."""
    command = [sys.executable, str(Path(__file__).resolve()), "--one", model, "--pretrained_dir", str(pdir),
               "--text_tokens", str(args.text_tokens), "--audio_seconds", str(args.audio_seconds),
               "--dialogue_length", str(args.dialogue_length), "--repeats", str(args.repeats)]
    command += ["--device", args.device] if args.device else []
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{model} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def count(n: int) -> str:
    """A parameter count: millions, or thousands for the demo's stand-ins."""
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def figure(x: float) -> str:
    """Three significant digits, without an exponent."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def table(rows: list[dict], args) -> str:
    """The markdown table of the rows (KD rows: inference as their student's architecture)."""
    head = ["model", "size", "parameters (total / trainable)", "input per utterance", "forward GFLOPs / utterance",
            "training step peak MiB", "inference peak MiB", "latency / utterance (ms)",
            f"latency / dialogue of {args.dialogue_length} (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        what = {"text": f"{args.text_tokens} tokens", "audio": f"{args.audio_seconds:g} s at 16 kHz",
                "video": f"8 x {r['pixels']}x{r['pixels']} frames",
                "fusion": f"dialogue of {args.dialogue_length}"}[r["model"].replace("kd_", "")]
        lines.append(f"| {TITLES[r['model']]} | {r['size']} | {count(r['params'])} / {count(r['trainable'])} | {what} "
                     f"| {figure(r['gflops_per_utterance'])} | {r['train_peak_mib']:.0f} | {r['inference_peak_mib']:.0f} "
                     f"| {figure(r['latency_utterance_ms'])} | {figure(r['latency_dialogue_s'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from magtkd.flag_parser import HelpFormatter  # every flag's default shown once
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--sizes", nargs="+", choices=("real", "demo"), default=["real", "demo"],
                   help="real: stand-ins of the real architectures; demo: the demo's tiny stand-ins")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="the models to measure")
    p.add_argument("--device", default=None, help="cpu or cuda; default: CUDA when available, else CPU")
    p.add_argument("--pretrained_dir", type=Path, default=None,
                   help="real size: the four real model folders; default: random-weight stand-ins")
    p.add_argument("--keep", type=Path, default=None, help="write / reuse the stand-ins here; default: a temporary folder")
    p.add_argument("--text_tokens", type=int, default=256, help="prompt length of the text encoder's input")
    p.add_argument("--audio_seconds", type=float, default=4.0, help="clip length of the audio encoder's input")
    p.add_argument("--dialogue_length", type=int, default=48, help="utterances of the fusion's dialogue")
    p.add_argument("--repeats", type=int, default=5, help="timed inference forwards (after one warm-up)")
    p.add_argument("--out", type=Path, default=None, help="also write the table here (and the rows as .json); default: print only")
    p.add_argument("--one", choices=MODELS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.pretrained_dir, args)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as temp:
        root = args.keep or Path(temp)
        for size in args.sizes:
            pdir = args.pretrained_dir if size == "real" and args.pretrained_dir else stand_ins(size, root)
            measured = {}
            for model in args.models:
                measured[model] = {**run_one(model, pdir, args), "size": size}
                if model in ("kd_audio", "kd_video") and model[3:] in measured:
                    base = measured[model[3:]]  # the student at inference is the audio / video architecture
                    measured[model].update({k: base[k] for k in ("gflops_per_utterance", "inference_peak_mib",
                                                                 "latency_utterance_ms", "latency_dialogue_s")})
                print(json.dumps(measured[model]), file=sys.stderr)
            rows += measured.values()
    text = table(rows, args)
    load = os.getloadavg()[0]
    note = (f"\n{time.strftime('%Y-%m-%d')}, {rows[0]['device']}, {os.cpu_count()} CPUs, torch threads "
            f"{__import__('torch').get_num_threads()}, 1-min load average at the end {load:.1f}\n")
    print(text + note)
    if args.out:
        args.out.write_text(text + note, encoding="utf-8")
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
