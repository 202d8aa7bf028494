"""``synth.locks.build_once``: concurrent processes build a thing once; the others wait and use it
(the packaged SmolLM2 conversion, which every Ray worker of a first sweep asks for at once)."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

from synth.locks import build_once


def _worker(folder: str, results) -> None:
    target = Path(folder) / "model"

    def build() -> None:
        (Path(folder) / "builds").open("a").write("x")
        time.sleep(0.5)  # long enough that every other process arrives while this one builds
        target.mkdir()
        (target / "config.json").write_text("{}")

    built = build_once(
        Path(folder) / ".model.lock", lambda: (target / "config.json").is_file(), build
    )
    results.put((built, (target / "config.json").is_file()))


def test_concurrent_callers_build_once_and_all_get_the_result(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), results)) for _ in range(4)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert (tmp_path / "builds").read_text() == "x", "built more than once"
    assert sorted(outcomes) == [(False, True)] * 3 + [(True, True)]
    assert (
        build_once(tmp_path / ".model.lock", lambda: True, lambda: None) is False
    )  # ready: no lock taken
