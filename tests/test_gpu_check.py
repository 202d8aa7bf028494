"""bench/gpu_check.py --tiny: the GPU readiness check runs its whole code on the CPU, so the one
command meant for a lent GPU machine cannot rot between loans."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import REPO

SCRIPT = REPO / "bench" / "gpu_check.py"


def positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_tiny_run_covers_every_section(tmp_path: Path, shared_data: Path) -> None:
    out = tmp_path / "out" / "gpu_check.md"
    env = {**os.environ, "NM_SHARED_DATA": str(shared_data)}
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--out", str(out)],
        cwd=tmp_path,  # anything written outside --out and its temp folder would show up here
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    report = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    text = out.read_text(encoding="utf-8")
    sections = report["sections"]
    assert list(sections) == ["cost", "ata", "sweep"]
    for key, sec in sections.items():  # ran whole: nothing skipped for time, no check failed
        assert sec["status"] == "ran", (key, sec["skipped"], sec["problems"], sec["error"])
        assert f"## {list(sections).index(key) + 1}. {sec['title']}" in text

    cost = sections["cost"]["data"]
    assert cost["batch"] == 4  # 8 ran out of memory (simulated) and was halved
    assert any("out of memory (simulated), halved to 4" in n for n in sections["cost"]["notes"])
    assert any(n.startswith("bidirectional attention holds") for n in sections["cost"]["notes"])
    assert any(n.startswith("causal attention holds") for n in sections["cost"]["notes"])
    assert {(r["pooling"], r["attention"]) for r in cost["rows"]} == {
        ("eos", "bidirectional"),
        ("mean", "bidirectional"),
        ("ata", "bidirectional"),
        ("mean", "causal"),
        ("ata", "causal"),
    }
    for row in cost["rows"]:
        for key in ("step_s", "tokens_per_s", "peak_gb", "model_tflop", "hardware_tflop"):
            assert positive(row[key]), (row, key)
        assert row["hardware_tflop"] > row["model_tflop"]  # the checkpointed recompute
        assert row["mfu"] is None  # no bf16 peak for a CPU: left out, not made up
    assert positive(cost["encode"]["tokens_per_s"])
    projection = cost["projection"]
    assert positive(projection["trial"]["train_h"]) and positive(projection["trial"]["eval_h"])
    files = {f["file"]: f for f in projection["files"]}
    assert files["experiments/pooling.yaml"]["trials"] == 9
    assert files["experiments/strategy.yaml"]["trials"] == 21
    assert all(positive(f["total_h"]) for f in files.values())
    assert "GPU-h" in text

    ata = sections["ata"]["data"]
    assert [r["length"] for r in ata["rows"]] == [32, 64]
    assert all(positive(r["ratio"]) and positive(r["own_s"]) for r in ata["rows"])

    sweep = sections["sweep"]["data"]
    assert sweep["device"] == "cpu" and sweep["mlflow_runs"] == 2
    assert sorted(t["label"] for t in sweep["trials"]) == ["curriculum-ata", "curriculum-mean"]
    for trial in sweep["trials"]:
        assert trial["status"] == "FINISHED" and trial["cuda_peak_gb"] == 0
        assert any(k.startswith("eval/") for k in trial["metrics"])
    assert "ablation.md" in sweep["tables"]
