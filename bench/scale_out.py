"""Scale-out within one trial: 1 vs 2 data-parallel workers on the same global batch, on this CPU.

One training step (harness.train.StepRunner: InfoNCE forward + backward over the global batch, then
gradient clipping at 1.0 and an AdamW step) of the packaged SmolLM2-135M-Instruct with LoRA, timed
in three ways on the same global batches: (a) one worker with 2 torch threads, (b) one worker with
1 thread, (c) two gloo workers with 1 thread each, every worker embedding its half of the global
batch (harness/distributed.py: all-gather of the embeddings, all-reduce of the LoRA gradients).

Both workers of (c) are spawned once and stay up; (a) and (b) run in worker 0 on a model of their
own while worker 1 sleeps in a barrier (its CPU time there is reported, to show it takes none).
Variants are interleaved round-robin with the order rotated each round (bench/_common.rounds);
round ``r`` of every variant uses the same global batch (real SNLI rows from $NM_SHARED_DATA, one
hard negative per query: the contradiction). A (c) step's time is the slower worker's. Inside a (c)
step the two collectives are timed by a DataParallel subclass that first waits in a
``dist.barrier()`` (the wait: the faster worker idling for the slower one) and then times the
collective itself (pure communication, gloo over loopback TCP); the bytes each one moves come from
the tensor sizes, so the measured times give the gloo bandwidth (NCCL-tests' "bus bandwidth").

The last section predicts the communication share of a step for Mistral-7B on 8 GPUs with NCCL
from the bytes (exact, from the model's shapes) and ASSUMED bandwidths, peak FLOP/s and MFU.

    NM_SHARED_DATA=/work/shared/data python bench/scale_out.py
"""

from __future__ import annotations

# _common first: importing it sets the offline environment (HF_HUB_OFFLINE, ...)
from _common import REPO, SMOLLM2, Report, median, parse, parser, rounds, spread

# isort: split
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harness.config import ModelSettings
from harness.distributed import DataParallel
from harness.embedder import Embedder
from harness.models import apply_lora, load_backbone
from harness.schedules import Example
from harness.train import StepRunner

NAME = "scale_out"
QUICK = {"batch": 4, "max_length": 16, "steps": 2, "warmup": 1}
WORKERS = 2
A, B, C = "(a) 1 worker × 2 threads", "(b) 1 worker × 1 thread", "(c) 2 workers × 1 thread"
THREADS = {A: 2, B: 1, C: 1}
INSTRUCTION = "Retrieve semantically similar text."
PHASES = ("gather", "all-reduce")

# ---- the 8-GPU prediction: every number here is an ASSUMPTION, not a measurement
MISTRAL = {  # Mistral-7B-v0.1 config.json
    "hidden": 4096,
    "intermediate": 14336,
    "layers": 32,
    "heads": 32,
    "kv_heads": 8,
    "head_dim": 128,
    "params": 7.24e9,
}
GPUS = 8
GPU_BATCH = 64  # examples per GPU: global batch 512
GPU_LORA_R = 16
GPU_TOKENS = 512  # max length of every text (query, positive, hard negative)
NVLINK_BUSBW = 300e9  # bytes/s NCCL bus bandwidth in one H100/H200 node (nccl-tests ~350-480)
IB_BUSBW = 45e9  # bytes/s: 400 Gb/s InfiniBand per GPU across nodes, ~90% of line rate
NCCL_LATENCY = 50e-6  # s per collective (ring, 8 GPUs), added to bytes / bandwidth
PEAK_BF16 = 989e12  # FLOP/s, H100 SXM dense bf16 (H200: the same chip)
MFU = 0.40


# ---------------------------------------------------------------- data and model


def shared_data() -> Path:
    env = os.environ.get("NM_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def snli_batches(data: Path, batch: int, count: int) -> list[list[Example]]:
    """``count`` global batches of real SNLI triplets: query, entailment, contradiction."""
    path = data / "SNLI-triplets" / "train.jsonl"
    rows: list[dict[str, str]] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row.get("negative"):
                rows.append(row)
            if len(rows) == batch * count:
                break
    if len(rows) < batch * count:
        raise SystemExit(f"{path}: {len(rows)} rows with a negative, need {batch * count}")
    examples = [
        Example(INSTRUCTION, r["query"], r["positive"], (r["negative"],), (1,), str(i), INSTRUCTION)
        for i, r in enumerate(rows)
    ]
    return [examples[i : i + batch] for i in range(0, len(examples), batch)]


def settings(args: Any) -> ModelSettings:
    return ModelSettings(
        name=SMOLLM2,
        pooling=args.pooling,
        attention=args.attention,
        lora={"r": args.lora_r, "alpha": 2 * args.lora_r, "dropout": 0.05},
        max_query_length=args.max_length,
        max_doc_length=args.max_length,
        dtype="float32",
        autocast=args.autocast,
        attn_implementation="sdpa",
    )


@dataclass(frozen=True)
class TimedParallel(DataParallel):
    """DataParallel whose two collectives record (wait at a barrier, the collective) in seconds,
    and the bytes of the tensor each one reduces or gathers."""

    last: dict[str, float] = field(default_factory=dict)

    def _timed(self, name: str, nbytes: int, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        dist.barrier(group=self.group)
        t1 = time.perf_counter()
        out = fn()
        t2 = time.perf_counter()
        self.last.update({f"{name} wait": t1 - t0, f"{name} comm": t2 - t1})
        self.last[f"{name} bytes"] = nbytes
        return out

    def gather(self, local: torch.Tensor) -> list[torch.Tensor]:
        # what all_gather moves: world_size padded shards (the shards are equal here)
        nbytes = self.world_size * local.numel() * local.element_size()
        parent = super().gather
        return self._timed("gather", nbytes, lambda: parent(local))

    def all_reduce_grads(self, params: Any) -> None:
        params = [p for p in params if p.requires_grad]
        nbytes = sum(p.numel() * p.element_size() for p in params)
        parent = super().all_reduce_grads
        self._timed("all-reduce", nbytes, lambda: parent(params))


class Trainer:
    """A LoRA embedder, its AdamW and a StepRunner: :meth:`step` is one timed optimizer step."""

    def __init__(self, model: ModelSettings, args: Any, parallel: DataParallel | None) -> None:
        device = torch.device("cpu")
        backbone = load_backbone(model, device)
        if args.layers < len(backbone.model.layers):  # the first decoder layers only (as the tests)
            backbone.model.layers = torch.nn.ModuleList(backbone.model.layers[: args.layers])
            backbone.model.config.num_hidden_layers = args.layers
        torch.manual_seed(args.seed)  # the same LoRA initialization on every worker
        backbone = dataclasses.replace(backbone, model=apply_lora(backbone.model, model.lora))
        self.emb = Embedder(backbone, model, device).train()
        self.params = self.emb.trainable_parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=args.lr)
        self.runner = StepRunner(self.emb, args.temperature, None, parallel)

    def step(self, batch: Sequence[Example]) -> float:
        start = time.perf_counter()
        self.runner(batch)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def latency(reps: int = 20) -> dict[str, float]:
    """Median seconds of an empty barrier and of an all_reduce of 8 bytes (gloo's latency)."""
    out: dict[str, list[float]] = {"barrier": [], "all_reduce 8 B": []}
    x = torch.zeros(1, dtype=torch.int64)
    for _ in range(reps):
        t0 = time.perf_counter()
        dist.barrier()
        t1 = time.perf_counter()
        dist.all_reduce(x)
        t2 = time.perf_counter()
        out["barrier"].append(t1 - t0)
        out["all_reduce 8 B"].append(t2 - t1)
    return {k: median(v) for k, v in out.items()}


# ---------------------------------------------------------------- the workers


def worker(rank: int, args: Any, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORKERS,
        timeout=timedelta(minutes=30),
    )
    try:
        batches = snli_batches(shared_data(), args.batch, args.warmup + args.steps)
        model = settings(args)
        parallel = TimedParallel(rank, WORKERS)
        two = Trainer(model, args, parallel)
        one = Trainer(model, args, None) if rank == 0 else None
        out: dict[str, Any] = {
            "steps": {A: [], B: [], C: []},
            "comm": [],
            "idle_cpu": [],
            "lora_params": sum(p.numel() for p in two.params),
            "tokens": [],
        }
        if rank == 0:
            for batch in batches:
                queries, docs, _ = two.runner.tokenize(batch)
                out["tokens"].append([len(e.ids) for e in queries + docs])
        for r, name in rounds([A, B, C], args.steps, args.warmup):
            batch = batches[r + args.warmup]
            if rank == 0:
                step = "warm-up" if r < 0 else f"step {r + 1}/{args.steps}"
                print(f"{step}: {name}", file=sys.stderr, flush=True)
            dist.barrier()
            if name == C:
                seconds = two.step(batch)
                if r >= 0:
                    out["steps"][C].append(seconds)
                    out["comm"].append(dict(parallel.last))
                continue
            if rank == 0:
                assert one is not None
                torch.set_num_threads(THREADS[name])
                seconds = one.step(batch)
                torch.set_num_threads(1)
                if r >= 0:
                    out["steps"][name].append(seconds)
                dist.barrier()
            else:  # idle while worker 0 runs a one-worker step
                cpu = time.process_time()
                wall = time.perf_counter()
                dist.barrier()
                out["idle_cpu"].append((time.process_time() - cpu, time.perf_counter() - wall))
        out["latency"] = latency()
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(out), encoding="utf-8")
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- the 8-GPU prediction


def lora_params_mistral(r: int) -> int:
    """Trainable parameters of LoRA rank ``r`` on q, k, v, o, gate, up, down: r·(in + out) each."""
    m = MISTRAL
    h, i, kv = m["hidden"], m["intermediate"], m["kv_heads"] * m["head_dim"]
    q, o = m["heads"] * m["head_dim"], m["heads"] * m["head_dim"]
    shapes = [(h, q), (h, kv), (h, kv), (o, h), (h, i), (h, i), (i, h)]
    return int(m["layers"]) * sum(r * (a + b) for a, b in shapes)


def prediction() -> tuple[list[tuple[str, str]], list[tuple[str, ...]], dict[str, float]]:
    """Bytes and times of one step of Mistral-7B, LoRA r 16, global batch 512 on 8 GPUs."""
    params = lora_params_mistral(GPU_LORA_R)
    grad_bytes = 4 * params  # fp32 LoRA gradients
    ring = 2 * (GPUS - 1) / GPUS
    gathered = GPUS * GPU_BATCH * 3 * MISTRAL["hidden"] * 4  # fp32 q, pos, neg embeddings
    tokens = GPU_BATCH * 3 * GPU_TOKENS
    n = MISTRAL["params"]
    compute = {f: f * n * tokens / (PEAK_BF16 * MFU) for f in (4, 6)}
    facts = [
        ("LoRA r 16 trainable parameters (q,k,v,o,gate,up,down × 32 layers)", f"{params:,}"),
        ("gradient all-reduce tensor (fp32)", f"{grad_bytes / 1e6:.1f} MB"),
        (
            f"ring all-reduce: sent (and received) per GPU, 2(N-1)/N = {ring:.2f} of it",
            f"{ring * grad_bytes / 1e6:.1f} MB",
        ),
        (
            "embedding all-gather, whole gathered tensor (512 × 3 × 4096 fp32)",
            f"{gathered / 1e6:.1f} MB",
        ),
        (
            f"tokens per GPU per step, at most ({GPU_BATCH} × 3 texts × {GPU_TOKENS})",
            f"{tokens:,}",
        ),
        (
            "compute per GPU per step, 4N FLOPs/token (LoRA, no checkpointing)",
            f"{compute[4]:.2f} s",
        ),
        (
            "compute per GPU per step, 6N FLOPs/token (+ recompute: gradient checkpointing, "
            "as LLM2Vec and experiments/base.yaml)",
            f"{compute[6]:.2f} s",
        ),
    ]
    rows = []
    for link, busbw in (
        ("NVLink, 1 node (assumed 300 GB/s)", NVLINK_BUSBW),
        ("InfiniBand 400 Gb/s (assumed 45 GB/s)", IB_BUSBW),
    ):
        t_reduce = NCCL_LATENCY + ring * grad_bytes / busbw
        t_gather = NCCL_LATENCY + (GPUS - 1) / GPUS * gathered / busbw
        comm = t_reduce + t_gather
        rows.append(
            (
                link,
                f"{1e3 * t_reduce:.2f}",
                f"{1e3 * t_gather:.3f}",
                f"{100 * comm / (comm + compute[6]):.3f}%",
                f"{100 * comm / (comm + compute[6] / 10):.2f}%",
            )
        )
    return facts, rows, compute


# ---------------------------------------------------------------- main


def main() -> None:
    ap = parser(__doc__, NAME)
    ap.add_argument("--batch", type=int, default=16, help="global batch (examples per step)")
    ap.add_argument("--max-length", type=int, default=64, help="max tokens of every text")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument(
        "--layers",
        type=int,
        default=30,
        help="keep the first LAYERS of SmolLM2's 30 decoder layers (compute and LoRA gradient "
        "bytes both scale with it, so the communication share hardly does)",
    )
    ap.add_argument("--pooling", default="mean", choices=["eos", "mean", "ata"])
    ap.add_argument(
        "--attention", default="bidirectional", choices=["bidirectional", "causal", "native"]
    )
    ap.add_argument("--autocast", default="bf16", choices=["bf16", "none"])
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--temperature", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    args = parse(ap, QUICK)
    if args.batch < WORKERS:
        ap.error(f"--batch must be at least {WORKERS}")

    with tempfile.TemporaryDirectory(prefix="bench-scale-out-") as tmp:
        mp.spawn(worker, args=(args, str(Path(tmp) / "rendezvous"), tmp), nprocs=WORKERS)
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(WORKERS)]

    r0, r1 = ranks
    steps = {A: r0["steps"][A], B: r0["steps"][B]}
    steps[C] = [max(a, b) for a, b in zip(r0["steps"][C], r1["steps"][C])]
    med = {k: median(v) for k, v in steps.items()}
    tokens = [t for batch in r0["tokens"] for t in batch]
    layers = "all 30 decoder layers" if args.layers >= 30 else f"first {args.layers} of 30 layers"

    report = Report(
        "Scale-out: 1 vs 2 data-parallel workers per trial on the same global batch",
        libs=("transformers", "peft"),
    )
    report.para(
        f"**Measured here.** Model: packaged SmolLM2-135M-Instruct, {args.attention} attention, "
        f"{args.pooling} pooling, {layers}, fp32 weights with {args.autocast} autocast, sdpa, LoRA r "
        f"{args.lora_r} on all linear layers ({r0['lora_params']:,} trainable parameters). "
        f"Global batch {args.batch} real SNLI triplets (query, positive, 1 hard negative: "
        f"{3 * args.batch} texts per step, max length {args.max_length}, mean "
        f"{sum(tokens) / len(tokens):.1f} tokens per text before padding). Step = StepRunner "
        f"(tokenize, forward, InfoNCE, backward) + clip + AdamW. {args.steps} timed steps per "
        f"variant after {args.warmup} warm-up step(s), interleaved round-robin; all three variants "
        "see the same batches; a (c) step counts as long as its slower worker."
        + (
            f" Only the first {args.layers} decoder layers run, to keep the run under ~8 "
            "minutes on this loaded machine: compute and LoRA gradient bytes both scale with "
            "the depth, so the shares below hardly depend on it."
            if args.layers < 30
            else ""
        )
    )
    report.table(
        ["variant", "median step (s)", "spread (s)", "examples/s", "speed-up of (c)"],
        [
            (
                name,
                f"{med[name]:.3f}",
                spread(steps[name]),
                f"{args.batch / med[name]:.2f}",
                "" if name == C else f"{med[name] / med[C]:.2f}x",
            )
            for name in (A, B, C)
        ],
    )

    # communication inside a (c) step, per worker
    rows = []
    shares: dict[str, float] = {}
    for rank, data in enumerate(ranks):
        comm = data["comm"]
        step = median(data["steps"][C])
        cells = {
            f"{p} {k}": median(c[f"{p} {k}"] for c in comm)
            for p in PHASES
            for k in ("wait", "comm")
        }
        pure = median(sum(c[f"{p} comm"] for p in PHASES) for c in comm)
        wait = median(sum(c[f"{p} wait"] for p in PHASES) for c in comm)
        shares[f"comm{rank}"], shares[f"wait{rank}"] = pure / step, wait / step
        rows.append(
            (
                f"worker {rank}",
                f"{step:.3f}",
                *(f"{1e3 * cells[f'{p} {k}']:.1f}" for p in PHASES for k in ("wait", "comm")),
                f"{100 * pure / step:.2f}%",
                f"{100 * wait / step:.1f}%",
            )
        )
    report.para(
        "Inside a (c) step (medians over the timed steps; wait = at the barrier before the "
        "collective, i.e. for the other worker; comm = the collective alone, after the barrier):"
    )
    report.table(
        [
            "worker",
            "step (s)",
            "gather wait (ms)",
            "gather comm (ms)",
            "all-reduce wait (ms)",
            "all-reduce comm (ms)",
            "comm share",
            "wait share",
        ],
        rows,
    )
    c0 = r0["comm"]
    gather_bytes = c0[0]["gather bytes"]
    reduce_bytes = c0[0]["all-reduce bytes"]
    t_gather = median(median(c["gather comm"] for c in d["comm"]) for d in ranks)
    t_reduce = median(median(c["all-reduce comm"] for c in d["comm"]) for d in ranks)
    # NCCL-tests' bus bandwidth: all-reduce S/t · 2(N-1)/N, all-gather S/t · (N-1)/N
    bw_reduce = reduce_bytes / t_reduce * 2 * (WORKERS - 1) / WORKERS
    bw_gather = gather_bytes / t_gather * (WORKERS - 1) / WORKERS
    lat = r0["latency"]
    idle = r1["idle_cpu"]
    idle_cpu = sum(c for c, _ in idle) / max(1e-9, sum(w for _, w in idle))
    report.table(
        ["collective per (c) step", "bytes", "median time (ms)", "gloo bus bandwidth"],
        [
            (
                "embedding all-gather (fp32, 2 shards × "
                f"{3 * args.batch // WORKERS} × dim; + an 8-byte size exchange)",
                f"{gather_bytes / 1e3:.1f} kB",
                f"{1e3 * t_gather:.2f}",
                f"{bw_gather / 1e6:.1f} MB/s",
            ),
            (
                "LoRA gradient all-reduce (fp32, one flat buffer; incl. flatten + copy back)",
                f"{reduce_bytes / 1e6:.2f} MB",
                f"{1e3 * t_reduce:.2f}",
                f"{bw_reduce / 1e6:.1f} MB/s",
            ),
        ],
    )
    report.para(
        f"gloo latency here: empty barrier {1e6 * lat['barrier']:.0f} µs, all_reduce of 8 bytes "
        f"{1e6 * lat['all_reduce 8 B']:.0f} µs (median of 20). Worker 1 used "
        f"{100 * idle_cpu:.1f}% of a core while it waited in a barrier during the one-worker "
        "steps, so (a) and (b) had the machine to themselves (apart from the other jobs)."
    )
    report.para(
        f"Reading: two workers on the same global batch take **{med[A] / med[C]:.2f}x** the "
        f"speed of one worker with both threads and **{med[B] / med[C]:.2f}x** that of one "
        f"worker with one thread. Pure communication is "
        f"{100 * max(shares['comm0'], shares['comm1']):.2f}% of a (c) step at most; waiting for "
        f"the slower worker {100 * min(shares['wait0'], shares['wait1']):.1f}–"
        f"{100 * max(shares['wait0'], shares['wait1']):.1f}%. This cannot show scaling: the "
        "two workers share the same 2 cores as (a) (and those cores are shared with other "
        "jobs), so (c) has no more compute than (a), only split into two single-threaded "
        "processes instead of one process with two intra-op threads. Whatever (c) gains or "
        "loses against (a) comes from how each copes with the other jobs' load (a two-thread "
        "step waits at every op for its slower thread when another process holds a core; two "
        "one-thread processes do not), not from data parallelism; against (b) it is two "
        "one-thread workers on a machine with no idle core. (a) runs in the same process as "
        "(b), switching torch's thread count between steps; its slowness is the known cost of "
        "two spinning OpenMP threads on cores that other jobs also want, and was not "
        "separated here from any cost of that switch. The other jobs' load makes "
        "absolute times noise; the ratios within this one run are what counts. The bytes are "
        "exact; the gloo bandwidth is that of loopback TCP on a loaded machine and says "
        "nothing about NCCL."
    )

    facts, pred_rows, compute = prediction()
    report.add("## What it predicts for 8 GPUs with NCCL", "")
    report.para(
        "**Assumptions, not measurements**: Mistral-7B (hidden 4096, intermediate 14336, 32 "
        "layers, 32 heads, 8 KV heads, head dim 128, 7.24e9 parameters), LoRA r 16 on q, k, v, "
        "o, gate, up, down (r·(in+out) each), fp32 gradients, global batch 512 = 64 per GPU, "
        "query + positive + 1 hard negative of at most 512 tokens, fp32 4096-d embeddings; "
        f"ring all-reduce; NCCL bus bandwidth {NVLINK_BUSBW / 1e9:.0f} GB/s over NVLink "
        f"(H100/H200 node) or {IB_BUSBW / 1e9:.0f} GB/s over 400 Gb/s InfiniBand across nodes, "
        f"+{1e6 * NCCL_LATENCY:.0f} µs latency per collective; compute = FLOPs / (peak × MFU) "
        f"with {PEAK_BF16 / 1e12:.0f} TFLOP/s bf16 peak and MFU {MFU:.0%}. FLOPs per token: "
        "forward 2N + backward to the activations 2N (the frozen weights need no weight "
        "gradients; LoRA's own FLOPs and attention's ~2% at 512 tokens are left out) = 4N; "
        "with gradient checkpointing (LLM2Vec, experiments/base.yaml) a second forward: 6N, "
        "used below."
    )
    report.table(["quantity (derived from the assumptions)", "value"], facts, "lr")
    report.table(
        [
            "interconnect",
            "grad all-reduce (ms)",
            "embedding all-gather (ms)",
            "comm share, 512-token texts",
            "comm share, compute / 10",
        ],
        pred_rows,
    )
    report.para(
        f"Prediction: a step is ~{compute[6]:.0f} s of compute per GPU at full 512-token "
        "texts against ~1 ms of NCCL communication in one node (a few ms across nodes), so the "
        "communication share is well under 0.1%: the ~168 MB fp32 LoRA gradient is small next "
        "to the model's compute, and the embedding all-gather (~25 MB) is smaller still. The "
        "last column allows for texts ten times shorter than 512 tokens (real rows are padded "
        "to the longest in a shard, not to 512) or a 10x faster step: still well under 1%. "
        "The all-reduce here is not overlapped with the backward pass (one flat buffer after "
        "it), so it adds to the step time in full, and the figures above are already that. "
        "What can matter on 8 GPUs is not the bytes but the wait: every worker stops at the "
        "all-gather for the slowest shard (longer texts pad to more tokens), which is what the "
        "wait column above measures here; with one shard per GPU and 64 examples each, the "
        "spread of padded lengths between shards sets that cost. 8 workers should therefore "
        "scale close to 8x on compute, unlike 2 workers on 2 shared CPU cores."
    )
    report.write(args.out)


if __name__ == "__main__":
    main()
