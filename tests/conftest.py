"""Shared test set-up: offline by default, real data from ../shared/data, small real models."""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from pathlib import Path

# Never let a test wait on the Hugging Face Hub (unreachable here): fail fast instead.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """``$NM_SHARED_DATA`` or the ``shared/data`` folder beside the checkout."""
    env = os.environ.get("NM_SHARED_DATA")
    if env:
        return Path(env)
    for base in (REPO.parent, REPO.parent.parent):
        if (base / "shared" / "data").is_dir():
            return base / "shared" / "data"
    return REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = shared_data_dir()
    if not d.is_dir():
        message = f"shared evaluation data not found at {d} (set NM_SHARED_DATA)"
        if os.environ.get("CI"):  # CI has the data: a test must not pass there by skipping
            pytest.fail(message)
        pytest.skip(message)
    return d


def snli_frame(shared: Path, n: int = 200, seed: int = 0):
    """A small corpus frame from the real SNLI triplets: neg_1 = the contradiction hypothesis,
    neg_2..neg_4 = entailments of other premises (unrelated, so easier). For unit tests of the
    format and the trainer; graded mining lives in ``synth mine``."""
    import json

    from synth.corpus import RowBuilder

    rows = [
        json.loads(line)
        for line in (shared / "SNLI-triplets" / "train.jsonl").open(encoding="utf-8")
    ]
    rows = [r for r in rows if r.get("negative")][: n * 2]
    rng = random.Random(seed)
    builder = RowBuilder()
    for r in rows[:n]:
        others = rng.sample(rows, 3)
        builder.add(
            source="snli",
            task_kind="symmetric",
            subtask="sts",
            instruction="Retrieve semantically similar text.",
            query=r["query"],
            positive=r["positive"],
            negatives=[r["negative"], *(o["positive"] for o in others)],
        )
    return builder.frame()


@pytest.fixture(scope="session")
def tiny_corpus_dir(tmp_path_factory, shared_data) -> Path:
    from synth.corpus import write_corpus

    d = tmp_path_factory.mktemp("corpus") / "snli-tiny"
    write_corpus(snli_frame(shared_data, 120), d, name="snli-tiny", build={"kind": "test-fixture"})
    return d


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from synth.packaged import resolve

    return Path(resolve("packaged:smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from synth.packaged import resolve

    return Path(resolve("packaged:all-minilm-l6-v2"))


@pytest.fixture(scope="session")
def real_server(smollm2_dir: Path):
    """``transformers serve`` with the packaged SmolLM2 on loopback, started once per session."""
    from synth.server import local_server
    from synth.synth_config import LocalServer

    t0 = time.monotonic()
    with local_server(
        LocalServer(model=str(smollm2_dir), continuous_batching=False, startup_timeout_s=300)
    ) as server:
        print(f"\ntransformers serve ready in {time.monotonic() - t0:.1f}s")
        yield server
    with pytest.raises(ProcessLookupError):  # stopped with its whole process group: no orphan
        os.killpg(server.pid, 0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures(...)``): on a busy
    small machine two threads spin against each other (10x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray start per module (~3-20 s here); run_sweep reuses a connection it finds, and
    Ray workers can import ``tests/sweep_standins``."""
    ray = pytest.importorskip("ray")
    from sweep_util import worker_pythonpath

    mp = pytest.MonkeyPatch()
    mp.setenv("PYTHONPATH", worker_pythonpath())
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()
    mp.undo()


# ---- the fault suite's counts (pytest -m faults) ------------------------------------------------

TALLY_FIELDS = ("cases", "faults", "rows", "trials", "searched", "lost")


class Tally:
    """What the fault tests tried, per test module: cases (inputs, runs, fuzz examples), faults
    injected for real, rows and trials checked against an uninterrupted run, files and outputs
    searched for a planted secret, and what was lost."""

    def __init__(self) -> None:
        self.by_module: dict[str, Counter[str]] = {}

    def add(self, module: str, **counts: int) -> None:
        unknown = set(counts) - set(TALLY_FIELDS)
        assert not unknown, f"unknown tally field(s) {unknown}"
        self.by_module.setdefault(module, Counter()).update(counts)

    def total(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for counts in self.by_module.values():
            out.update(counts)
        return out


TALLY = Tally()


class ModuleTally:
    def __init__(self, module: str) -> None:
        self.module = module

    def __call__(self, **counts: int) -> None:
        TALLY.add(self.module, **counts)


@pytest.fixture
def tally(request: pytest.FixtureRequest) -> ModuleTally:
    """``tally(cases=1, faults=3, rows=12)``: add to this module's counts in the suite summary."""
    return ModuleTally(request.node.module.__name__.rsplit(".", 1)[-1])


def repeats(ci: int, full: int) -> int:
    """Repetitions of a randomized fault test: ``ci`` by default, ``full`` with NM_FAULTS_FULL=1,
    or exactly $NM_FAULTS_REPEAT."""
    if os.environ.get("NM_FAULTS_REPEAT"):
        return int(os.environ["NM_FAULTS_REPEAT"])
    return full if os.environ.get("NM_FAULTS_FULL") == "1" else ci


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """One line of totals when fault tests ran (and one per module with ``-v``)."""
    faults_run = [
        r
        for key in ("passed", "failed", "error")
        for r in terminalreporter.stats.get(key, [])
        if getattr(r, "when", "call") == "call" and "faults" in getattr(r, "keywords", {})
    ]
    if not faults_run and not TALLY.by_module:
        return
    passed = sum(r.outcome == "passed" for r in faults_run)
    t = TALLY.total()
    terminalreporter.write_line(
        f"faults suite: {passed}/{len(faults_run)} tests passed; {t['cases']} cases tried, "
        f"{t['faults']} faults injected, {t['rows']} rows and {t['trials']} trials checked, "
        f"{t['searched']} files and outputs searched for a planted key, {t['lost']} lost"
    )
    if config.getoption("verbose") > 0:
        for module, counts in sorted(TALLY.by_module.items()):
            terminalreporter.write_line(
                f"  {module}: " + ", ".join(f"{k} {counts[k]}" for k in TALLY_FIELDS)
            )
