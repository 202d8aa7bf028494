"""MNTP, masked next-token prediction: LLM2Vec's step that adapts a decoder to bidirectional attention.

What LLM2Vec does (``experiments/run_mntp.py``, ``train_configs/mntp/Mistral.json``), and so this:

- the decoder is made bidirectional and gets a LoRA (r 16, alpha 2r) on the transformer body, not
  the LM head, so the saved adapter has the weight names of the embedding model (``AutoModel``);
- texts are tokenized, concatenated and cut into blocks of ``max_length`` tokens (no padding);
- a share ``mask_probability`` (0.8) of the non-special tokens is replaced by the mask token (all
  of them: LLM2Vec's ``all_mask`` collator keeps no originals and draws no random tokens); the mask
  token is the tokenizer's own, else ``_`` (LLM2Vec's "blank" type for Llama and Mistral);
- the loss is cross-entropy on masked positions only, and the token at position *i* is predicted
  from the logits at position *i - 1* (the decoder's own shift: no new head, no re-indexing).

The adapter is saved with ``mntp.json`` (settings, text hash, loss before/after); a trial merges it
into the base with ``model.init_adapter`` before its own LoRA is added.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import set_seed

from harness.config import Experiment, MntpSettings
from harness.init_adapter import ADAPTER_FILES, MNTP_FILES, mntp_lock, mntp_state
from harness.init_adapter import MNTP_META as META_FILE
from harness.mntp_data import (
    MntpError,
    corpus_texts,
    make_blocks,
    mask_block,
    mask_token_id,
    read_texts,
)
from harness.models import (
    adapter_target,
    apply_lora,
    autocast_dtype,
    enable_gradient_checkpointing,
    load_backbone,
    pick_device,
)
from harness.train import lr_lambda, progress_bar
from harness.weights import file_hashes
from synth import outputs
from synth.processes import sigterm_as_ctrl_c

if TYPE_CHECKING:
    from rich.console import Console

    from synth.corpus import Corpus

log = logging.getLogger(__name__)
MetricsCallback = Callable[[int, dict[str, float]], None]


@dataclass
class MntpResult:
    output: Path
    steps: int
    seconds: float
    blocks: int  # training blocks of max_length tokens
    tokens: int  # tokens in the text (all blocks)
    text_sha256: str
    eval_before: dict[str, float]
    eval_after: dict[str, float]
    final_loss: float


COMMAND = "harness mntp"  # what synth.outputs.MARKER records in an adapter folder
WHAT = "mntp.output"
# what an adapter folder held before the marker existed (peft's files and ours)
ADAPTER_ENTRIES = (*ADAPTER_FILES, "README.md", META_FILE)


def _inputs(exp: Experiment) -> list[Path]:
    """What MNTP reads from disk: the base model when it is a folder, the text files and folders,
    the corpus when its texts are used; the adapter may not be, hold or lie in one."""
    assert exp.mntp is not None
    found = [Path(exp.model.name).expanduser()]
    found += [exp.resolve_path(exp.corpus.path if t == "corpus" else t) for t in exp.mntp.text]
    return [p for p in found if p.exists()]


def check_output(exp: Experiment, output: Path) -> None:
    """Refuse, before training, an ``output`` this command may not write (synth/outputs.py);
    an adapter folder from before the marker (only peft's files and ``mntp.json``) is adopted."""
    outputs.adopt(output, COMMAND, ADAPTER_ENTRIES, (output / META_FILE).is_file())
    outputs.check_output(output, COMMAND, inputs=_inputs(exp), force=True, what=WHAT)


def train_mntp(
    exp: Experiment,
    texts: Sequence[str],
    output: Path,
    *,
    on_metrics: MetricsCallback | None = None,
    progress: bool = True,
) -> MntpResult:
    """Train the MNTP adapter of ``exp.model`` on ``texts`` and save it to ``output``."""
    m: MntpSettings = exp.mntp  # type: ignore[assignment]
    if m is None:
        raise MntpError(f"{exp.source}: no mntp: block")
    set_seed(m.seed)
    device = pick_device(m.device)
    settings = exp.model.model_copy(
        update={"init_adapter": None, "init_adapter_sha256": None, "init_adapter_recipe": None}
    )
    backbone = load_backbone(settings, device, lm_head=True, attention=m.attention)
    if not backbone.is_decoder:
        raise MntpError(f"{exp.source}: MNTP needs a decoder LLM; {exp.model.name} is an encoder")
    lm, tokenizer = backbone.model, backbone.tokenizer
    mask_id = mask_token_id(tokenizer, m.mask_token)
    blocks = make_blocks(texts, tokenizer, m.max_length)
    special = torch.tensor(
        [
            tokenizer.get_special_tokens_mask(row, already_has_special_tokens=True)
            for row in blocks.tolist()
        ],
        dtype=torch.bool,
    )
    generator = torch.Generator().manual_seed(m.seed)
    perm = torch.randperm(blocks.shape[0], generator=generator)
    n_eval = min(m.eval_blocks, blocks.shape[0] // 5)  # keep most of a small text for training
    eval_idx, train_idx = perm[:n_eval], perm[n_eval:]
    if len(train_idx) == 0:
        raise MntpError(
            f"{exp.source}: mntp.text gives {blocks.shape[0]} block(s) of {m.max_length} tokens: too little text"
        )
    # the held-out blocks are masked once, so before/after see the same masks
    eval_inputs, eval_labels = mask_block(
        blocks[eval_idx], special[eval_idx], mask_id, m.mask_probability, generator
    )

    lm.model = apply_lora(adapter_target(lm), m.lora)  # the body only: names match AutoModel's
    if m.gradient_checkpointing:
        enable_gradient_checkpointing(lm.model)
    amp_dtype = autocast_dtype(settings, device)
    amp = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext

    def loss_of(inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        inputs, labels = inputs.to(device), labels.to(device)
        positions = torch.arange(inputs.shape[1], device=device).expand_as(inputs)
        with amp():
            out = lm(
                input_ids=inputs,
                attention_mask=torch.ones_like(inputs),
                position_ids=positions,
                labels=labels,
            )
        # the shift: logits at i - 1 predict the token at i
        predicted = out.logits[:, :-1].argmax(-1)
        target = labels[:, 1:]
        scored = target != -100
        return out.loss, int((predicted[scored] == target[scored]).sum()), int(scored.sum())

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        if n_eval == 0:
            return {}
        lm.eval()
        total, correct, count = 0.0, 0, 0
        for s in range(0, n_eval, m.batch_size):
            loss, c, n = loss_of(
                eval_inputs[s : s + m.batch_size], eval_labels[s : s + m.batch_size]
            )
            total += float(loss) * n
            correct, count = correct + c, count + n
        lm.train()
        return {
            "mntp/eval_loss": total / max(count, 1),
            "mntp/eval_accuracy": correct / max(count, 1),
        }

    before = evaluate()
    if on_metrics and before:
        on_metrics(0, before)
    params = [p for p in lm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=m.lr, weight_decay=m.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(min(m.warmup_steps, m.steps - 1), m.steps)
    )
    lm.train()
    order: list[int] = []
    loss_value = math.nan
    started = time.perf_counter()
    bar = progress_bar("blocks") if progress else None
    with bar or nullcontext():
        task = bar.add_task("MNTP", total=m.steps, loss=math.nan, rate=0.0) if bar else None
        for step in range(1, m.steps + 1):
            tick = time.perf_counter()
            if len(order) < m.batch_size:  # epochs of a seeded permutation of the training blocks
                order += train_idx[torch.randperm(len(train_idx), generator=generator)].tolist()
            idx, order = order[: m.batch_size], order[m.batch_size :]
            inputs, labels = mask_block(
                blocks[idx], special[idx], mask_id, m.mask_probability, generator
            )
            loss, _, _ = loss_of(inputs, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise FloatingPointError(
                    f"MNTP diverged at step {step}: loss {loss_value} (lower mntp.lr)"
                )
            rate = len(idx) / (time.perf_counter() - tick)
            if bar is not None:
                bar.update(task, advance=1, loss=loss_value, rate=rate)
            if on_metrics and (step % m.log_every == 0 or step == m.steps):
                on_metrics(
                    step, {"mntp/loss": loss_value, "mntp/lr": lr, "mntp/blocks_per_s": rate}
                )
    seconds = time.perf_counter() - started
    after = evaluate()
    if on_metrics and after:
        on_metrics(m.steps, after)
    if not all(math.isfinite(float(p.detach().float().abs().max())) for p in params):
        raise FloatingPointError("MNTP produced non-finite adapter weights")

    text_sha = hashlib.sha256("\n".join(texts).encode()).hexdigest()
    result = MntpResult(
        output=output,
        steps=m.steps,
        seconds=seconds,
        blocks=len(train_idx),
        tokens=int(blocks.numel()),
        text_sha256=text_sha,
        eval_before=before,
        eval_after=after,
        final_loss=loss_value,
    )
    # written whole (a staging sibling renamed into place), over an adapter of this command's
    # only (synth/outputs.py); the completion record (every file's sha256) is written last: a
    # folder whose mntp.json has one is complete and harness mntp's own
    with outputs.replacing(output, COMMAND, inputs=_inputs(exp), force=True, what=WHAT) as staging:
        lm.model.save_pretrained(staging)
        meta = {
            "base_model": exp.model.name,
            "settings": m.model_dump(mode="json"),
            **{k: v for k, v in asdict(result).items() if k != "output"},
            MNTP_FILES: file_hashes(staging, [f for f in staging.rglob("*") if f.is_file()]),
        }
        (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return result


# ---------------------------------------------------------------- the stage


def is_done(exp: Experiment, output: Path) -> bool:
    """Whether ``output`` holds a complete adapter (its files as recorded, finite weights) trained
    with these settings on this base model."""
    return exp.mntp is not None and mntp_state(exp, output).ready


def run_mntp(
    exp: Experiment,
    load_corpus_texts: Callable[[], list[str]] | None,
    *,
    output: Path | None = None,
    track: bool = True,
    force: bool = False,
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> MntpResult | None:
    """``harness mntp``: train the file's MNTP adapter (tracked as an MLflow run with role ``mntp``)
    unless ``output`` already holds a complete one with the same settings (then None). A folder
    that is not (cut short, changed, other settings) is trained again when it is harness mntp's
    own (its mntp.json), and refused otherwise."""
    if exp.mntp is None:
        raise MntpError(f"{exp.source}: no mntp: block (see README, 'The LLM2Vec backbone')")
    output = output or exp.resolve_path(exp.mntp.output)
    with mntp_lock(output, say):  # one builder of this folder at a time; the others wait
        state = mntp_state(exp, output)
        if state.ready and not force:
            say(
                f"MNTP adapter {output} is already trained with these settings (--force to train again)"
            )
            return None
        check_output(exp, output)  # never a user's folder, the texts or the base model
        if not state.ours:
            raise MntpError(
                f"{output}: {state.reason}, so not an adapter `harness mntp` completed; it is left "
                "alone: move it away or set mntp.output elsewhere"
            )
        if not state.ready and state.reason != "missing":
            say(f"MNTP adapter {output}: {state.reason}; training it again")
        return _train_and_track(exp, load_corpus_texts, output, track, progress, say)


def _train_and_track(
    exp: Experiment,
    load_corpus_texts: Callable[[], list[str]] | None,
    output: Path,
    track: bool,
    progress: bool,
    say: Callable[[str], None],
) -> MntpResult:
    from harness.config import flatten
    from harness.tracking import Tracker, describe_error

    assert exp.mntp is not None
    texts = read_texts(exp.mntp.text, exp, load_corpus_texts)
    tracker = run_id = None
    if track:
        tracker = Tracker(exp.tracking, exp.name, exp.source)
        for name in tracker.close_stale_runs():  # a SIGKILLed `harness mntp` could not end its run
            say(f"marked KILLED {name}: left RUNNING by a process that is gone")
        params = flatten(
            {
                "mntp": exp.mntp.model_dump(mode="json"),
                "model": {
                    "name": exp.model.name,
                    "revision": exp.model.revision,
                    "dtype": exp.model.dtype,
                },
            }
        )
        run_id = tracker.start_trial(
            None, name="mntp", params=params, tags={"mntp.output": str(output)}, role="mntp"
        )
        say(f"MLflow run {run_id} in experiment {exp.name!r} ({tracker.display_uri})")

    def on_metrics(step: int, metrics: dict[str, float]) -> None:
        if tracker is not None:
            tracker.log_metrics(run_id, metrics, step=step)

    try:
        with sigterm_as_ctrl_c():  # `kill` ends the run as KILLED, like Ctrl-C
            result = train_mntp(exp, texts, output, on_metrics=on_metrics, progress=progress)
        if tracker is not None:
            tracker.set_tags(run_id, {"mntp.text_sha256": result.text_sha256})
            tracker.log_artifacts(run_id, output, "adapter")
            tracker.finish_trial(run_id)
    except KeyboardInterrupt:
        if tracker is not None:
            tracker.kill_trial(run_id)
        raise
    except BaseException as e:
        if tracker is not None:
            tracker.fail_trial(run_id, describe_error(e))
        raise
    b, a = result.eval_before, result.eval_after
    scores = (
        f"; held-out masked-token loss {b['mntp/eval_loss']:.3f} -> {a['mntp/eval_loss']:.3f}, "
        f"accuracy {b['mntp/eval_accuracy']:.3f} -> {a['mntp/eval_accuracy']:.3f}"
        if b and a
        else ""
    )
    say(
        f"MNTP: {result.steps} steps on {result.blocks} blocks ({result.tokens} tokens) in "
        f"{result.seconds:.0f} s{scores}; adapter in {output}"
    )
    return result


def mntp_builder(corpus: Corpus, console: Console) -> Callable[[Experiment, Path], None]:
    """Builds a missing init adapter that is the file's ``mntp.output``, once, on the driver."""

    def build(exp: Experiment, output: Path) -> None:
        console.print(f"[bold]training the MNTP adapter[/] -> {output}")
        run_mntp(exp, lambda: corpus_texts(corpus.frame), output=output, say=console.print)

    return build
