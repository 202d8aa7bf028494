"""`synth generate` (MGH synthesis): validation, journal, retries, resume after SIGKILL, and the
real path against a local `transformers serve` with the packaged SmolLM2.

The real server is started once per session (it takes ~7 s idle, much longer on a loaded CPU) and
shared. A scripted fake server is used only where a real one cannot be made to misbehave on demand:
exactly-malformed answers, 429 with Retry-After, 500, and deterministic answers to compare corpora.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from synth_servers import (
    GOOD,
    PARAPHRASES,
    Recorder,
    chat_response,
    forward_to,
    scripted,
    serve,
)
from synth_servers import good_with as _with
from synth_servers import synth_config_file as _config

from synth.answers import Rejected, parse_example, parse_field, parse_tasks
from synth.assemble import REJECTS_FILE
from synth.corpus import read_corpus
from synth.fields import FieldExample, Slot, field_candidates
from synth.generate import JOURNAL_FILE, generate
from synth.journal import Journal
from synth.plan import Request
from synth.synth_config import SynthConfigError, Validation, load_synth_config

# faults marks the fault-injection and bad-input tests; parsing, the fields mode and the real
# server's end-to-end path are the module's core behaviour and run unmarked.

KEY = "sk-test-never-written-7c1f"
LIMITS = Validation()


def _reason(text: str, **kw: Any) -> str:
    with pytest.raises(Rejected) as e:
        parse_example(text, LIMITS, **kw)
    return e.value.reason


def test_valid_answers_parse_inside_fences_and_chatter() -> None:
    example = parse_example("Sure!\n```json\n" + json.dumps(GOOD) + "\n```\nHope it helps.", LIMITS)
    assert example.negatives[0] == "Tides of war shaped Europe."  # level 1 first
    assert parse_tasks('{"tasks": ["Given a question, find answers.", 3]}', LIMITS) == [
        "Given a question, find answers."
    ]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"query": "a", "positive": ', "malformed_json"),
        ("no json here", "malformed_json"),
        ('["a", "b"]', "not_an_object"),
        (
            json.dumps({"query": "how do tides work", "negatives": GOOD["negatives"]}),
            "missing_field",
        ),
        (_with(positive=42), "wrong_type"),
        (_with(negatives=GOOD["negatives"][:3]), "wrong_negative_count"),
        (_with(negatives="one string"), "wrong_type"),
        (_with(query="   "), "empty_text"),
        (_with(positive="x" * 5000), "too_long"),
        (_with(negatives=[GOOD["positive"], *GOOD["negatives"][1:]]), "negative_equals_positive"),
        (_with(negatives=[*GOOD["negatives"][:3], "How do  TIDES work"]), "negative_equals_query"),
        (_with(positive="How do tides work"), "query_equals_positive"),
        (_with(negatives=[GOOD["negatives"][0]] * 4), "duplicate_negatives"),
    ],
)
@pytest.mark.faults
def test_bad_answers_are_rejected_with_their_reason(text: str, reason: str) -> None:
    assert _reason(text) == reason


@pytest.mark.faults
def test_cut_off_answer_is_counted_as_truncated() -> None:
    assert _reason('{"query": "how do', truncated=True) == "truncated"


@pytest.mark.faults
def test_journal_tolerates_a_torn_last_line(tmp_path: Path) -> None:
    journal = Journal(tmp_path / JOURNAL_FILE)
    with journal.open() as w:
        w.append({"key": "a", "content": "x"})
    with journal.path.open("ab") as f:
        f.write(b'{"key": "b", "cont')  # killed mid-write
    assert set(journal.read()) == {"a"}
    with journal.open() as w:  # the torn tail is cut before the next append
        w.append({"key": "c", "content": "y"})
    assert set(journal.read()) == {"a", "c"}
    assert journal.path.read_bytes().count(b"\n") == 2


@pytest.mark.parametrize("name", ["local-smollm2.yaml", "openai-example.yaml"])
def test_shipped_configs_load(name: str) -> None:
    config = load_synth_config(Path(__file__).parents[1] / "synth" / "data" / name)
    assert sum(config.tasks.examples.values()) >= 200


@pytest.mark.faults
def test_config_errors_name_the_field_and_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\noutput: y\nconcurency: 3\ntasks: {examples: {shrt-long: 2}}\n")
    with pytest.raises(SynthConfigError) as e:
        load_synth_config(path)
    assert "bad.yaml: concurency" in str(e.value) and "shrt-long" in str(e.value)


@pytest.mark.faults
def test_cli_reports_a_missing_key_in_one_line_naming_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from synth.cli import app

    monkeypatch.delenv("NM_TEST_KEY", raising=False)
    result = CliRunner().invoke(
        app,
        ["generate", str(_config(tmp_path, endpoint={"base_url": "http://127.0.0.1:9/v1"})), "-q"],
    )
    assert result.exit_code == 2
    assert "NM_TEST_KEY" in result.output and "Traceback" not in result.output


@pytest.mark.faults
def test_generate_rejects_retries_and_never_writes_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NM_TEST_KEY", KEY)
    recorder = Recorder()
    # Faults on the short-long prompts: a 429 with Retry-After, then a 500; both are retried.
    with serve(scripted({"short search query of 3 to 12 words": [429, 500]}), recorder) as url:
        config = load_synth_config(_config(tmp_path, endpoint={"base_url": url}))
        result = generate(config, progress=False)
    manifest = result.corpus.manifest
    assert result.complete
    assert manifest["requests"]["retries_this_run"] == 2
    assert manifest["requests"]["brainstorm"] == {"planned": 4, "answered": 4}
    assert manifest["requests"]["generate"] == {"planned": 12, "answered": 12}
    rejects = [json.loads(line) for line in (config.output / REJECTS_FILE).open()]
    by_reason = Counter(r["reason"] for r in rejects)
    assert by_reason["malformed_json"] >= 1 and by_reason["negative_equals_positive"] >= 1
    assert all(r["raw"] for r in rejects)
    assert sum(manifest["rejects"].values()) == len(rejects)
    assert len(result.corpus) == 12 - len(rejects)
    frame = result.corpus.frame
    assert set(frame["source"]) == {"synthetic"} and set(frame["task_kind"]) <= {
        "asymmetric",
        "symmetric",
    }
    assert frame.filter(frame["subtask"] == "sts")["task_kind"].unique().to_list() in (
        [],
        ["symmetric"],
    )
    usage = manifest["usage"]
    assert usage["requests"] == 16 and usage["total_tokens"] == 16 * 30
    assert usage["estimated_cost_usd"] == pytest.approx((16 * 10 * 2.5 + 16 * 20 * 10.0) / 1e6)
    assert manifest["build"]["prompts"]["generate"]["version"] == "generate_v1"
    for path in config.output.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


@pytest.mark.faults
def test_budget_stops_cleanly_and_a_rerun_with_more_budget_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NM_TEST_KEY", KEY)
    with serve(scripted()) as url:
        config = load_synth_config(
            _config(tmp_path, endpoint={"base_url": url}, concurrency=2, budget={"max_tokens": 200})
        )
        first = generate(config, progress=False)
        spent = first.corpus.manifest["usage"]["total_tokens"]
        assert not first.complete and "budget" in first.corpus.manifest["stopped"]
        assert spent <= 200 + 2 * 30  # over by at most the requests in flight
        again = generate(
            config.model_copy(
                update={"budget": config.budget.model_copy(update={"max_tokens": None})}
            ),
            progress=False,
        )
    assert again.complete and again.corpus.manifest["usage"]["requests"] == 16


def _run_killed_then_resumed(
    config_path: Path, journal: Path, kill_after: int, returncode: int = 0
) -> set[str]:
    """Start `synth generate`, SIGKILL it once ``kill_after`` answers are journaled, run it again
    to the end (it exits with ``returncode``); return the keys journaled when it was killed."""
    env = {**os.environ, "NM_TEST_KEY": KEY}
    cmd = [sys.executable, "-m", "synth.cli", "generate", str(config_path), "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    t0 = time.monotonic()
    try:
        while len(Journal(journal).read()) < kill_after:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() - t0 < 240, "no answers journaled in time"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    answered_before = set(Journal(journal).read())
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == returncode, done.stdout + done.stderr
    return answered_before


def _assert_nothing_twice_nothing_lost(
    journal: Path, recorder: Recorder, answered_before: set[str], in_flight: int
) -> None:
    lines = [json.loads(line) for line in journal.read_bytes().splitlines() if line.strip()]
    keys = Counter(r["key"] for r in lines)
    assert max(keys.values()) == 1, "a request was journaled twice"
    seeds = Counter(recorder.seeds())
    by_seed = {int(k[:8], 16): k for k in keys}
    for seed, n in seeds.items():
        if by_seed.get(seed) in answered_before:
            assert n == 1, "an answered request was sent again"
    assert sum(seeds.values()) <= len(keys) + in_flight  # only requests cut off by the kill repeat


@pytest.mark.faults
def test_sigkill_mid_run_then_rerun_gives_the_same_corpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against deterministic (fake) answers, a killed-and-resumed run ends with the very corpus of
    an uninterrupted one; the recorder shows that no answered request is sent again."""
    monkeypatch.setenv("NM_TEST_KEY", KEY)
    with serve(scripted()) as url:
        straight = generate(
            load_synth_config(_config(tmp_path / "a", endpoint={"base_url": url})), progress=False
        )
        recorder = Recorder()
        # 0.1 s per answer (16 answers, one in flight): without it the run could finish between
        # two 50 ms polls of the journal and the kill land after the end (seen once in CI)
        with serve(scripted(delay_s=0.1), recorder) as url2:
            config_path = _config(tmp_path / "b", endpoint={"base_url": url2}, concurrency=1)
            journal = tmp_path / "b" / "corpus" / "work" / JOURNAL_FILE
            answered_before = _run_killed_then_resumed(config_path, journal, kill_after=7)
    resumed = read_corpus(tmp_path / "b" / "corpus")
    assert 7 <= len(answered_before) < 16, "the kill should land mid-run"
    assert resumed.sha256 == straight.corpus.sha256
    _assert_nothing_twice_nothing_lost(journal, recorder, answered_before, in_flight=1)


# ---- the real local server (transformers serve + packaged SmolLM2) -------------------------------


def _real_config(tmp_path: Path, url: str, model: str) -> Path:
    # Given tasks and no brainstorming: the fewest requests that still cover stage 2 for real.
    return _config(
        tmp_path,
        endpoint={"base_url": url, "model": model, "response_format": "none", "timeout_s": 600},
        concurrency=1,
        sampling={"brainstorm_max_tokens": 8, "generate_max_tokens": 8},
        tasks={
            "brainstorm_requests": 0,
            "examples": {"sts": 3},
            "given": {"sts": ["Retrieve sentences with the same meaning."]},
        },
    )


@pytest.mark.faults
def test_real_server_sigkill_then_rerun_requests_nothing_twice_and_loses_nothing(
    tmp_path: Path, real_server: Any
) -> None:
    """`synth generate` against the real server through a recording proxy that counts what each
    run sends: killed (SIGKILL) after its first journaled answer, then run again to the end."""
    recorder = Recorder()
    with serve(forward_to(real_server.base_url), recorder) as url:
        journal = tmp_path / "corpus" / "work" / JOURNAL_FILE
        # every answer is cut off at 8 tokens (below): the resumed run finishes all requests and
        # fails, as a run whose every example is rejected does (exit 1)
        answered_before = _run_killed_then_resumed(
            _real_config(tmp_path, url, real_server.model), journal, kill_after=1, returncode=1
        )
    assert 1 <= len(answered_before) < 3, "the kill should land mid-run"
    assert len(Journal(journal).read()) == 3
    _assert_nothing_twice_nothing_lost(journal, recorder, answered_before, in_flight=1)
    manifest = read_corpus(tmp_path / "corpus").manifest
    assert manifest["requests"]["generate"] == {"planned": 3, "answered": 3}
    assert manifest["usage"]["completion_tokens"] > 0
    # 8 tokens cannot hold a whole example: each answer is rejected (cut off), with its raw text kept.
    assert manifest["rejects"] == {"generate/truncated": 3}
    assert len((tmp_path / "corpus" / REJECTS_FILE).read_text().splitlines()) == 3


# ---- stage2: fields (one plain text per request, for models too small for the JSON answer) -------


def test_field_answers_are_cleaned_or_rejected_with_their_reason() -> None:
    limits = Validation(min_chars=3, max_chars=60)
    assert (
        parse_field('Query: "how do tides work"\n\nI hope this helps!', limits)
        == "how do tides work"
    )
    assert parse_field("  “Tides   follow the moon.”  ", limits) == "Tides follow the moon."
    for text, echoes, truncated, reason in [
        (
            "A short phrase of 3 to 15 words.",
            ["a short phrase of 3 to 15 words"],
            False,
            "echoes_prompt",
        ),
        ("tides and the moon", [], True, "truncated"),
        ('""', [], False, "empty_text"),
        ("x" * 61, [], False, "too_long"),
    ]:
        with pytest.raises(Rejected) as e:
            parse_field(text, limits, echoes, truncated=truncated)
        assert e.value.reason == reason, text


def test_paraphrased_instructions_are_caught_by_embedding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A query that says its instructions in other words ("Text only as the answer") passes the
    exact-phrase check; with `validation.prompt_similarity` the real MiniLM catches it, the
    reject is counted, and the text is asked again."""
    monkeypatch.setenv("NM_TEST_KEY", KEY)
    with serve(scripted(paraphrase=True)) as url:
        results = {
            threshold: generate(
                load_synth_config(
                    _config(
                        tmp_path / str(threshold),
                        endpoint={"base_url": url},
                        stage2="fields",
                        validation={"prompt_similarity": threshold},
                        tasks={"examples": {"short-long": 10, "sts": 10}},
                    )
                ),
                progress=False,
            )
            for threshold in (None, 0.7)
        }
    paraphrased = pl.col("query").is_in(PARAPHRASES)
    off, on = results[None].corpus, results[0.7].corpus
    assert off.frame.filter(paraphrased).height >= 1  # the exact-phrase check lets them through
    assert "query/paraphrases_prompt" not in off.manifest["rejects"]
    assert on.manifest["rejects"]["query/paraphrases_prompt"] >= 1
    assert on.frame.filter(paraphrased).height == 0  # asked again: another sample
    assert len(on) >= len(off)


def test_fields_mode_builds_each_example_text_by_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Queries, then positives given the query, then each level's negative given the query: rows
    carry the level each negative was asked for; a text that copies its instructions or its query
    is rejected and asked again (a new sample), and its example is lost only when attempts run out."""
    monkeypatch.setenv("NM_TEST_KEY", KEY)
    recorder = Recorder()
    with serve(scripted(), recorder) as url:
        config = load_synth_config(
            _config(tmp_path / "a", endpoint={"base_url": url}, stage2="fields")
        )
        result = generate(config, progress=False)
        once = generate(
            load_synth_config(
                _config(
                    tmp_path / "b", endpoint={"base_url": url}, stage2="fields", stage2_attempts=1
                )
            ),
            progress=False,
        )
    manifest = result.corpus.manifest
    assert result.complete and manifest["build"]["stage2"] == "fields"
    assert manifest["build"]["prompts"]["fields"]["version"] == "fields_v1"
    rejects = manifest["rejects"]
    assert rejects["query/echoes_prompt"] >= 1 and rejects["positive/query_equals_positive"] >= 1
    texts = manifest["requests"]["texts"]
    query_rejects = sum(v for k, v in rejects.items() if k.startswith("query/"))
    positive_rejects = sum(v for k, v in rejects.items() if k.startswith("positive/"))
    assert texts["query"] == {"planned": 12 + query_rejects, "answered": 12 + query_rejects}
    assert texts["positive"]["planned"] == 12 + positive_rejects
    assert texts["negative"]["planned"] == 4 * 12
    assert manifest["requests"]["generate"] == {"planned": 12, "answered": 12}
    assert len(result.corpus) == 12  # every rejected text was fixed by a new sample
    for row in result.corpus.frame.iter_rows(named=True):
        assert not row["query"].startswith(("Query:", '"'))  # cleaned
        assert row["positive"] == f"The answer about {row['query']}."
        for level in range(1, 5):
            assert row[f"neg_{level}"] == f"Unrelated text on {row['query']} L{level}"
    # one attempt each: an example whose query or positive is rejected is lost, with that reason
    m1 = once.corpus.manifest
    lost = sum(v for k, v in m1["rejects"].items() if not k.startswith("brainstorm/"))
    assert lost >= 2 and len(once.corpus) == 12 - lost
    assert m1["requests"]["generate"] == {"planned": 12, "answered": 12}
    assert m1["acceptance_rate"] == round(len(once.corpus) / 12, 4)
    # every request sent was journaled and counted once (brainstorm included)
    assert len(recorder.bodies) == manifest["usage"]["requests"] + m1["usage"]["requests"]


@pytest.mark.faults
def test_fields_example_lost_to_two_negatives_counts_once(tmp_path: Path) -> None:
    """The 4 negatives of an example are asked together, so two of them can use up their attempts:
    each rejected answer is reported, but the example is resolved once (a real 400-example run
    reported 409 answered before this)."""
    config = load_synth_config(_config(tmp_path, stage2="fields", stage2_attempts=2))

    def request(stage: str, n: int, level: int | None = None) -> Request:
        return Request(
            stage=stage,
            subtask="sts",
            index=0,
            task="t",
            prompt="fields_v1",  # type: ignore[arg-type]
            key=f"{stage}{level}{n}",
            messages=[],
            level=level,
        )

    def accepted(stage: str, text: str) -> Slot:
        return Slot((request(stage, 0),), text, (), pending=False)

    def used_up(level: int) -> Slot:
        attempts = tuple(request("negative", n, level) for n in range(2))
        return Slot(
            attempts,
            None,
            tuple((r, Rejected("echoes_prompt"), "raw") for r in attempts),
            pending=False,
        )

    example = FieldExample(
        (
            accepted("query", "q"),
            accepted("positive", "p"),
            used_up(1),
            accepted("negative", "n2"),
            used_up(3),
            accepted("negative", "n4"),
        )
    )
    out = list(field_candidates(config, [example], {}))
    assert [why.reason for _, why, _, _ in out] == [
        "echoes_prompt"
    ] * 4  # every rejected answer kept
    assert sum(settles for *_, settles in out) == 1


@pytest.mark.faults
def test_fields_mode_killed_mid_run_resumes_to_the_same_corpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Later texts depend on earlier answers; their keys hash what they were given, so a SIGKILLed
    run, run again, sends no answered request twice and ends with the uninterrupted run's corpus."""
    monkeypatch.setenv("NM_TEST_KEY", KEY)
    with serve(scripted()) as url:
        straight = generate(
            load_synth_config(_config(tmp_path / "a", endpoint={"base_url": url}, stage2="fields")),
            progress=False,
        )
        recorder = Recorder()
        with serve(scripted(delay_s=0.02), recorder) as url2:
            config_path = _config(
                tmp_path / "b", endpoint={"base_url": url2}, concurrency=1, stage2="fields"
            )
            journal = tmp_path / "b" / "corpus" / "work" / JOURNAL_FILE
            answered_before = _run_killed_then_resumed(config_path, journal, kill_after=20)
    resumed = read_corpus(tmp_path / "b" / "corpus")
    assert 20 <= len(answered_before) < len(Journal(journal).read()), "the kill should land mid-run"
    assert resumed.sha256 == straight.corpus.sha256
    _assert_nothing_twice_nothing_lost(journal, recorder, answered_before, in_flight=1)


def test_real_server_fields_mode_end_to_end(
    tmp_path: Path, real_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`stage2: fields` against the real server: texts are asked in order (query, then positive,
    then negatives), each answer journaled once, and the one example settles as a row or a reject."""
    monkeypatch.setenv("NM_TEST_KEY", KEY)
    recorder = Recorder()
    with serve(forward_to(real_server.base_url), recorder) as url:
        config = load_synth_config(
            _config(
                tmp_path,
                endpoint={
                    "base_url": url,
                    "model": real_server.model,
                    "response_format": "none",
                    "timeout_s": 600,
                },
                concurrency=1,
                stage2="fields",
                stage2_attempts=2,
                sampling={"brainstorm_max_tokens": 8, "generate_max_tokens": 24},
                tasks={
                    "brainstorm_requests": 0,
                    "examples": {"short-short": 1},
                    "given": {
                        "short-short": [
                            "Given a product title, retrieve titles of similar products."
                        ]
                    },
                },
            )
        )
        result = generate(config, progress=False)
    manifest = result.corpus.manifest
    texts = manifest["requests"]["texts"]
    assert result.complete and manifest["requests"]["generate"] == {"planned": 1, "answered": 1}
    assert 1 <= texts["query"]["answered"] <= 2
    assert (
        len(recorder.bodies)
        == sum(t["answered"] for t in texts.values())
        == manifest["usage"]["requests"]
    )
    steps = [
        "query"
        if "Write the input" in b["messages"][0]["content"]
        else "positive"
        if "Write the matching result" in b["messages"][0]["content"]
        else "negative"
        for b in recorder.bodies
    ]
    assert steps == sorted(
        steps, key=["query", "positive", "negative"].index
    )  # each step after the last
    rejects = (config.output / REJECTS_FILE).read_text().splitlines()
    assert manifest["acceptance_rate"] == len(result.corpus)  # the one example: a row, or rejected
    assert len(result.corpus) == 1 or (
        all(json.loads(line)["reason"] for line in rejects) and rejects
    )
    assert len(rejects) == sum(manifest["rejects"].values())


@pytest.mark.faults
def test_a_second_generate_into_one_output_refuses_naming_the_first(tmp_path: Path, tally) -> None:
    """The first run is another process holding the output's lock; the second stops before any
    request, in one line; once the holder is killed (SIGKILL: no clean-up) the lock is free."""
    import signal
    import subprocess
    import sys

    from typer.testing import CliRunner

    from synth.cli import app
    from synth.generate import LOCK_FILE

    config = load_synth_config(_config(tmp_path, endpoint={"base_url": "http://127.0.0.1:9/v1"}))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from synth.locks import exclusive\n"
            "with exclusive(Path(sys.argv[1]), 'x'):\n    print('held', flush=True); time.sleep(600)",
            str(config.work_dir / LOCK_FILE),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        result = CliRunner().invoke(
            app,
            [
                "generate",
                str(_config(tmp_path, endpoint={"base_url": "http://127.0.0.1:9/v1"})),
                "-q",
            ],
        )
        assert result.exit_code == 2, result.output
        assert (
            f"is already running (pid {holder.pid} on" in result.output
            and "Traceback" not in result.output
        )
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    from synth.locks import exclusive

    with exclusive(config.work_dir / LOCK_FILE, "after the kill"):
        pass
    tally(cases=2, faults=1)


@pytest.mark.faults
def test_a_run_whose_every_example_is_rejected_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every stage-2 answer malformed: `synth generate` writes the rejects but exits 1 with the
    reject counts, not 0 with a 0-row corpus (fails before: exit 0, acceptance 0.0). The scripted
    server on loopback stands in for a model that never follows the format (a real one will not do
    it on demand)."""
    from typer.testing import CliRunner

    from synth.cli import app

    monkeypatch.setenv("NM_TEST_KEY", KEY)
    answer = scripted()

    def malformed(body: dict[str, Any]) -> tuple[int, dict[str, str], dict[str, Any]]:
        if body["messages"][0]["content"].startswith("Brainstorm"):
            return answer(body)
        return 200, {}, chat_response('{"query": "broken')

    with serve(malformed) as url:
        path = _config(tmp_path, endpoint={"base_url": url})
        result = CliRunner().invoke(app, ["generate", str(path), "--quiet"])
    assert result.exit_code == 1, result.output
    assert "failed: no example passed validation (generate/malformed_json 12)" in " ".join(
        result.output.split()
    )
    assert read_corpus(tmp_path / "corpus").manifest["counts"]["rows"] == 0
    assert len((tmp_path / "corpus" / REJECTS_FILE).read_text().splitlines()) == 12
