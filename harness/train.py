"""The training loop of one trial: LoRA + InfoNCE over a negative schedule, then the held-out metric.

No Ray, no MLflow here: metrics go to ``on_metrics(step, metrics)``; the caller decides where they
end up (a single MLflow run for ``harness train``, the Ray driver for a sweep).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import torch
from torch import Tensor
from transformers import set_seed

from harness.checkpoints import Checkpointing, Stream, TrainState, capture_rng, restore_rng
from harness.config import Experiment
from harness.distributed import DataParallel
from harness.embedder import Embedder, Encoded
from harness.heldout import heldout_metrics
from harness.loss import duplicate_mask, info_nce
from harness.models import pick_device
from harness.schedules import Example, Schedule, schedule_for, split_heldout
from synth.corpus import Corpus

log = logging.getLogger(__name__)
MetricsCallback = Callable[[int, dict[str, float]], None]


@dataclass
class TrainResult:
    model_dir: Path
    heldout: dict[str, float]
    steps: int
    seconds: float
    level_order: list[int | str]
    heldout_before: dict[str, float] = field(default_factory=dict)
    stream: Stream = field(default_factory=list)  # every (step, metrics) reported, resumed ones too
    resumed_from: int | None = None  # the checkpoint's step when the training resumed from one
    # the trained model, in memory (rank 0): evaluated as it is rather than saved and reloaded
    embedder: Embedder | None = field(default=None, repr=False, compare=False)


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warm-up, then linear decay to zero.

    Not ``transformers.get_linear_schedule_with_warmup``: that one starts at ``step / warmup``, so
    its first optimizer step runs at learning rate 0 (a step that changes nothing); this one starts
    at ``1 / warmup`` and is otherwise the same. Changing it would also change every trial with
    warm-up, i.e. the results already stored under their trial keys.
    """

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


class _RngState:
    """CPU/CUDA RNG state, so GradCache's second pass sees the same dropout masks as the first."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def doc_texts(batch: Sequence[Example]) -> list[str]:
    """The documents of a batch in the loss's order: every positive, then every hard negative."""
    return [ex.positive for ex in batch] + [n for ex in batch for n in ex.negatives]


class StepRunner:
    """One optimization step's forward/backward, plain or GradCache-chunked.

    With ``parallel`` (more than one worker) each call takes the global batch, embeds this
    worker's shard, takes the loss over the whole global batch and sums the trainable gradients
    over the workers (see ``harness/distributed.py``); the gradients must be zero (or None) before
    the call. Without it, or with one worker, the step is the single-process one.
    """

    def __init__(
        self,
        embedder: Embedder,
        temperature: float,
        chunk: int | None,
        parallel: DataParallel | None = None,
    ):
        self.embedder = embedder
        self.temperature = temperature
        self.chunk = chunk
        self.parallel = parallel if parallel is not None and parallel.world_size > 1 else None

    def tokenize(self, batch: Sequence[Example]) -> tuple[list[Encoded], list[Encoded], list[str]]:
        s = self.embedder.settings
        queries = [
            self.embedder.tokenize_one(ex.query, ex.instruction or None, s.max_query_length)
            for ex in batch
        ]
        texts = doc_texts(batch)
        doc_instructions = [ex.doc_instruction for ex in batch] + [
            ex.doc_instruction for ex in batch for _ in ex.negatives
        ]
        docs = [
            self.embedder.tokenize_one(t, i, s.max_doc_length)
            for t, i in zip(texts, doc_instructions)
        ]
        return queries, docs, texts

    def __call__(self, batch: Sequence[Example]) -> float:
        """The loss of the (global) ``batch``; its gradients are accumulated into the parameters."""
        local = batch if self.parallel is None else self.parallel.shard(batch)
        queries, docs, texts = self.tokenize(local)
        if self.parallel is not None:
            texts = doc_texts(batch)
        exclude = duplicate_mask([ex.positive for ex in batch], texts)
        if self.chunk is None or self.chunk >= len(queries) + len(docs):
            q = self.embedder(self.embedder.collate(queries))
            d = self.embedder(self.embedder.collate(docs))
            loss = info_nce(*self._global(q, d, batch), self.temperature, exclude)
            loss.backward()
            loss = loss.detach()
        else:
            loss = self._grad_cache(queries, docs, exclude, batch)
        if self.parallel is not None:
            self.parallel.all_reduce_grads(self.embedder.trainable_parameters())
        return float(loss)

    def _global(self, q: Tensor, d: Tensor, batch: Sequence[Example]) -> tuple[Tensor, Tensor]:
        """The global batch's queries and documents from this worker's ``q`` and ``d``.

        Documents in the one-worker order: every worker's positives, then every worker's hard
        negatives. Only this worker's rows keep their autograd path. Without ``parallel``: ``q``
        and ``d`` unchanged.
        """
        if self.parallel is None:
            return q, d
        parts = self.parallel.gather(torch.cat([q, d]))
        queries, positives, negatives = [], [], []
        for rank, (part, shard) in enumerate(zip(parts, self.parallel.shards(batch))):
            n, m = len(shard), sum(len(ex.negatives) for ex in shard)
            if part.shape[0] != 2 * n + m:
                raise RuntimeError(
                    f"worker {rank} sent {part.shape[0]} embeddings for a shard of {n} examples "
                    f"with {m} hard negatives: the workers are not running the same schedule"
                )
            queries.append(part[:n])
            positives.append(part[n : 2 * n])
            negatives.append(part[2 * n :])
        return torch.cat(queries), torch.cat(positives + negatives)

    def _grad_cache(
        self,
        queries: list[Encoded],
        docs: list[Encoded],
        exclude: torch.Tensor,
        batch: Sequence[Example],
    ) -> Tensor:
        """GradCache (Gao et al. 2021): embed without graph, take the loss gradient w.r.t. the
        embeddings, then re-embed chunk by chunk with the graph and back-propagate those gradients.
        Same gradients as the full batch, memory of one chunk. With ``parallel`` the chunks are
        this worker's; the loss is the global batch's (:meth:`_global`)."""
        chunks = [queries[i : i + self.chunk] for i in range(0, len(queries), self.chunk)]
        n_q = len(chunks)
        chunks += [docs[i : i + self.chunk] for i in range(0, len(docs), self.chunk)]
        states, reps = [], []
        with torch.no_grad():
            for items in chunks:
                states.append(_RngState(self.embedder.device))
                reps.append(self.embedder(self.embedder.collate(items)))
        reps = [r.detach().requires_grad_() for r in reps]
        q, d = self._global(torch.cat(reps[:n_q]), torch.cat(reps[n_q:]), batch)
        loss = info_nce(q, d, self.temperature, exclude)
        loss.backward()
        loss = loss.detach()
        for items, state, rep in zip(chunks, states, reps):
            state.restore()
            out = self.embedder(self.embedder.collate(items))
            out.backward(rep.grad)
        return loss


def train_one(
    exp: Experiment,
    corpus: Corpus,
    *,
    output_dir: Path,
    on_metrics: MetricsCallback | None = None,
    progress: bool = True,
    name: str | None = None,
    revision: str = "base",
    parallel: DataParallel | None = None,
    checkpointing: Checkpointing | None = None,
    untrained: Callable[[Embedder, pl.DataFrame], dict[str, float]] | None = None,
) -> TrainResult:
    """Train one configuration on ``corpus``; save the model under ``output_dir/model``.

    ``untrained`` scores the model before its first step (``harness/untrained.py``: held-out and
    evaluation, cached per arm); without it only ``train.heldout_before``'s held-out score is taken.

    With ``parallel`` every worker calls this with the same arguments and trains on its shard of
    each global batch; only rank 0 reports metrics, scores the held-out rows and saves the model.
    The other workers return after the last step, with no held-out scores.

    With ``checkpointing`` the state is saved every ``checkpointing.every`` steps, and a
    ``checkpointing.resume`` state continues from its step: the steps after it, their metrics and
    the final model are those of the run that was never stopped.
    """
    t = exp.train
    follower = parallel is not None and parallel.rank != 0
    resume = checkpointing.resume if checkpointing else None
    stream: Stream = list(resume.stream) if resume else []
    report_to = on_metrics

    def report(step: int, metrics: dict[str, float]) -> None:
        stream.append((step, dict(metrics)))
        if report_to:
            report_to(step, metrics)

    on_metrics = None if follower else report
    set_seed(t.seed)  # python, numpy, torch (and CUDA) generators
    device = pick_device(t.device)
    train_frame, heldout = split_heldout(corpus.frame, t.heldout_size)
    schedule = schedule_for(t, train_frame)
    embedder = Embedder.from_settings(
        exp.model,
        device,
        lora=True,
        gradient_checkpointing=t.gradient_checkpointing,
        name=name,
        revision=revision,
    )
    # resuming: the untrained model's scores are in the checkpoint (and the driver's already)
    before: dict[str, float] = dict(resume.heldout_before) if resume else {}
    if not follower and resume is None:
        if untrained is not None:  # the trial's: cached per arm, with the evaluation's tasks
            before = untrained(embedder, heldout)
        elif t.heldout_before and heldout.height:
            scored = heldout_metrics(
                embedder, heldout, batch_size=exp.eval.batch_size, group_size=t.batch_size
            )
            before = {k.replace("heldout/", "heldout_base/"): v for k, v in scored.items()}
        if on_metrics and before:
            on_metrics(0, before)
    started = time.perf_counter()
    _optimize(
        embedder,
        schedule,
        exp,
        on_metrics,
        progress,
        parallel,
        checkpointing=checkpointing if checkpointing and not follower else None,
        resume=resume,
        before=before,
        stream=stream,
    )
    seconds = time.perf_counter() - started
    if follower:
        return TrainResult(Path(output_dir) / "model", {}, t.steps, seconds, schedule.level_order())
    embedder.eval()
    after = (
        heldout_metrics(embedder, heldout, batch_size=exp.eval.batch_size, group_size=t.batch_size)
        if heldout.height
        else {}
    )
    if on_metrics and after:
        on_metrics(t.steps, after)
    model_dir = embedder.save(
        Path(output_dir) / "model",
        corpus_sha256=corpus.sha256,
        level_order=schedule.level_order(),
        steps=t.steps,
        train=t.model_dump(mode="json"),  # for the model card of an export
    )
    return TrainResult(
        model_dir=model_dir,
        heldout=after,
        steps=t.steps,
        seconds=seconds,
        level_order=schedule.level_order(),
        heldout_before=before,
        stream=stream,
        resumed_from=resume.step if resume else None,
        embedder=embedder,
    )


def _optimize(
    embedder: Embedder,
    schedule: Schedule,
    exp: Experiment,
    on_metrics: MetricsCallback | None,
    progress: bool,
    parallel: DataParallel | None = None,
    *,
    checkpointing: Checkpointing | None = None,
    resume: TrainState | None = None,
    before: dict[str, float] | None = None,
    stream: Stream | None = None,
) -> None:
    """Run every step of ``schedule`` (those after ``resume.step`` when resuming); with
    ``parallel`` each worker calls this with the same schedule and the same initial weights (or the
    same ``resume``), and all of them take the same optimizer steps."""
    t = exp.train
    named = [(n, p) for n, p in embedder.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if not params:
        raise ValueError("nothing to train: no trainable parameters (check model.lora)")
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(min(t.warmup_steps, t.steps - 1), t.steps)
    )
    start = 0
    if resume is not None:
        _restore(named, optimizer, scheduler, resume, embedder.device)
        start = resume.step
    runner = StepRunner(embedder, t.temperature, t.grad_cache_chunk, parallel)
    embedder.train()
    bar = progress_bar() if progress else None
    with bar or nullcontext():
        task = (
            bar.add_task("training", total=len(schedule), completed=start, loss=math.nan, rate=0.0)
            if bar
            else None
        )
        for step in range(start + 1, len(schedule) + 1):
            batch = schedule.batches[step - 1]
            tick = time.perf_counter()
            loss = runner(batch)
            if t.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"training diverged at step {step}: loss {loss} (lower train.lr or raise train.temperature)"
                )
            rate = len(batch) / (time.perf_counter() - tick)
            if bar is not None:
                bar.update(task, advance=1, loss=loss, rate=rate)
            if on_metrics and (step % t.log_every == 0 or step == len(schedule)):
                level = schedule.step_level(step - 1)
                metrics = {"train/loss": loss, "train/lr": lr, "train/examples_per_s": rate}
                if isinstance(level, int):
                    metrics["train/level"] = float(level)
                on_metrics(step, metrics)
            if checkpointing and step % checkpointing.every == 0 and step < len(schedule):
                checkpointing.save(
                    TrainState(
                        step=step,
                        weights={n: p.detach().cpu().clone() for n, p in named},
                        optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict(),
                        rng=capture_rng(embedder.device),
                        stream=list(stream or []),
                        heldout_before=dict(before or {}),
                    )
                )
    check_finite(embedder, len(schedule))


def _restore(
    named: list[tuple[str, torch.nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainState,
    device: torch.device,
) -> None:
    """Put a checkpoint's weights, optimizer, LR schedule and RNG states back (the RNGs last:
    building the model drew from them)."""
    names = [n for n, _ in named]
    if sorted(names) != sorted(state.weights):
        missing = sorted(set(names) ^ set(state.weights))
        raise ValueError(
            f"the checkpoint of step {state.step} does not fit this model: "
            f"{len(missing)} trainable tensors differ (first: {missing[0]})"
        )
    with torch.no_grad():
        for name, p in named:
            p.copy_(state.weights[name].to(p.device))
    optimizer.load_state_dict(state.optimizer)
    scheduler.load_state_dict(state.scheduler)
    restore_rng(state.rng, device)


def check_finite(model: torch.nn.Module, step: int) -> None:
    """Raise unless every trainable weight is finite: the last update can diverge after the last
    loss was seen, and a model of NaNs would still score (argmax of NaN picks index 0)."""
    bad = [
        name
        for name, p in model.named_parameters()
        if p.requires_grad and not bool(torch.isfinite(p).all())
    ]
    if bad:
        raise FloatingPointError(
            f"training diverged by step {step}: {len(bad)} trainable tensors hold NaN or inf "
            f"(first: {bad[0]}); lower train.lr or raise train.temperature"
        )


def progress_bar(unit: str = "queries", *, get_time: Callable[[], float] | None = None):
    """A rich progress bar: step, loss, rate and ETA. The ETA is the mean speed of the whole run
    (``speed_estimate_period`` of an hour): rich's default 30 s window holds fewer than two
    updates when a step takes longer (MNTP on a loaded CPU), and then shows no ETA at all."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[rate]:.1f} " + unit + "/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        speed_estimate_period=3600.0,
        **({"get_time": get_time} if get_time is not None else {}),
    )
