"""Shared bits of the benchmark scripts: offline environment, machine description, thread setting,
interleaved timing with warm-up and repetitions, medians, and the Markdown report they all write.

Every script in ``bench/`` compares two (or more) things in the same process on the same machine.
Repetitions are interleaved round-robin with the order rotated each round (A, B, then B, A, ...),
so load drift on a shared machine and first-in-round effects hit every variant alike; reports give
medians and ratios. Importing this module sets the offline environment (no Hugging Face Hub), so
import it before torch, transformers or the harness.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

STARTED = time.time()  # the script's start: reports say how long the whole run took
REPO = Path(__file__).resolve().parents[1]
RESULTS = Path("results") / "bench"  # relative to the working directory, like every harness output

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_ENABLE_ASYNC_LOGGING": "false",
}.items():
    os.environ.setdefault(_key, _value)

from harness.logs import quiet_logs  # noqa: E402  (after the environment above)

quiet_logs(verbose=os.environ.get("BENCH_VERBOSE") == "1")  # no weight-loading bars in the reports

SMOLLM2 = "packaged:smollm2-135m-instruct"
# ST v6 renders a decoder's inputs through its chat template ("message" modality) unless the
# module is pinned to plain text: the harness feeds plain text, so the comparisons pin it too.
TEXT_ONLY = {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}


# ---------------------------------------------------------------- command line


def parser(doc: str | None, name: str) -> argparse.ArgumentParser:
    """An argument parser with the options every script shares: --quick, --threads, --out."""
    text = (doc or name).strip()
    ap = argparse.ArgumentParser(
        description=text.splitlines()[0],
        epilog="\n".join(text.splitlines()[1:]).strip() or None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes: checks that the script works in a minute (its numbers mean little); "
        f"writes {RESULTS / (name + '.quick.md')} unless --out is given",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice; 1 is steadier on a shared machine)",
    )
    ap.add_argument("--out", type=Path, default=None, help=f"default {RESULTS / (name + '.md')}")
    ap.set_defaults(bench_name=name)
    return ap


def parse(ap: argparse.ArgumentParser, quick: Mapping[str, Any]) -> argparse.Namespace:
    """Parse, then with --quick replace every option still at its default by its quick value."""
    args = ap.parse_args()
    if args.quick:
        for key, value in quick.items():
            if getattr(args, key) == ap.get_default(key):
                setattr(args, key, value)
    if args.out is None:
        args.out = RESULTS / (args.bench_name + (".quick.md" if args.quick else ".md"))
    set_threads(args.threads)
    return args


def set_threads(n: int | None) -> None:
    """Set torch's intra-op threads (None: torch's default, $OMP_NUM_THREADS or the cores)."""
    if n:
        import torch

        torch.set_num_threads(n)


def command_line() -> str:
    """The exact command that ran, with the environment that changes timings and the niceness."""
    env = [
        f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ
    ]
    niceness = os.nice(0)
    nice = [f"nice -n {niceness}"] if niceness else []
    script = os.path.relpath(os.path.abspath(sys.argv[0]), Path.cwd())
    return " ".join([*env, *nice, "python", shlex.join([script, *sys.argv[1:]])])


# ---------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str = "cpu", libs: Sequence[str] = ()) -> str:
    """CPU model, cores, torch version and threads, device, library versions, load and niceness."""
    import torch

    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    omp = os.environ.get("OMP_NUM_THREADS")
    parts = [
        f"{cpu_model()}, {cores} cores" + (f" ({usable} usable)" if usable != cores else ""),
        f"torch {torch.__version__} with {torch.get_num_threads()} threads"
        + (f" (OMP_NUM_THREADS={omp})" if omp else ""),
        f"Python {platform.python_version()}",
    ]
    parts += [f"{lib} {_version(lib)}" for lib in libs]
    dev = f"device {device}"
    if device.startswith("cuda") and torch.cuda.is_available():
        dev += f" ({torch.cuda.get_device_name()})"
    parts.append(dev)
    parts.append("load average {:.2f} / {:.2f} / {:.2f}".format(*os.getloadavg()))
    if os.nice(0):
        parts.append(f"nice {os.nice(0)}")
    return ", ".join(parts)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "(not installed)"


def corpus_path(path: Path | None) -> Path:
    """``path``, or the smoke experiment's corpus, built on first use exactly as ``harness sweep
    experiments/smoke.yaml`` builds it (mined from the shared SNLI triplets)."""
    if path is not None:
        return path
    from rich.console import Console

    from harness.corpora import load_corpus
    from harness.experiment_file import load_experiment

    exp = load_experiment(REPO / "experiments" / "smoke.yaml")
    load_corpus(exp, Console(stderr=True))  # builds it when missing
    return Path(os.path.relpath(exp.resolve_path(exp.corpus.path).resolve()))


def sentence_transformer(folder: str, max_length: int, device: str = "cpu") -> Any:
    """A plain sentence-transformers v6 model over ``folder``: Transformer (fp32, sdpa, plain
    text) + mean Pooling, truncating at ``max_length`` tokens."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    transformer = Transformer(
        folder,
        max_seq_length=max_length,
        model_kwargs={"dtype": torch.float32, "attn_implementation": "sdpa"},
        modality_config=TEXT_ONLY,
        module_output_name="token_embeddings",
    )
    pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
    return SentenceTransformer(modules=[transformer, pooling], device=device)


# ---------------------------------------------------------------- timing


def rounds(names: Sequence[str], reps: int, warmup: int = 0) -> Iterator[tuple[int, str]]:
    """``(round, name)``: every name once per round, the order rotated each round (A, B; B, A; ...).
    Warm-up rounds come first and have a negative round number."""
    names = list(names)
    for r in range(-warmup, reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            yield r, name


def time_interleaved(
    variants: Mapping[str, Callable[[], object]],
    reps: int,
    *,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each variant over ``reps`` interleaved rounds after ``warmup`` ones."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r, name in rounds(list(variants), reps, warmup):
        if sync:
            sync()
        start = time.perf_counter()
        variants[name]()
        if sync:
            sync()
        if r >= 0:
            times[name].append(time.perf_counter() - start)
    return times


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float], digits: int = 3) -> str:
    """``min–max`` of the repetitions, to show how steady the median is."""
    if not values:
        return ""
    return f"{min(values):.{digits}f}–{max(values):.{digits}f}"


def diffs(stamps: Sequence[float], skip: int = 0) -> list[float]:
    """Gaps between consecutive time stamps, leaving out the first ``skip`` gaps (warm-up)."""
    return [b - a for a, b in itertools.pairwise(stamps)][skip:]


# ---------------------------------------------------------------- report


def table(
    headers: Sequence[str], rows: Iterable[Sequence[object]], align: str | None = None
) -> list[str]:
    """A Markdown table; ``align``: a character per column, ``l`` or ``r`` (default ``lrr...``)."""
    align = align or "l" + "r" * (len(headers) - 1)
    rule = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


class Report:
    """Lines of Markdown; :meth:`write` adds the machine and the exact command, writes, prints."""

    def __init__(self, title: str, *, device: str = "cpu", libs: Sequence[str] = ()) -> None:
        self.title = title
        self.device = device
        self.libs = tuple(libs)
        self.lines: list[str] = []
        self.started = STARTED

    def add(self, *lines: str) -> Report:
        self.lines.extend(lines)
        return self

    def para(self, text: str) -> Report:
        return self.add(text, "")

    def table(
        self, headers: Sequence[str], rows: Iterable[Sequence[object]], align: str | None = None
    ) -> Report:
        return self.add(*table(headers, rows, align), "")

    def code(self, text: str) -> Report:
        return self.add("```", text.rstrip("\n"), "```", "")

    def text(self) -> str:
        took = time.time() - self.started
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.started))
        head = [
            f"# {self.title}",
            "",
            f"Machine: {machine(self.device, self.libs)}.",
            "",
            f"Run {when}, took {took:.0f} s.",
            "",
        ]
        tail = ["Command:", "", "```", command_line(), "```", ""]
        return "\n".join([*head, *self.lines, *tail])

    def write(self, out: Path) -> Path:
        text = self.text()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        print(text)
        print(f"wrote {out}", file=sys.stderr)
        return out
