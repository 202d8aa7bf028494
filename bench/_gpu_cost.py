"""Sections ``cost`` and ``ata`` of ``bench/gpu_check.py``: the Mistral-7B architecture (random
weights) trained and encoded through the harness's own code, and ATA's step-time cost at two
lengths. Import ``_common`` first.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from _common import Report, median, spread, time_interleaved
from _gpu import (
    MISTRAL_7B,
    TINY,
    SyntheticSteps,
    attention_check,
    build_model,
    count,
    label,
    peak_flops,
    prepare,
    shared_embedders,
    synthetic_batch,
    train_step,
)
from _gpu_projection import projection, render_projection
from _gpu_run import Section, fit_batch, free_memory, peak_gb, reset_peak
from pooling_cost import paired, received_cost

from harness.config import POOLINGS, Experiment

# Timing order and priority: when the budget is short, variants are dropped from the end.
VARIANTS = (
    ("ata", "bidirectional"),
    ("mean", "bidirectional"),
    ("eos", "bidirectional"),
    ("ata", "causal"),
    ("mean", "causal"),
)


class Bench:
    """The model both sections use (one LoRA model behind an embedder per pooling), built on
    first use with the recipe of ``paper`` (experiments/base.yaml)."""

    def __init__(self, args: argparse.Namespace, paper: Experiment) -> None:
        self.args = args
        self.paper = paper
        self.device = torch.device(args.device)
        self.arch = TINY if args.tiny else MISTRAL_7B
        self.vocab = int(self.arch["vocab_size"])
        self.embs: dict[str, Any] = {}
        self.info: dict[str, Any] = {}
        # token ids stand in for texts: the input format only names strings; e5 needs no tokenizer
        self.settings = paper.model.model_copy(
            update={"template": "e5", "init_adapter": None, "init_adapter_sha256": None}
        )
        self.checkpointing = paper.train.gradient_checkpointing

    def setup(self, sec: Section) -> None:
        if self.embs:
            return
        tick = time.perf_counter()
        model, attn, notes = build_model(self.arch, self.settings, self.device)
        params = sum(p.numel() for p in model.parameters())
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.embs, self.shapes = shared_embedders(
            model, self.settings, self.device, POOLINGS, self.checkpointing
        )
        self.sync()
        t = self.paper.train
        self.optimizer = torch.optim.AdamW(
            self.embs["ata"].trainable_parameters(), lr=t.lr, weight_decay=t.weight_decay
        )
        self.info = {
            "arch": {k: v for k, v in self.arch.items() if k != "architectures"},
            "params": params,
            "linear_params": self.shapes.linear,
            "lora_params": self.shapes.lora,
            "attn_implementation": attn,
            "dtype": dtype,
            "build_s": time.perf_counter() - tick,
        }
        sec.notes.extend(notes)
        for mode in ("bidirectional", "causal"):
            line, ok = attention_check(self.embs["mean"], mode, self.vocab)
            (sec.notes if ok else sec.problems).append(line)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self, pooling: str, attention: str, inputs: tuple) -> float:
        """One training step of the harness (train.StepRunner, clip, AdamW) on ``inputs``."""
        emb = self.embs[pooling]
        prepare(emb, attention, self.checkpointing)
        examples, queries, docs = inputs
        runner = SyntheticSteps(emb, self.paper.train.temperature, (queries, docs))
        return train_step(runner, examples, self.optimizer, self.paper.train.max_grad_norm)

    def timed(self, fn: Callable[[], object]) -> float:
        self.sync()
        tick = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - tick

    def free(self) -> None:
        free_memory(list(self.embs.values()))

    def close(self) -> None:
        """Drop the model (the sweep's trials need the GPU's memory)."""
        self.embs, self.optimizer = {}, None
        free_memory()


# ---------------------------------------------------------------- section 1: cost


def cost_section(sec: Section, bench: Bench) -> None:
    args, t = bench.args, bench.paper.train
    bench.setup(sec)
    sec.data["model"] = bench.info
    length, neg = args.length, t.negatives_per_query

    def first_round(batch: int) -> tuple[tuple, dict[str, float], dict[str, float]]:
        """One step of every variant: finds the batch, warms up, measures peak memory. Past the
        first two (ata and mean), a variant runs only if its repetitions would fit the budget."""
        inputs = synthetic_batch(batch, length, neg, bench.vocab)
        times, memory = {}, {}
        for i, (pooling, attention) in enumerate(VARIANTS):
            need = max(times.values(), default=0.0) * (1 + min(2, args.reps) * (i + 1)) * 1.2
            if i >= 2 and not sec.afford(need, f"{label(pooling, attention)} (budget)"):
                continue
            reset_peak(bench.device)
            times[label(pooling, attention)] = bench.timed(
                lambda p=pooling, a=attention: bench.step(p, a, inputs)
            )
            memory[label(pooling, attention)] = peak_gb(bench.device)
        return inputs, times, memory

    start = min(args.batch, t.batch_size)
    batch, (inputs, first, memory) = fit_batch(
        first_round, start, sec.notes, free=bench.free, simulate_oom_above=args.simulate_oom_above
    )
    tokens = batch * (2 + neg) * length
    encode_s = first[label("mean", "bidirectional")] * args.encode_texts * length / tokens / 3
    chosen, reps = [v for v in VARIANTS if label(*v) in first], 0
    while chosen:
        round_s = sum(first[label(*v)] for v in chosen)
        reps = min(args.reps, int((sec.left() - 2 * encode_s - 5) // round_s))
        if reps >= min(2, args.reps) or len(chosen) == 1:
            break
        sec.skipped.append(f"timing of {label(*chosen.pop())} (budget)")
    if reps < 1:
        sec.skipped.append("repeated timing: the first (warm-up) step's time is reported")
        times = {label(*v): [first[label(*v)]] for v in chosen}
    else:
        calls = {label(p, a): (lambda p=p, a=a: bench.step(p, a, inputs)) for p, a in chosen}
        times = time_interleaved(calls, reps, warmup=0, sync=bench.sync)
    peak, device_name = peak_flops(bench.device)
    if peak is None:
        sec.notes.append(f"no bf16 peak known for {device_name}: MFU left out")
    if bench.device.type != "cuda":
        sec.notes.append("peak memory on the CPU: the process's peak resident set so far")
    rows = []
    for pooling, attention in chosen:
        name = label(pooling, attention)
        step_s = median(times[name])
        # ata's last layer is never checkpointed (its capture, harness/pooling.py)
        last_kept = 1 if pooling == "ata" else 0
        recomputed = bench.shapes.layers - last_kept if bench.checkpointing else 0
        model_f, hw_f = bench.shapes.step_flops(tokens, length, attention == "causal", recomputed)
        rows.append(
            {
                "pooling": pooling,
                "attention": attention,
                "batch": batch,
                "step_s": step_s,
                "spread": spread(times[name]),
                "reps": len(times[name]),
                "tokens_per_s": tokens / step_s,
                "peak_gb": memory[name],
                "model_tflop": model_f / 1e12,
                "hardware_tflop": hw_f / 1e12,
                "mfu": model_f / step_s / peak if peak else None,
                "hfu": hw_f / step_s / peak if peak else None,
            }
        )
    sec.data.update(length=length, batch=batch, tokens_per_step=tokens, rows=rows, peak_flops=peak)
    sec.data["encode"] = encode_cost(sec, bench)
    sec.data["projection"] = projection(
        {(r["pooling"], r["attention"]): r["step_s"] for r in rows},
        batch=batch,
        negatives=neg,
        length=length,
        encode_tokens_per_s=sec.data["encode"]["tokens_per_s"],
        paper=bench.paper,
        notes=sec.notes,
    )


def encode_cost(sec: Section, bench: Bench) -> dict[str, Any]:
    """Inference over ``--encode-texts`` texts of ``--length`` tokens, batched as the evaluation
    batches (eval.batch_size, halved on out of memory) and pooled as the recipe pools."""
    args, model = bench.args, bench.paper.model
    emb = bench.embs[model.pooling]
    _, texts, _ = synthetic_batch(args.encode_texts, args.length, 0, bench.vocab, seed=1)
    prepare(emb, model.attention, checkpointing=False)

    def encode(size: int, items: list) -> None:
        with torch.inference_mode():
            for s in range(0, len(items), size):
                emb(emb.collate(items[s : s + size])).cpu()

    emb.eval()
    try:
        size, _ = fit_batch(
            lambda size: encode(size, texts[:size]),  # the warm-up: one batch
            bench.paper.eval.batch_size,
            sec.notes,
            free=bench.free,
        )
        seconds = bench.timed(lambda: encode(size, texts))
    finally:
        emb.train()
    n = len(texts)
    return {
        "texts": n,
        "batch": size,
        "seconds": seconds,
        "texts_per_s": n / seconds,
        "tokens_per_s": n * args.length / seconds,
    }


def render_cost(report: Report, sec: Section) -> None:
    d = sec.data
    if "rows" not in d:
        return
    m = d["model"]
    arch = m["arch"]
    report.para(
        f"Mistral architecture (hidden {arch['hidden_size']}, {arch['num_hidden_layers']} layers, "
        f"{arch['num_attention_heads']} heads, {arch['num_key_value_heads']} KV heads, "
        f"intermediate {arch['intermediate_size']}, vocab {arch['vocab_size']}, rope theta "
        f"{arch['rope_theta']:g}): {count(m['params'])} parameters with random weights, "
        f"{m['dtype']}, made on the device in {m['build_s']:.1f} s; {m['attn_implementation']} "
        f"attention; LoRA {count(m['lora_params'])} trainable on all linear layers; gradient "
        f"checkpointing; the recipe of experiments/base.yaml (InfoNCE over in-batch + 1 hard "
        f"negative, AdamW, clipping). Every text {d['length']} tokens (query, positive, negative: "
        f"{d['tokens_per_step']:,} tokens a step at batch {d['batch']}), the largest batch that "
        "fit up to the recipe's. Median of interleaved repetitions (spread: min–max). Peak "
        "memory: what torch allocated at most during the variant's first step (its cache holds "
        "more)."
    )
    report.table(
        [
            *("variant", "batch", "step (s)", "spread", "reps", "tokens/s", "peak memory (GB)"),
            *("model TFLOP", "MFU", "with recompute (HFU)"),
        ],
        [
            (
                label(r["pooling"], r["attention"]),
                r["batch"],
                f"{r['step_s']:.3f}",
                r["spread"],
                r["reps"],
                f"{r['tokens_per_s']:,.0f}",
                f"{r['peak_gb']:.1f}",
                f"{r['model_tflop']:.4g}",
                f"{r['mfu']:.1%}" if r["mfu"] is not None else "–",
                f"{r['hfu']:.1%}" if r["hfu"] is not None else "–",
            )
            for r in d["rows"]
        ],
    )
    peak = f"{d['peak_flops'] / 1e12:.0f} TFLOP/s" if d["peak_flops"] else "unknown here"
    report.para(
        f"FLOPs per token: model = 2N + 2N + 6N_lora + 3A (forward; backward through the frozen "
        f"weights, activation gradients only; LoRA forward, activation and weight gradients; "
        f"attention forward and backward), N = {count(m['linear_params'])} frozen linear "
        f"weights, N_lora = {count(m['lora_params'])}, A = 4 x length x "
        "(heads x head size) x layers (causal: (length + 1) / 2 keys). MFU = model FLOPs / step "
        "time / the device's dense bf16 peak "
        f"({peak}); HFU adds the recomputed forward of the checkpointed layers (all but ata's "
        "last). Not counted: pooling, ATA's received attention, the loss (each well under 1% of a "
        "7B step at 512 tokens). Full "
        "fine-tuning would be 6N; LoRA on frozen weights is ~4N."
    )
    enc = d["encode"]
    report.para(
        f"Encode: {enc['texts']} texts of {d['length']} tokens in {enc['seconds']:.2f} s "
        f"(batch {enc['batch']}, inference, {enc['texts_per_s']:.1f} texts/s, "
        f"{enc['tokens_per_s']:,.0f} tokens/s)."
    )
    if "projection" in d:
        render_projection(report, d["projection"], d["length"])


# ---------------------------------------------------------------- section 2: ata


def ata_section(sec: Section, bench: Bench) -> None:
    args = bench.args
    bench.setup(sec)
    neg = bench.paper.train.negatives_per_query
    rows: list[dict[str, Any]] = []
    sec.data["attn_implementation"] = bench.info["attn_implementation"]
    for length in args.ata_lengths:
        if rows:  # the last length's round, scaled to this length, times the repetitions
            guess = rows[-1]["round_s"] * length / rows[-1]["length"] * (args.ata_reps + 1)
            if not sec.afford(guess, f"length {length}"):
                continue

        def first_round(batch: int, length: int = length) -> tuple[tuple, dict[str, float]]:
            inputs = synthetic_batch(batch, length, neg, bench.vocab)
            times = {
                p: bench.timed(lambda p=p: bench.step(p, "bidirectional", inputs))
                for p in ("mean", "ata")
            }
            return inputs, times

        batch, (inputs, first) = fit_batch(
            first_round,
            args.ata_batch,
            sec.notes,
            free=bench.free,
            simulate_oom_above=args.simulate_oom_above,
        )
        round_s = sum(first.values())
        reps = min(args.ata_reps, int(sec.left() // round_s))
        if reps < 1:
            sec.skipped.append(f"length {length} after its first round (budget)")
            continue
        calls = {
            p: (lambda p=p, inputs=inputs: bench.step(p, "bidirectional", inputs))
            for p in ("mean", "ata")
        }
        times = time_interleaved(calls, reps, warmup=0, sync=bench.sync)
        ata = bench.embs["ata"]
        own = received_cost(ata, ata.collate(inputs[1]), sync=bench.sync)
        mean_s, ata_s = median(times["mean"]), median(times["ata"])
        rows.append(
            {
                "length": length,
                "batch": batch,
                "reps": reps,
                "mean_s": mean_s,
                "ata_s": ata_s,
                "ratio": ata_s / mean_s,
                "per_round": paired(times),
                "own_s": own,
                "own_share": own / mean_s,
                "round_s": round_s,
            }
        )
    if not rows:
        raise RuntimeError("no length was timed")
    sec.data["rows"] = rows


def render_ata(report: Report, sec: Section) -> None:
    if "rows" not in sec.data:
        return
    report.para(
        f"Same model, bidirectional, {sec.data['attn_implementation']} attention with the ATA "
        "wrapper on the last layer; mean and ata steps interleaved. Per round: ata / mean of the "
        "two steps run back to back (median, min–max). ATA's own work: the last layer's received "
        "attention, forward + closed-form backward, timed alone on the same shapes."
    )
    report.table(
        [
            *("length", "batch", "reps", "mean (s)", "ata (s)", "ata / mean", "per round"),
            *("ATA's own work (s)", "own / mean"),
        ],
        [
            (
                r["length"],
                r["batch"],
                r["reps"],
                f"{r['mean_s']:.3f}",
                f"{r['ata_s']:.3f}",
                f"{r['ratio']:.3f}",
                r["per_round"],
                f"{r['own_s']:.4f}",
                f"{r['own_share']:.2%}",
            )
            for r in sec.data["rows"]
        ],
    )
