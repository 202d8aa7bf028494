"""Training throughput: `harness train` against a plain sentence-transformers v6 trainer.

Both sides fine-tune the packaged SmolLM2-135M-Instruct (the same converted local folder) with the
same peft LoRA (rank, alpha, dropout, all linear layers), fp32 on the CPU, sdpa attention, mean
pooling, InfoNCE over in-batch negatives only (the harness with negatives_per_query 0;
MultipleNegativesRankingLoss with scale = 1 / temperature), AdamW (non-fused on both sides) with
linear warm-up/decay and gradient clipping at 1.0, the same batch size, max length and steps, and
the very same batches: the sentence-transformers side gets the harness schedule's examples in order
(a sequential batch sampler), queries formatted with the harness's instruction template and the
EOS token the harness appends, so both sides tokenize every text to identical ids.

The harness side is the real `harness train` path (harness.single.train_single, tracked in a
throw-away MLflow store); its step times are the gaps between consecutive per-step metric time
stamps. The sentence-transformers side is SentenceTransformerTrainer; its step times are the gaps
between consecutive on_step_end callbacks. Both include everything the loop does per step (data,
tokenization, forward, backward, clipping, optimizer, logging); model loading and the first
--warmup steps are left out. Runs alternate (harness, ST, then ST, harness, ...). Then one harness
step is profiled (torch.profiler, top ops by self CPU time, plus a split into phases), and one ST
step for comparison. Target (issue 7): the harness at least 1.0x the examples/s of ST.

    OMP_NUM_THREADS=2 python bench/train_throughput.py --threads 2
"""

from __future__ import annotations

# _common first: importing it sets the offline environment (HF_HUB_OFFLINE, ...)
from _common import (
    SMOLLM2,
    Report,
    corpus_path,
    diffs,
    median,
    parse,
    parser,
    rounds,
    sentence_transformer,
    spread,
    verdict,
)

# isort: split
import gc
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console

from harness.config import Experiment
from harness.experiment_file import validate
from harness.schedules import Example, schedule_for
from synth.corpus import read_corpus
from synth.packaged import resolve

NAME = "train_throughput"
QUICK = {"batch": 4, "max_length": 32, "steps": 4, "warmup": 1, "reps": 1, "profile_rows": 8}
HARNESS, ST = "harness train", "sentence-transformers"


# ---------------------------------------------------------------- shared settings


def experiment(args: Any, corpus: Path) -> dict[str, Any]:
    """The experiment file both sides follow (the ST side reads its numbers from it)."""
    return {
        "name": "bench-train-throughput",
        "corpus": {"path": str(corpus.resolve())},
        "model": {
            "name": SMOLLM2,
            "pooling": "mean",
            "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout},
            "max_query_length": args.max_length,
            "max_doc_length": args.max_length,
            "dtype": "float32",
            "autocast": "none",
            "attn_implementation": "sdpa",
        },
        "train": {
            "strategy": "curriculum",
            "steps": args.steps,
            "batch_size": args.batch,
            "lr": args.lr,
            "warmup_steps": max(1, args.steps // 10),
            "temperature": args.temperature,
            "negatives_per_query": 0,
            "max_grad_norm": 1.0,
            "heldout_size": 0,
            "seed": args.seed,
            "device": "cpu",
        },
        "eval": {"enabled": False},
    }


def schedule_batches(exp: Experiment) -> list[list[Example]]:
    """The harness's exact training stream (what train_one builds with heldout_size 0)."""
    t = exp.train
    frame = read_corpus(exp.resolve_path(exp.corpus.path)).frame
    return schedule_for(t, frame).batches


def st_pairs(
    exp: Experiment, batches: Sequence[Sequence[Example]], eos: str
) -> dict[str, list[str]]:
    """(anchor, positive) columns in schedule order, formatted as the harness feeds them (the
    experiment above uses the e5 template; symmetric rows' positives carry the instruction too)."""
    from harness.templates import E5

    anchors, positives = [], []
    for batch in batches:
        for ex in batch:
            anchors.append(E5.render(ex.query, ex.instruction or None)[0] + eos)
            positives.append(E5.render(ex.positive, ex.doc_instruction)[0] + eos)
    return {"anchor": anchors, "positive": positives}


def sequential_batches(dataset: Any, batch_size: int, drop_last: bool, **_: Any) -> Any:
    """A batch sampler that keeps the dataset's order (the harness schedule's order)."""
    from sentence_transformers import DefaultBatchSampler
    from torch.utils.data import SequentialSampler

    return DefaultBatchSampler(
        SequentialSampler(dataset), batch_size=batch_size, drop_last=drop_last
    )


def lora_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------- the two sides


def run_harness(raw: dict[str, Any], scratch: Path) -> dict[str, Any]:
    """`harness train` on the experiment; step end times from its MLflow metric time stamps."""
    from mlflow import MlflowClient

    from harness.single import train_single

    raw = {
        **raw,
        "tracking": {"uri": f"sqlite:///{scratch / 'mlflow.db'}", "system_metrics": False},
    }
    path = scratch / "experiment.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    train_single(path, output=scratch / "run", track=True, console=Console(stderr=True))
    client = MlflowClient(raw["tracking"]["uri"])
    exp = client.get_experiment_by_name(raw["name"])
    (run,) = client.search_runs([exp.experiment_id])
    history = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    rates = client.get_metric_history(run.info.run_id, "train/examples_per_s")
    return {
        "stamps": [m.timestamp / 1000 for m in history],
        "logged_rate": median(m.value for m in rates),
    }


def st_trainer(
    exp: Experiment, batches: Sequence[Sequence[Example]], scratch: Path, callbacks: list[Any]
) -> Any:
    """A SentenceTransformerTrainer with the experiment's model, LoRA, loss and optimizer."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    m, t = exp.model, exp.train
    max_length = max(m.max_query_length, m.max_doc_length)
    model = sentence_transformer(resolve(m.name), max_length)
    # peft directly on the transformer inside (as the harness does): transformers >= 5.24 refuses
    # its own add_adapter route with peft < 0.22, the newest peft the registry has here
    module = model[0]
    attr = "auto_model" if hasattr(module, "auto_model") else "model"
    setattr(
        module,
        attr,
        get_peft_model(
            getattr(module, attr),
            LoraConfig(
                r=m.lora.r,
                lora_alpha=m.lora.alpha,
                lora_dropout=m.lora.dropout,
                target_modules=m.lora.target_modules,
                bias="none",
            ),
        ),
    )
    eos = model.tokenizer.eos_token
    data = Dataset.from_dict(st_pairs(exp, batches, eos))
    args = SentenceTransformerTrainingArguments(
        output_dir=str(scratch / "st"),
        max_steps=len(batches),
        per_device_train_batch_size=t.batch_size,
        learning_rate=t.lr,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm or 0.0,
        lr_scheduler_type="linear",
        optim="adamw_torch",  # the harness uses torch.optim.AdamW (not the fused kernel)
        seed=t.seed,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_drop_last=True,
        dataloader_num_workers=0,
        batch_sampler=sequential_batches,
    )
    loss = MultipleNegativesRankingLoss(model, scale=1.0 / t.temperature)
    return SentenceTransformerTrainer(
        model=model, args=args, train_dataset=data, loss=loss, callbacks=callbacks
    )


def step_callback(on_step_end: Callable[[int], None]) -> Any:
    from transformers import TrainerCallback

    class StepEnd(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            on_step_end(state.global_step)

    return StepEnd()


def run_st(exp: Experiment, batches: Sequence[Sequence[Example]], scratch: Path) -> dict[str, Any]:
    stamps: list[float] = []
    trainer = st_trainer(
        exp, batches, scratch, [step_callback(lambda _: stamps.append(time.perf_counter()))]
    )
    params = lora_params(trainer.model)
    trainer.train()
    del trainer
    return {"stamps": stamps, "params": params}


# ---------------------------------------------------------------- where the time goes


def profile_harness(
    exp: Experiment, batches: Sequence[Sequence[Example]], rows: int
) -> dict[str, Any]:
    """Phases of a harness step (median of 3) and a torch.profiler table of one whole step."""
    from torch.profiler import ProfilerActivity, profile

    from harness.embedder import Embedder
    from harness.loss import duplicate_mask, info_nce
    from harness.train import StepRunner

    emb = Embedder.from_settings(exp.model, "cpu", lora=True)
    params = emb.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=exp.train.lr)
    runner = StepRunner(emb, exp.train.temperature, None)
    emb.train()

    def finish() -> None:
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    phases: dict[str, list[float]] = {}
    marks: list[tuple[str, float]] = []

    def mark(name: str) -> None:
        marks.append((name, time.perf_counter()))

    for batch in [batches[i % len(batches)] for i in range(4)]:
        marks.clear()
        tick = time.perf_counter()
        queries, docs, doc_texts = runner.tokenize(batch)
        exclude = duplicate_mask([ex.positive for ex in batch], doc_texts)
        mark("tokenize")
        q_batch, d_batch = emb.collate(queries), emb.collate(docs)
        mark("collate (pad, positions)")
        q = emb(q_batch)
        mark("forward queries")
        d = emb(d_batch)
        mark("forward documents")
        loss = info_nce(q, d, exp.train.temperature, exclude)
        mark("loss")
        loss.backward()
        mark("backward")
        finish()
        mark("clip + AdamW")
        last = tick
        for name, at in marks:
            phases.setdefault(name, []).append(at - last)
            last = at
    phases = {k: v[1:] for k, v in phases.items()}  # the first step warms up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        runner(batches[0])
        finish()
    table = prof.key_averages().table(
        sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48
    )
    return {"phases": phases, "table": table, "params": lora_params(emb.model)}


def profile_st(
    exp: Experiment, batches: Sequence[Sequence[Example]], scratch: Path, rows: int
) -> str:
    """torch.profiler table of one ST step: one on_step_end to the next (data fetch included)."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU])

    def on_step_end(step: int) -> None:
        if step == 2:
            prof.__enter__()
        elif step == 3:
            prof.__exit__(None, None, None)

    trainer = st_trainer(exp, list(batches[:3]), scratch, [step_callback(on_step_end)])
    trainer.train()
    del trainer
    gc.collect()
    return prof.key_averages().table(
        sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48
    )


# ---------------------------------------------------------------- main


def main() -> None:
    ap = parser(__doc__, NAME)
    ap.add_argument(
        "--corpus",
        type=Path,
        default=None,
        help="corpus folder, for its (query, positive) pairs (default: the smoke experiment's, "
        "mined on first use as `harness sweep experiments/smoke.yaml` does)",
    )
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument(
        "--max-length", type=int, default=128, help="max tokens of queries and documents"
    )
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument(
        "--warmup",
        type=int,
        default=3,
        help="steps left out of the timing at the start of each run",
    )
    ap.add_argument("--reps", type=int, default=2, help="training runs per side, interleaved")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=float, default=32)
    ap.add_argument("--lora-dropout", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--temperature", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-profile", action="store_true", help="skip the per-step profiles")
    ap.add_argument("--profile-rows", type=int, default=15)
    args = parse(ap, QUICK)
    if not 1 <= args.warmup < args.steps:
        ap.error("need 1 <= --warmup < --steps")

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        scratch = Path(tmp)
        corpus = corpus_path(args.corpus)
        n_rows = len(read_corpus(corpus))
        raw = experiment(args, corpus)
        exp = validate(raw, "bench")
        batches = schedule_batches(exp)
        steps: dict[str, list[float]] = {HARNESS: [], ST: []}
        info: dict[str, Any] = {}
        for r, side in rounds([HARNESS, ST], args.reps):
            run_dir = scratch / f"{side.split()[0]}-{r}"
            run_dir.mkdir()
            print(f"round {r + 1}/{args.reps}: {side}", flush=True)
            out = run_harness(raw, run_dir) if side == HARNESS else run_st(exp, batches, run_dir)
            gc.collect()
            times = diffs(out["stamps"], skip=args.warmup - 1)  # step 1 has no gap before it
            steps[side] += times
            info.setdefault(side, []).append(out)
            print(
                f"  {side}: median step {median(times):.3f} s over {len(times)} steps", flush=True
            )
        prof = None if args.no_profile else profile_harness(exp, batches, args.profile_rows)
        st_table = (
            None
            if args.no_profile
            else profile_st(exp, batches, scratch / "st-profile", args.profile_rows)
        )

    report = Report(
        "Training throughput: harness train vs SentenceTransformerTrainer",
        libs=("transformers", "sentence-transformers", "peft"),
    )
    harness_params = f", {prof['params']:,} in the harness" if prof else ""
    report.para(
        f"Model: packaged SmolLM2-135M-Instruct ({resolve(SMOLLM2)}), fp32, sdpa, mean pooling, "
        f"LoRA r={args.lora_r} alpha={args.lora_alpha:g} dropout={args.lora_dropout:g} on all "
        f"linear layers ({info[ST][0]['params']:,} trainable parameters on the ST side"
        f"{harness_params}). Data: {corpus} ({n_rows} rows), (query, positive) pairs, "
        f"in-batch negatives only, the same {args.steps} batches of {args.batch} on both sides, "
        f"max length {args.max_length}, temperature {args.temperature:g} (MNRL scale "
        f"{1 / args.temperature:g}), lr {args.lr:g}. {args.reps} runs per side, alternating; "
        f"model loading and the first {args.warmup} steps of each run are left out; step time = "
        "gap between consecutive step ends."
    )
    med = {side: median(v) for side, v in steps.items()}
    rate = {side: args.batch / med[side] for side in steps}
    report.table(
        ["side", "median step (s)", "spread (s)", "examples/s", "steps timed"],
        [
            (side, f"{med[side]:.3f}", spread(steps[side]), f"{rate[side]:.2f}", len(steps[side]))
            for side in steps
        ],
    )
    ratio = rate[HARNESS] / rate[ST]
    logged = median(o["logged_rate"] for o in info[HARNESS])
    report.para(
        f"Harness / ST examples/s: **{ratio:.3f}x**. "
        f"Target at least 1.0x: {verdict(ratio >= 1.0)}. "
        f"(The harness's own `train/examples_per_s`, which leaves out its per-step logging: "
        f"median {logged:.2f}.)"
    )
    if prof:
        phase_rows = [(k, f"{median(v):.3f}") for k, v in prof["phases"].items()]
        total = sum(median(v) for v in prof["phases"].values())
        phase_rows = [(k, s, f"{100 * float(s) / total:.0f}%") for k, s in phase_rows]
        report.add("## Where a harness step's time goes", "")
        report.para(
            "Phases of one step (median of 3 steps after one warm-up step; the same calls "
            "StepRunner makes, timed one by one):"
        )
        report.table(["phase", "seconds", "share"], phase_rows, "lrr")
        report.para(
            f"torch.profiler, one whole harness step (StepRunner + clip + AdamW), top "
            f"{args.profile_rows} ops by self CPU time:"
        )
        report.code(prof["table"])
        report.para(
            f"torch.profiler, one SentenceTransformerTrainer step (step end to step end, "
            f"data loading included), top {args.profile_rows} ops by self CPU time:"
        )
        report.code(st_table or "")
    if math.isnan(ratio):
        report.para("No steps were timed: raise --steps.")
    report.write(args.out)


if __name__ == "__main__":
    main()
