"""Pooling cost: forward+backward step time of eos / mean / ata, and of the naive ATA.

The naive way runs the whole model with eager attention and ``output_attentions=True`` (every
layer's attention map materialized) and pools with the last map's column sums. Variants are
interleaved round-robin and the median is reported, so load on a shared machine hits all alike.

    python bench/pooling_cost.py --lengths 128 512 1024 --batch 16 --reps 5
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from harness.config import ModelSettings  # noqa: E402
from harness.embedder import Embedder  # noqa: E402
from harness.pooling import pool  # noqa: E402


def make_embedder(pooling: str, attn: str, device: str) -> Embedder:
    settings = ModelSettings(pooling=pooling, attn_implementation=attn, lora={"r": 8, "alpha": 16})
    emb = Embedder.from_settings(settings, device, lora=True)
    emb.train()
    return emb


def naive_step(emb: Embedder, batch) -> torch.Tensor:
    """The whole model in eager mode, every attention map returned, ATA from the last one."""
    b = batch.to(emb.device)
    out = emb.model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids, output_attentions=True)
    probs = out.attentions[-1]  # (B, H, L, L)
    received = (probs * b.attention_mask[:, None, :, None]).sum(dim=(1, 2))
    return pool(out.last_hidden_state.float(), b.attention_mask, b.pool_mask, "ata", received)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is steadier on a shared machine)")
    ap.add_argument("--out", type=Path, default=Path("results/bench/pooling_cost.md"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    variants = {
        "eos": make_embedder("eos", "sdpa", args.device),
        "mean": make_embedder("mean", "sdpa", args.device),
        "ata": make_embedder("ata", "sdpa", args.device),
        "naive-ata": make_embedder("mean", "eager", args.device),
    }
    words = "the model reads this sentence , and then another one . " * 200
    rows = []
    for length in args.lengths:
        emb0 = variants["mean"]
        items = [emb0.tokenize_one(words, None, length) for _ in range(args.batch)]
        batch = emb0.collate(items)
        assert batch.shape == (args.batch, length), batch.shape
        times: dict[str, list[float]] = {k: [] for k in variants}
        for rep in range(args.reps + 1):  # first round is warm-up
            for name, emb in variants.items():
                if args.device == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                out = naive_step(emb, batch) if name == "naive-ata" else emb(batch)
                out.float().pow(2).sum().backward()
                emb.zero_grad(set_to_none=True)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                if rep:
                    times[name].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append((length, med))
        print(f"L={length}: " + ", ".join(f"{k} {v:.3f}s" for k, v in med.items()), flush=True)

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), torch {torch.__version__}, device {args.device}"
    if args.device == "cuda":
        machine += f" ({torch.cuda.get_device_name()})"
    lines = [
        "# Pooling cost: forward+backward step time (median of interleaved reps)",
        "",
        f"Machine: {machine}. Model: packaged SmolLM2-135M-Instruct + LoRA r=8, fp32, batch {args.batch}, {args.reps} reps.",
        "",
        "| length | eos (s) | mean (s) | ata (s) | naive ata (s) | ata / mean | naive / ata |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for length, m in rows:
        lines.append(
            f"| {length} | {m['eos']:.3f} | {m['mean']:.3f} | {m['ata']:.3f} | {m['naive-ata']:.3f} | "
            f"{m['ata'] / m['mean']:.3f} | {m['naive-ata'] / m['ata']:.2f} |"
        )
    lines += ["", "Command: `python bench/pooling_cost.py " + " ".join(os.sys.argv[1:]) + "`", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
