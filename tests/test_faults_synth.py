"""`synth generate` under faults. The LLM endpoint's are injected for real by a loopback proxy
(``tests/fault_proxy.py``) in front of the scripted fake OpenAI server (deterministic answers, so a
faulted run can be compared with a clean one row for row) and, once, in front of the real local
``transformers serve``.

Transport faults (dropped connections, answers cut off mid-body, requests held past the client's
timeout, slow answers, 429 with Retry-After, 500, 503) are retried with backoff and lose nothing;
malformed answers (a gateway's HTML page, non-UTF-8 bytes, lone surrogates, huge answers, missing
fields, wrong types) are retried or rejected with a reason and never crash the run; the token
budget is never exceeded by more than the requests in flight; a run that gives up says why, and a
rerun finishes with exactly the rows of an uninterrupted run. So does a run SIGKILLed several times
at random moments.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import repeats
from fault_proxy import (
    BODY_FAULTS,
    HUGE_CHARS,
    RETRY_AFTER_S,
    FaultPlan,
    ProxyLog,
    Timing,
    fault_proxy,
)
from faults_util import PLANTED_KEY, assert_secret_absent, env_with, listen_addresses
from rich.console import Console
from sweep_util import write_experiment
from synth_servers import Recorder, good_with, scripted, serve, synth_config_file, without_usage
from typer.testing import CliRunner

from harness.cli import app as harness_app
from harness.corpora import load_corpus
from harness.experiment_file import load_experiment
from synth.answers import INVALID_UNICODE, Rejected, parse_example
from synth.assemble import REJECTS_FILE
from synth.cli import app
from synth.corpus import Corpus, read_corpus
from synth.generate import JOURNAL_FILE, generate
from synth.journal import Journal
from synth.server import command
from synth.synth_config import LocalServer, SynthConfig, Validation, load_synth_config

pytestmark = pytest.mark.faults

TOKENS_PER_REQUEST = 30  # the fake server's usage per answer (10 prompt + 20 completion)
REQUESTS = 16  # synth_config_file's plan: 4 brainstorm + 12 examples
RETRIED_BODY_FAULTS = {"not_json", "non_utf8", "no_choices", "content_number", "content_list"}
runner = CliRunner()


@pytest.fixture(scope="module")
def upstream() -> Any:
    with serve(scripted()) as url:
        yield url


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> str:
    """The API key, given the usual way: OPENAI_API_KEY in the environment."""
    monkeypatch.setenv("OPENAI_API_KEY", PLANTED_KEY)
    return PLANTED_KEY


def config_path(tmp: Path, url: str, **overrides: Any) -> Path:
    endpoint = {
        "base_url": url,
        "api_key_env": "OPENAI_API_KEY",
        "timeout_s": 3.0,
        "max_retries": 10,
        "backoff_max_s": 1.0,
        **overrides.pop("endpoint", {}),
    }
    return synth_config_file(tmp, endpoint=endpoint, **overrides)


def config(tmp: Path, url: str, **overrides: Any) -> SynthConfig:
    return load_synth_config(config_path(tmp, url, **overrides))


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, upstream: str) -> Corpus:
    """The corpus of an uninterrupted, fault-free run: what every faulted run must end with."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENAI_API_KEY", PLANTED_KEY)
        result = generate(config(tmp_path_factory.mktemp("straight"), upstream), progress=False)
    assert result.complete
    return result.corpus


def journaled_once(corpus_dir: Path) -> int:
    """Every journal line is a different request; return how many."""
    lines = [
        json.loads(line) for line in (corpus_dir / "work" / JOURNAL_FILE).read_bytes().splitlines()
    ]
    keys = Counter(r["key"] for r in lines)
    assert max(keys.values()) == 1, "a request was journaled twice"
    return len(keys)


def assert_retried_only_after_faults(log: ProxyLog) -> None:
    """A request comes again only after a fault, and after a 429 not before its Retry-After."""
    for arrivals in log.by_seed().values():
        for a, b in itertools.pairwise(arrivals):
            assert a.fault != "pass", "an answered request was sent again"
            if a.fault == "429":
                assert b.t - a.t >= RETRY_AFTER_S * 0.95, "Retry-After was not honoured"


def answered_seeds(corpus_dir: Path) -> set[int]:
    """The sampling seeds of the requests journaled so far (the proxy logs requests by seed)."""
    return {int(k[:8], 16) for k in Journal(corpus_dir / "work" / JOURNAL_FILE).read()}


def assert_resumed_losing_nothing(
    tmp: Path,
    corpus: Corpus,
    straight: Corpus,
    log: ProxyLog,
    resumed_at: int,
    answered: set[int],
    outputs: list[str],
    tally: Any,
) -> None:
    """The run resumed at arrival ``resumed_at`` asked for no ``answered`` request again, ended
    with the rows of an uninterrupted run, and wrote the key nowhere."""
    again = {a.seed for a in log.arrivals[resumed_at:]}
    assert not again & answered, "an answered request was sent again"
    assert corpus.sha256 == straight.sha256
    searched = assert_secret_absent(PLANTED_KEY, [tmp], outputs)
    tally(
        cases=2,
        faults=sum(log.injected.values()),
        rows=len(corpus),
        searched=searched,
        lost=len(straight) - len(corpus),
    )


def test_transport_faults_are_retried_with_backoff_and_lose_nothing(
    tmp_path: Path, key: str, upstream: str, straight: Corpus, tally: Any
) -> None:
    script = ["drop", "cut", "hang", "429", "slow", "500", "503", "429", "drop", "slow"]
    with fault_proxy(upstream, FaultPlan(script)) as (url, log):
        result = generate(config(tmp_path, url, concurrency=3), progress=False)
    manifest = result.corpus.manifest
    assert log.injected == Counter(script)
    assert result.complete and result.corpus.sha256 == straight.sha256
    assert manifest["requests"]["retries_this_run"] >= sum(f != "slow" for f in script)
    assert manifest["usage"]["requests"] == REQUESTS == journaled_once(tmp_path / "corpus")
    assert_retried_only_after_faults(log)
    searched = assert_secret_absent(key, [tmp_path])
    tally(
        searched=searched,
        cases=1,
        faults=len(script),
        rows=len(result.corpus),
        lost=len(straight) - len(result.corpus),
    )


def test_a_huge_retry_after_is_capped_by_backoff_max(
    tmp_path: Path, key: str, upstream: str, tally: Any
) -> None:
    """A server asking for an hour's wait does not stall the run: waits stop at backoff_max_s."""
    with fault_proxy(upstream, FaultPlan(["429", "429"]), Timing(retry_after_s=3600)) as (url, log):
        result = generate(
            config(tmp_path, url, concurrency=1, endpoint={"backoff_max_s": 0.2}), progress=False
        )
    assert result.complete and log.injected == {"429": 2}
    assert result.corpus.manifest["timing"]["this_run_s"] < 60
    tally(cases=1, faults=2, rows=len(result.corpus))


def test_malformed_answers_are_retried_or_rejected_with_a_reason_and_never_crash(
    tmp_path: Path, key: str, upstream: str, straight: Corpus, tally: Any
) -> None:
    # one request at a time, stage 1 clean: each body fault lands on one stage-2 request
    script = ["pass"] * 4 + list(BODY_FAULTS)
    with fault_proxy(upstream, FaultPlan(script)) as (url, log):
        result = generate(config(tmp_path, url, concurrency=1), progress=False)
    manifest = result.corpus.manifest
    assert result.complete and log.injected == Counter(BODY_FAULTS)
    assert manifest["requests"]["retries_this_run"] >= len(RETRIED_BODY_FAULTS)
    assert_retried_only_after_faults(log)
    # answers that came but cannot be text go to rejects.jsonl with their reason
    seed_of = {a.fault: a.seed for a in log.arrivals if a.fault != "pass"}
    rejects = {r["key"]: r for r in map(json.loads, (tmp_path / "corpus" / REJECTS_FILE).open())}
    reasons = {int(k[:8], 16): r["reason"] for k, r in rejects.items()}
    surrogate = seed_of["surrogate"]
    assert reasons[surrogate] == ("malformed_json" if surrogate % 4 == 0 else INVALID_UNICODE)
    assert (
        reasons[seed_of["huge"]] == "truncated"
    )  # more than max_tokens can hold: cut, then rejected
    assert (
        max(len(r["raw"]) for r in rejects.values()) <= 4096
    )  # nothing stored whole: not the 3 MB
    assert (tmp_path / "corpus" / "work" / "journal.jsonl").stat().st_size < HUGE_CHARS / 10
    assert sum(manifest["rejects"].values()) == len(rejects)
    # every other answer made the same rows as the clean run
    damaged = {f"query {seed_of[f]}" for f in ("surrogate", "huge")}
    expected = straight.frame.filter(~straight.frame["query"].is_in(list(damaged)))
    assert sorted(result.corpus.frame["id"]) == sorted(expected["id"])
    # answers without a usable usage are counted by estimate (4 characters a token), and said to
    # be; the others as the server counted them; nothing is counted twice
    no_usage = sum(f in ("usage_strings", "no_usage", "bare_content") for f in BODY_FAULTS)
    assert manifest["usage"]["estimated_requests"] == no_usage
    records = [
        json.loads(line)
        for line in (tmp_path / "corpus" / "work" / "journal.jsonl").read_text().splitlines()
        if line.strip()
    ]
    estimated = sum(
        r["prompt_tokens"] + r["completion_tokens"] for r in records if r.get("usage_estimated")
    )
    assert estimated > 0
    assert (
        manifest["usage"]["total_tokens"]
        == straight.manifest["usage"]["total_tokens"] - no_usage * TOKENS_PER_REQUEST + estimated
    )
    assert journaled_once(tmp_path / "corpus") == REQUESTS
    tally(
        cases=1,
        faults=len(BODY_FAULTS),
        rows=len(result.corpus),
        lost=len(expected) - len(result.corpus),
    )


def test_text_that_is_not_unicode_is_rejected_by_name() -> None:
    limits = Validation()
    for text in (good_with(query="\ud800 tides"), good_with(positive="caf\ufffd au lait")):
        with pytest.raises(Rejected) as e:
            parse_example(text, limits)
        assert e.value.reason == INVALID_UNICODE


@pytest.mark.parametrize(
    ("fault", "kind"), [("503", "http_503"), ("drop", "connection"), ("not_json", "bad_response")]
)
def test_a_run_that_gives_up_says_why_and_a_rerun_finishes(
    fault: str, kind: str, tmp_path: Path, key: str, upstream: str, straight: Corpus, tally: Any
) -> None:
    """The endpoint breaks for good after 8 answers: the run says why (failure kind, last error)
    and exits 1; the finished answers are kept, and the rerun after the endpoint heals asks for
    none of them again and ends with the rows of an uninterrupted run."""
    plan = FaultPlan(["pass"] * 8, always=fault)
    with fault_proxy(upstream, plan) as (url, log):
        path = config_path(tmp_path, url, concurrency=1, endpoint={"max_retries": 2})
        first = runner.invoke(app, ["generate", str(path), "-q"])
        assert first.exit_code == 1, first.output
        failed = REQUESTS - 8
        assert f"{failed} request(s) failed ({kind} {failed}); last error:" in first.output
        assert (
            "after 3 attempt(s)" in first.output
            and "incomplete: some requests failed" in first.output
        )
        answered = answered_seeds(tmp_path / "corpus")
        assert len(answered) == 8
        before = len(log.arrivals)
        plan.always = None
        second = runner.invoke(app, ["generate", str(path), "-q"])
    assert second.exit_code == 0, second.output
    corpus = read_corpus(tmp_path / "corpus")
    assert_resumed_losing_nothing(
        tmp_path, corpus, straight, log, before, answered, [first.output, second.output], tally
    )


def test_a_rejected_key_stops_the_run_at_once_without_showing_the_key(
    tmp_path: Path, key: str, upstream: str, straight: Corpus, tally: Any
) -> None:
    """A 401 (whose error text echoes the key, as some servers do) ends the run with one line
    naming the endpoint and the status; the answers before it are kept for the rerun."""
    plan = FaultPlan(["pass"] * 5, always="401")
    with fault_proxy(upstream, plan) as (url, log):
        path = config_path(tmp_path, url, concurrency=1)
        first = runner.invoke(app, ["generate", str(path), "-q"])
        plan.always = None
        second = runner.invoke(app, ["generate", str(path), "-q"])
    assert first.exit_code == 2 and "HTTP 401 after 1 attempt(s)" in first.output, first.output
    assert url in first.output and "Bearer ***" in first.output and "Traceback" not in first.output
    assert log.injected == {"401": 1}
    assert second.exit_code == 0 and read_corpus(tmp_path / "corpus").sha256 == straight.sha256
    searched = assert_secret_absent(key, [tmp_path], [first.output, second.output])
    tally(searched=searched, cases=2, faults=1, rows=len(straight))


@pytest.mark.parametrize("concurrency", [1, 3, 8])
def test_the_budget_is_never_exceeded_by_more_than_the_requests_in_flight(
    concurrency: int, tmp_path: Path, key: str, upstream: str, straight: Corpus, tally: Any
) -> None:
    """Token budgets that stop the run at different points, with slow answers and retried faults
    keeping requests in flight longer; then a rerun without the budget finishes the corpus."""
    budgets = (95, 200, 330)
    plan = FaultPlan(mix=["slow", "429", "drop", "500"], rate=0.4, seed=concurrency)
    out = tmp_path / "run"
    with fault_proxy(upstream, plan, Timing(slow_s=0.1, retry_after_s=0.05)) as (url, log):
        for max_tokens in budgets:
            result = generate(
                config(out, url, concurrency=concurrency, budget={"max_tokens": max_tokens}),
                progress=False,
            )
            spent = result.corpus.manifest["usage"]["total_tokens"]
            if spent < max_tokens:
                assert result.complete  # the budget was never reached
                continue
            assert not result.complete and "token budget" in result.corpus.manifest["stopped"]
            assert spent < max_tokens + concurrency * TOKENS_PER_REQUEST, (max_tokens, spent)
        result = generate(config(out, url, concurrency=concurrency), progress=False)
    assert result.complete and result.corpus.sha256 == straight.sha256
    assert journaled_once(out / "corpus") == REQUESTS
    tally(cases=len(budgets) + 1, faults=sum(log.injected.values()), rows=len(result.corpus))


def test_a_time_budget_stops_cleanly_and_the_rerun_finishes(
    tmp_path: Path, key: str, upstream: str, straight: Corpus, tally: Any
) -> None:
    with fault_proxy(upstream, FaultPlan(always="slow"), Timing(slow_s=0.25)) as (url, log):
        first = generate(
            config(tmp_path, url, concurrency=1, budget={"max_seconds": 0.6}), progress=False
        )
        assert not first.complete and "time budget" in first.corpus.manifest["stopped"]
        second = generate(config(tmp_path, url, concurrency=4), progress=False)
    assert second.complete and second.corpus.sha256 == straight.sha256
    tally(cases=2, faults=sum(log.injected.values()), rows=len(second.corpus))


def test_faults_in_front_of_the_real_server(
    tmp_path: Path, key: str, real_server: Any, tally: Any
) -> None:
    """The real local server behind the proxy: a 429, a dropped connection and a 500 are retried,
    and every request is answered by the real model once. The server listens on loopback only."""
    assert "127.0.0.1" in command(LocalServer(), "model", 1234)
    assert listen_addresses(real_server.pid) == {"127.0.0.1"}
    script = ["429", "drop", "500"]
    with fault_proxy(real_server.base_url, FaultPlan(script)) as (url, log):
        path = config_path(
            tmp_path,
            url,
            concurrency=1,
            sampling={"brainstorm_max_tokens": 8, "generate_max_tokens": 8},
            endpoint={"model": real_server.model, "response_format": "none", "timeout_s": 600},
            tasks={
                "brainstorm_requests": 0,
                "examples": {"sts": 2},
                "given": {"sts": ["Retrieve sentences with the same meaning."]},
            },
        )
        result = generate(load_synth_config(path), progress=False)
    manifest = result.corpus.manifest
    assert result.complete and log.injected == Counter(script)
    assert manifest["requests"]["generate"] == {"planned": 2, "answered": 2}
    assert (
        manifest["requests"]["retries_this_run"] == 3 and manifest["usage"]["completion_tokens"] > 0
    )
    assert_retried_only_after_faults(log)
    tally(cases=1, faults=len(script), rows=2)


def test_a_sweep_whose_corpus_build_gives_up_stops_and_the_next_sweep_resumes_it(
    tmp_path: Path, key: str, upstream: str, straight: Corpus, tally: Any
) -> None:
    """`harness sweep` building its corpus (``corpus.build: generate``) stops before Ray when the
    endpoint gives up, saying why; the next sweep resumes the build instead of training on the
    partial corpus, and asks for no finished answer again."""
    plan = FaultPlan(["pass"] * 8, always="503")
    with fault_proxy(upstream, plan) as (url, log):
        synth_yaml = config_path(
            tmp_path / "synth", url, concurrency=1, endpoint={"max_retries": 1}
        )
        corpus_dir = tmp_path / "corpus"
        exp = write_experiment(tmp_path, corpus_dir, "resume", build_with=synth_yaml)
        first = runner.invoke(harness_app, ["sweep", str(exp)])
        assert first.exit_code == 2, first.output
        assert (
            "corpus.build: the synthesis into" in first.output
            and "HTTP 503 after 2 attempt(s)" in first.output
        )
        assert (
            "run the sweep again to resume it" in first.output and "Traceback" not in first.output
        )
        answered = answered_seeds(corpus_dir)
        before, plan.always = len(log.arrivals), None
        # what the next sweep does first
        corpus = load_corpus(load_experiment(exp), Console(file=io.StringIO()))
    assert corpus.manifest["complete"]
    assert_resumed_losing_nothing(
        tmp_path, corpus, straight, log, before, answered, [first.output], tally
    )


# ---- process death: SIGKILL at random moments, several times in one run -----------------------


def _generate_process(path: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "synth.cli", "generate", str(path), "--quiet"]
    return subprocess.Popen(
        cmd,
        env=env_with(OPENAI_API_KEY=PLANTED_KEY),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _kill_at_random_moment(
    proc: subprocess.Popen[bytes], journal: Journal, rng: random.Random, first: bool
) -> bool:
    """SIGKILL ``proc``: in the first round at a random moment of its start-up, later at a random
    moment after it journaled one more answer (mid-request, mid-write, between stages, while it
    writes the corpus). False when it finished before the kill came."""
    start, t0 = len(journal.read()), time.monotonic()
    if first:
        time.sleep(rng.uniform(0.0, 1.0))
    else:
        while len(journal.read()) <= start and proc.poll() is None:
            assert time.monotonic() - t0 < 120, "no answer journaled in time"
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.4))
    finished = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    return not finished


def test_repeated_sigkill_at_random_moments_loses_nothing_and_repeats_nothing(
    tmp_path: Path, upstream: str, tally: Any
) -> None:
    """`synth generate` (a real process) is killed with SIGKILL several times at random moments,
    then run to the end: the corpus is the uninterrupted run's, every request is journaled once,
    and no request answered before a kill is ever sent again."""
    seed = int(os.environ.get("NM_FAULTS_SEED", time.time_ns() % 100_000))
    rng, kills = random.Random(seed), repeats(ci=4, full=12)
    plan = {
        "tasks": {
            "brainstorm_requests": 2,
            "examples": {"short-long": 4 * kills, "sts": 4 * kills},
            "seed": 1,
        }
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENAI_API_KEY", PLANTED_KEY)
        straight = generate(
            config(tmp_path / "straight", upstream, concurrency=8, **plan), progress=False
        ).corpus
    requests = 4 + 8 * kills
    recorder = Recorder()
    journal = Journal(tmp_path / "corpus" / "work" / JOURNAL_FILE)
    snapshots: list[tuple[set[str], int]] = []  # (keys journaled, requests seen) after each kill
    with serve(scripted(delay_s=0.1), recorder) as url:
        path = config_path(tmp_path, url, concurrency=2, **plan)
        for i in range(kills):
            if not _kill_at_random_moment(_generate_process(path), journal, rng, first=i == 0):
                break  # finished before the kill: nothing left to interrupt
            time.sleep(0.1)  # let the server register what the dead process had sent
            snapshots.append((set(journal.read()), len(recorder.bodies)))
        last = _generate_process(path)
        out, _ = last.communicate(timeout=300)
    assert last.returncode == 0, out.decode(errors="replace")
    assert len(snapshots) == kills, (
        f"{len(snapshots)} of {kills} kills landed before the run ended (seed {seed})"
    )
    corpus = read_corpus(tmp_path / "corpus")
    assert corpus.sha256 == straight.sha256, f"seed {seed}"
    assert journaled_once(tmp_path / "corpus") == requests
    seeds = recorder.seeds()
    for answered, seen in snapshots:
        again = {int(k[:8], 16) for k in answered} & set(seeds[seen:])
        assert not again, f"answered before a kill, sent again (seed {seed})"
    assert len(seeds) <= requests + 2 * kills, "more than the requests in flight were repeated"
    tally(cases=kills + 1, faults=kills, rows=len(corpus), lost=len(straight) - len(corpus))


def test_the_budget_holds_when_the_endpoint_sends_no_usage(
    tmp_path: Path, key: str, tally: Any
) -> None:
    """Without a usage block the tokens are estimated (4 characters a token), the budget stops the
    run, the manifest says the count is an estimate; a rerun without the budget finishes."""
    recorder = Recorder()
    with serve(without_usage(scripted()), recorder) as url:
        first = generate(
            config(tmp_path, url, concurrency=1, budget={"max_tokens": 10}), progress=False
        )
        usage = first.corpus.manifest["usage"]
        assert not first.complete and "token budget" in first.corpus.manifest["stopped"]
        assert len(recorder.bodies) == 1, "requests went on past the budget"
        assert usage["total_tokens"] >= 10 and usage["estimated_requests"] == 1
        assert "estimated at 4 characters a token" in usage["token_count"]
        second = generate(config(tmp_path, url, concurrency=4), progress=False)
    assert second.complete and second.corpus.manifest["usage"]["estimated_requests"] == REQUESTS
    tally(cases=2, faults=REQUESTS)


def test_a_drip_fed_answer_cannot_hold_a_request_past_its_timeout(
    tmp_path: Path, key: str, upstream: str, straight: Corpus, tally: Any
) -> None:
    """The proxy sends each answer's body 4 bytes per 0.1 s: every read is quick, the whole answer
    would take tens of seconds. The client gives each request timeout_s in all, retries, and the
    run finishes with the same corpus once the endpoint heals."""
    plan = FaultPlan(["drip"] * 3)
    t0 = time.monotonic()
    with fault_proxy(upstream, plan, Timing(drip_s=0.1)) as (url, log):
        result = generate(
            config(tmp_path, url, concurrency=2, endpoint={"timeout_s": 1.0, "backoff_max_s": 0.1}),
            progress=False,
        )
    took = time.monotonic() - t0
    assert log.injected["drip"] == 3
    assert result.complete and result.corpus.sha256 == straight.sha256
    assert result.corpus.manifest["requests"]["retries_this_run"] >= 3
    assert took < 3 * 1.0 + 15, took  # three deadlines, not three drip-fed answers (~15 s each)
    tally(cases=1, faults=3, rows=len(result.corpus))
