"""Text fine-tuning throughput, bf16 autocast vs fp32, with real-size configs and random weights.

    python benchmarks/bench_text_precision.py --device cuda            # RoBERTa-large size (24 x 1024)
    python benchmarks/bench_text_precision.py --device cpu --layers 2  # a quick check that it runs

Builds ``TextEncoder`` (magtkd.encoders) around a randomly initialised
RoBERTa with the roberta-large config (no download needed), feeds batches of
``--batch_size`` prompts of ``--tokens`` tokens (left-padded like the stage
would), and times the full training step of magtkd.engine.fit (forward under
``magtkd.runtime.autocast``, backward, clip 10, AdamW) after a warm-up. Prints
samples/s and peak GPU memory for fp32 and bf16. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import RobertaConfig, RobertaModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from magtkd.encoders import TextEncoder  # noqa: E402
from magtkd.runtime import autocast  # noqa: E402


def measure(device: torch.device, amp: bool, args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=50274, hidden_size=args.hidden, num_hidden_layers=args.layers,
                           num_attention_heads=args.hidden // 64, intermediate_size=4 * args.hidden,
                           max_position_embeddings=514, pad_token_id=1)
    model = TextEncoder(RobertaModel(config, add_pooling_layer=False), 768, 6).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(5, config.vocab_size, (args.batch_size, args.tokens), device=device)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 6, (args.batch_size,), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with autocast(device, amp):
            _, logits = model(ids, mask)
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"samples_per_s": args.batch_size / statistics.median(times), "peak_gib": peak}


def main() -> None:
    from magtkd.flag_parser import HelpFormatter  # every flag's default shown once
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to time it")
    p.add_argument("--layers", type=int, default=24, help="encoder layers")
    p.add_argument("--hidden", type=int, default=1024, help="hidden width")
    p.add_argument("--batch_size", type=int, default=4, help="prompts per step")
    p.add_argument("--tokens", type=int, default=512, help="tokens per prompt")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    args = p.parse_args()
    device = torch.device(args.device)
    print(f"device {device}; RoBERTa {args.layers} x {args.hidden}; batch {args.batch_size} x {args.tokens} tokens")
    rows = {"fp32": measure(device, False, args)}
    if device.type == "cuda":
        rows["bf16 autocast"] = measure(device, True, args)
    else:
        print("(bf16 autocast applies on CUDA only; CPU runs fp32)")
    print(f"{'precision':>14} {'samples/s':>10} {'peak GiB':>9}")
    for name, r in rows.items():
        print(f"{name:>14} {r['samples_per_s']:10.2f} {r['peak_gib']:9.2f}")


if __name__ == "__main__":
    main()
