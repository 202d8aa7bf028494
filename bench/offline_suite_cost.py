"""Per-task cost of the offline evaluation suite on the small backbone, at the caps a small trial uses.

The model is the small ablations' (``experiments/small/pooling.yaml``'s model settings: packaged
SmolLM2-135M, bidirectional attention, the llm2vec format, lengths 64, bf16 autocast, ATA pooling,
the costliest pooling), untrained and without the MNTP adapter (merged LoRA weights cost nothing
at inference, so the time is the same). Each task of the ``offline`` suite is evaluated through the
harness (``evaluate_embedder``: mteb's evaluators) at ``--max-examples`` / ``--max-docs``, once,
with a fresh result cache; the report gives seconds, texts encoded and texts per second per task,
and the suite's total against the training time of a 60-step small trial measured in the same run
(``--train-steps`` steps of the same model, scaled to 60).

    OMP_NUM_THREADS=2 python bench/offline_suite_cost.py --max-examples 250 --max-docs 1000
"""

from __future__ import annotations

# _common first: importing it sets the offline environment (HF_HUB_OFFLINE, ...)
from _common import Report, parse, parser

# isort: split
import tempfile
import time

from harness.config import EvalSettings
from harness.embedder import Embedder
from harness.evaluation.run import evaluate_embedder
from harness.evaluation.suites import data_dir, suite
from harness.experiment_file import load_experiment

NAME = "offline_suite_cost"
QUICK = {"max_examples": 10, "max_docs": 50, "train_steps": 2}
SMALL_TRIAL_STEPS = 60


def train_seconds(steps: int) -> float:
    """Seconds per step of the small pooling trial's training (ATA, its batch and lengths)."""
    from harness.experiment_file import apply_cell
    from harness.train import train_one
    from synth.corpus import read_corpus

    exp = load_experiment(
        "experiments/small/pooling.yaml",
        ["model.init_adapter=null", f"train.steps={steps}", "train.heldout_size=0",
         "train.warmup_steps=0", "corpus.path=../../results/corpora/smoke"],
    )  # fmt: skip
    exp = apply_cell(exp, {"model.pooling": "ata", "train.seed": 1})
    corpus = read_corpus(exp.resolve_path(exp.corpus.path))
    with tempfile.TemporaryDirectory() as tmp:
        result = train_one(exp, corpus, output_dir=tmp, progress=False)
    return result.seconds / steps


def main() -> None:
    ap = parser(__doc__, NAME)
    ap.add_argument("--max-examples", type=int, default=250)
    ap.add_argument("--max-docs", type=int, default=1000)
    ap.add_argument("--train-steps", type=int, default=6, help="steps timed to get s/step")
    args = parse(ap, QUICK)
    exp = load_experiment("experiments/small/pooling.yaml", ["model.init_adapter=null"])
    settings = exp.model.model_copy(update={"pooling": "ata"})
    embedder = Embedder.from_settings(settings, "cpu")
    rows = []
    total = 0.0
    data = data_dir()
    for task in suite("offline").tasks:
        folder = task.replace("${NM_SHARED_DATA}", str(data))
        evaluation = EvalSettings(
            tasks=[folder], max_examples=args.max_examples, max_docs=args.max_docs, batch_size=32
        )
        counted = Counting(embedder)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            result = evaluate_embedder(counted, evaluation, output_dir=tmp, progress=False)
        seconds = time.perf_counter() - started
        total += seconds
        row = result.frame.row(0, named=True)
        rows.append(
            [row["task"], row["category"], f"{100 * row['score']:.2f}", f"{seconds:.0f}",
             counted.texts, f"{counted.texts / seconds:.1f}", row["note"] or "whole"]
        )  # fmt: skip
        print(rows[-1], flush=True)
    per_step = train_seconds(args.train_steps)
    training = per_step * SMALL_TRIAL_STEPS
    report = Report(
        f"Offline suite cost: max_examples {args.max_examples}, max_docs {args.max_docs}"
    )
    report.para(
        "Small backbone (SmolLM2-135M bidirectional, llm2vec format, lengths 64, bf16 autocast, "
        "ATA), untrained. Scores are an untrained model's and mean nothing; the time is the point."
    )
    report.table(
        ["task", "category", "score", "seconds", "texts", "texts/s", "sample"], rows,
        "llrrrrl",
    )  # fmt: skip
    report.para(
        f"Suite: {total:.0f} s. Training of a {SMALL_TRIAL_STEPS}-step small trial, measured here "
        f"({args.train_steps} steps): {per_step:.2f} s/step -> {training:.0f} s; evaluation is "
        f"{total / (total + training):.0%} of evaluation + training."
    )
    report.write(args.out)


class Counting:
    """The embedder, counting the texts mteb asks it to encode (delegates everything else)."""

    def __init__(self, inner: Embedder) -> None:
        self._inner = inner
        self.texts = 0

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def encode(self, texts, **kwargs):
        self.texts += len(texts)
        return self._inner.encode(texts, **kwargs)


if __name__ == "__main__":
    main()
