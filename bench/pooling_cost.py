"""Pooling cost: forward+backward step time of eos / mean / ata, and of the naive ATA.

The naive way runs the whole model with eager attention and ``output_attentions=True`` (every
layer's attention map materialized) and pools with the last map's column sums. Variants are
interleaved round-robin (the order rotated each round) and the median is reported, so load on a
shared machine hits all alike. Target (issue 7): ata within 5% of mean at every length.

    OMP_NUM_THREADS=2 python bench/pooling_cost.py --lengths 128 512 1024 --batch 16 --reps 5 \\
        --threads 2
"""

from __future__ import annotations

# _common first: importing it sets the offline environment (HF_HUB_OFFLINE, ...)
from _common import Report, median, parse, parser, spread, time_interleaved, verdict

# isort: split
import torch

from harness.config import ModelSettings
from harness.embedder import Batch, Embedder
from harness.pooling import pool, received_attention

NAME = "pooling_cost"
QUICK = {"lengths": [32], "batch": 2, "reps": 1}


def make_embedder(pooling: str, attn: str, device: str, checkpointing: bool = False) -> Embedder:
    settings = ModelSettings(pooling=pooling, attn_implementation=attn, lora={"r": 8, "alpha": 16})
    emb = Embedder.from_settings(settings, device, lora=True, gradient_checkpointing=checkpointing)
    emb.train()
    return emb


def naive_step(emb: Embedder, batch: Batch) -> torch.Tensor:
    """The whole model in eager mode, every attention map returned, ATA from the last one."""
    b = batch.to(emb.device)
    out = emb.model(
        input_ids=b.input_ids,
        attention_mask=b.attention_mask,
        position_ids=b.position_ids,
        output_attentions=True,
    )
    probs = out.attentions[-1]  # (B, H, L, L)
    received = (probs * b.attention_mask[:, None, :, None]).sum(dim=(1, 2))
    return pool(out.last_hidden_state.float(), b.attention_mask, b.pool_mask, "ata", received)


def paired(times: dict[str, list[float]]) -> str:
    """ata / mean within each round (the two ran back to back): median (min–max)."""
    ratios = [a / m for a, m in zip(times["ata"], times["mean"])]
    return f"{median(ratios):.3f} ({min(ratios):.3f}–{max(ratios):.3f})"


def step(name: str, emb: Embedder, batch: Batch) -> None:
    out = naive_step(emb, batch) if name == "naive-ata" else emb(batch)
    out.float().pow(2).sum().backward()
    emb.zero_grad(set_to_none=True)


def received_cost(emb: Embedder, batch: Batch, reps: int = 3, sync=None) -> float:
    """Seconds for ATA's own work alone: the received attention of the last layer, forward +
    backward, on random post-rotary q / k of this model's shapes (best of ``reps``). Steadier than
    the difference of two step medians, which carries the step's run-to-run noise."""
    cfg = emb.model.config
    b, length = batch.shape
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    q = torch.randn(
        b, cfg.num_attention_heads, length, head_dim, device=emb.device, requires_grad=True
    )
    k = torch.randn(
        b, cfg.num_key_value_heads, length, head_dim, device=emb.device, requires_grad=True
    )
    g = torch.randn(b, length, device=emb.device)
    mask = batch.attention_mask.to(emb.device)

    def run() -> None:
        (received_attention(q, k, head_dim**-0.5, mask, causal=True) * g).sum().backward()

    return min(time_interleaved({"own": run}, reps, warmup=1, sync=sync)["own"])


def maps_gb(emb: Embedder, batch: int, length: int) -> float:
    """Size of the naive way's attention maps (one fp32 (B, H, L, L) map per layer), in GB;
    backward keeps at least these alive at once."""
    cfg = emb.model.config
    return cfg.num_hidden_layers * batch * cfg.num_attention_heads * length**2 * 4 / 1e9


def free_gb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info()[0] / 1e9
    import psutil

    return psutil.virtual_memory().available / 1e9


def main() -> None:
    ap = parser(__doc__, NAME)
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute each layer in backward (all variants): batch 16 at 512+ tokens keeps "
        "~18 GB of activations otherwise, more than a 24 GB machine holds",
    )
    args = parse(ap, QUICK)

    gc = args.gradient_checkpointing
    variants = {
        "eos": make_embedder("eos", "sdpa", args.device, gc),
        "mean": make_embedder("mean", "sdpa", args.device, gc),
        "ata": make_embedder("ata", "sdpa", args.device, gc),
        "naive-ata": make_embedder("mean", "eager", args.device, gc),
    }
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else None
    words = "the model reads this sentence , and then another one . " * 200
    rows = []
    skipped: list[str] = []
    for length in args.lengths:
        emb0 = variants["mean"]
        batch = emb0.collate([emb0.tokenize_one(words, None, length) for _ in range(args.batch)])
        assert batch.shape == (args.batch, length), batch.shape
        need, free = maps_gb(variants["naive-ata"], args.batch, length), free_gb(args.device)
        run = {n: e for n, e in variants.items() if n != "naive-ata" or need < free / 2}
        if len(run) < len(variants):
            skipped.append(
                f"naive ATA skipped at length {length}: its attention maps alone need "
                f"~{need:.1f} GB, {free:.1f} GB free"
            )
            print(skipped[-1], flush=True)
        calls = {n: (lambda n=n, e=e, b=batch: step(n, e, b)) for n, e in run.items()}
        times = time_interleaved(calls, args.reps, warmup=1, sync=sync)
        med = {k: median(v) for k, v in times.items()}
        own = received_cost(variants["ata"], batch, sync=sync)
        rows.append((length, med, times, need, own))
        print(
            f"L={length}: "
            + ", ".join(f"{k} {v:.3f}s" for k, v in med.items())
            + f", ata's own work {own:.3f}s",
            flush=True,
        )

    report = Report(
        "Pooling cost: forward+backward step time (median of interleaved reps)", device=args.device
    )
    report.para(
        f"Model: packaged SmolLM2-135M-Instruct + LoRA r=8, fp32, batch {args.batch}, "
        + ("gradient checkpointing on (every variant), " if gc else "")
        + f"{args.reps} reps after one warm-up round; spread = min–max of the reps. Naive maps = "
        "the fp32 attention maps the naive way materializes (one per layer, kept for backward); "
        "it is skipped where they would take more than half the free memory."
    )
    report.table(
        [
            "length",
            "eos (s)",
            "mean (s)",
            "ata (s)",
            "naive ata (s)",
            "ata / mean",
            "ata / mean per round",
            "ata's own work (s)",
            "own work / mean",
            "naive / ata",
            "ata spread",
            "naive maps (GB)",
        ],
        [
            (
                length,
                f"{m['eos']:.3f}",
                f"{m['mean']:.3f}",
                f"{m['ata']:.3f}",
                f"{m['naive-ata']:.3f}" if "naive-ata" in m else "skipped",
                f"{m['ata'] / m['mean']:.3f}",
                paired(t),
                f"{own:.3f}",
                f"{own / m['mean']:.1%}",
                f"{m['naive-ata'] / m['ata']:.2f}" if "naive-ata" in m else "–",
                spread(t["ata"]),
                f"{need:.1f}",
            )
            for length, m, t, need, own in rows
        ],
    )
    if skipped:
        report.para("; ".join(skipped) + ".")
    worst = max(m["ata"] / m["mean"] for _, m, _, _, _ in rows)
    worst_own = max(own / m["mean"] for _, m, _, _, own in rows)
    report.para(
        f"Target: ata within 5% of mean at every length: {verdict(worst <= 1.05)} "
        f"(worst ata / mean {worst:.3f}). ATA's own work (the last layer's received attention, "
        f"forward + backward, timed alone on the same shapes) is at most {worst_own:.1%} of a mean "
        "step: where the step ratio strays further from 1 than that, it is run-to-run noise "
        "(see the per-round ratios: median, min–max of ata / mean within one round)."
        + (
            " Under checkpointing an ata step also skips recomputing its last layer (kept out of "
            "checkpointing so the captured attention matches), which offsets part of its own work."
            if gc
            else ""
        )
    )
    report.write(args.out)


if __name__ == "__main__":
    main()
