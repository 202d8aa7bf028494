"""GPU readiness: paper-scale step cost, ATA's cost and the real sweep path, in one run.

For a GPU machine lent for minutes with no network: nothing is downloaded. Three sections, each with
its own time budget (planned between measurements; a measurement in progress finishes); a failed
section is reported and the others still run. The report is rewritten after every section.

1. cost: the Mistral-7B-Instruct-v0.2 architecture from its published config, random bf16 weights
   made on the GPU, through the harness's own code (bidirectional or causal attention, LoRA on all
   linear layers, gradient checkpointing, pooling, the training step) with the recipe of
   experiments/base.yaml at length 512: the largest per-device batch that fits up to the recipe's
   64 (halved on out of memory), step time of eos / mean / ata, tokens/s, peak memory, MFU; a timed
   encode; and the GPU-hours of one paper trial, experiments/pooling.yaml and strategy.yaml.
2. ata: ata / mean step-time ratio at lengths 512 and 1024 (flash-attention-2 where it imports).
3. sweep: the smoke sweep (packaged SmolLM2, 2 trials at gpus_per_trial 0.5) through Ray, MLflow
   and the tables, checking that the trials ran on the requested device.

--tiny runs the same code on a toy Mistral on CPU in about a minute (tests/test_gpu_check.py).

    python bench/gpu_check.py --device cuda
    python bench/gpu_check.py --tiny --out /tmp/gpu_check.md
"""

from __future__ import annotations

# _common first: importing it sets the offline environment (HF_HUB_OFFLINE, ...)
from _common import REPO, RESULTS, STARTED, Report, command_line, machine, set_threads

# isort: split
import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _gpu import flash_attn_version
from _gpu_cost import Bench, ata_section, cost_section, render_ata, render_cost
from _gpu_run import Section

from harness.experiment_file import load_experiment

NAME = "gpu_check"
LIBS = ("transformers", "peft", "flash-attn", "ray", "mlflow")
TITLES = {
    "cost": "Paper-scale cost (Mistral-7B architecture, random weights)",
    "ata": "ATA's cost on this device",
    "sweep": "The real path: smoke sweep through Ray, MLflow and the tables",
}
# Sizes: the real run, and --tiny (toy model on CPU; same code).
PRESETS: dict[bool, dict[str, Any]] = {
    False: {
        "length": 512,
        "batch": 64,
        "reps": 3,
        "ata_lengths": [512, 1024],
        "ata_batch": 8,
        "ata_reps": 5,
        "encode_texts": 512,
        "simulate_oom_above": None,
        "threads": None,
        "budget_cost": 250.0,
        "budget_ata": 80.0,
        "budget_sweep": 120.0,
    },
    True: {
        "length": 32,
        "batch": 8,
        "reps": 2,
        "ata_lengths": [32, 64],
        "ata_batch": 2,
        "ata_reps": 2,
        "encode_texts": 16,
        "simulate_oom_above": 4,
        "threads": 1,
        "budget_cost": 300.0,
        "budget_ata": 300.0,
        "budget_sweep": 600.0,
    },
}


# ---------------------------------------------------------------- section 3: the sweep


def make_trial() -> Callable[..., Any]:
    """The real trial (``harness.trial.train_and_evaluate``) plus tags saying where it ran.

    Defined in ``__main__``, so Ray pickles it by value: workers need no extra import path.
    """

    def trial(exp: Any, corpus: Any, ctx: Any) -> Any:
        import os

        import torch

        from harness.trial import train_and_evaluate

        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        out = train_and_evaluate(exp, corpus, ctx)
        peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else 0.0
        out.tags.update(
            {
                "gpu_check.cuda_peak_gb": f"{peak:.3f}",
                "gpu_check.gpu": torch.cuda.get_device_name() if cuda else "none",
                "gpu_check.cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "unset"),
            }
        )
        return out

    return trial


def smoke_experiment(args: argparse.Namespace, scratch: Path, shared: Path) -> tuple[Path, bool]:
    """experiments/smoke.yaml on the requested device, 2 trials, its outputs in ``scratch`` (the
    corpus and the MNTP adapter are smoke's own, built on first use as `make smoke` does), and
    whether the trials evaluate (not without shared/data's BIOSSES). --tiny also shrinks the
    trials: 2 steps of batch 2 at 16 tokens, BIOSSES's first 8 pairs, a 2-step MNTP adapter."""
    import yaml

    cuda = args.device.startswith("cuda")
    task = shared / "BIOSSES"
    evaluate = (task / "test.tsv").is_file()
    tiny: dict[str, Any] = {"model": {}, "train": {}, "mntp": {}}
    if args.tiny:
        tiny = {
            # its own 2-step MNTP adapter in the scratch folder (smoke's stays smoke's)
            "model": {
                "max_query_length": 16,
                "max_doc_length": 16,
                "init_adapter": str(scratch / "mntp"),
            },
            "train": {"steps": 2, "batch_size": 2, "heldout_size": 8},
            "mntp": {
                "output": str(scratch / "mntp"),
                "steps": 2,
                "max_length": 32,
                "eval_blocks": 4,
            },
        }
        if evaluate:
            lines = (task / "test.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
            task = scratch / "BIOSSES-8"
            task.mkdir()
            (task / "test.tsv").write_text("".join(lines[:9]), encoding="utf-8")
    data = {
        "extends": str(REPO / "experiments" / "smoke.yaml"),
        "name": "gpu-check-smoke",
        # bf16 and flash-attention-2 (or sdpa) on a GPU, as the paper's runs
        "model": {"dtype": "auto", "attn_implementation": "auto", **tiny["model"]},
        "train": {
            "device": "cuda" if cuda else "cpu",
            "schedule_rows": "all",  # smoke's mined corpus has no synthetic rows
            **tiny["train"],
        },
        "grid": {"strategy": ["curriculum"], "pooling": ["mean", "ata"]},
        "eval": {"tasks": [str(task)], "enabled": evaluate},  # absolute: extends rebases paths
        "resources": {
            "gpus_per_trial": 0.5 if cuda else 0,
            "cpus_per_trial": 1,
            "max_concurrent_trials": 2,
        },
        "tracking": {"uri": f"sqlite:///{scratch / 'mlflow.db'}"},
        **({"mntp": tiny["mntp"]} if tiny["mntp"] else {}),
        "tables": {"baseline": {"strategy": "curriculum"}, "output_dir": str(scratch / "tables")},
    }
    path = scratch / "gpu-check-smoke.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path, evaluate


def sweep_section(sec: Section, args: argparse.Namespace) -> None:
    from mlflow import MlflowClient
    from rich.console import Console

    from harness.evaluation.suites import data_dir
    from harness.init_adapter import pin_if_present
    from harness.sweep import run_sweep
    from harness.tables import write_tables

    shared = data_dir().resolve()
    os.environ.setdefault("NM_SHARED_DATA", str(shared))  # the smoke corpus's data root
    cuda = args.device.startswith("cuda")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        path, evaluate = smoke_experiment(args, Path(tmp), shared)
        if not evaluate:
            sec.skipped.append(
                f"the trials' evaluation: no BIOSSES in {shared} (set NM_SHARED_DATA)"
            )
        summary = run_sweep(
            path,
            address="local",
            resume=False,
            trial_fn=make_trial(),
            results_dir=Path(tmp) / "results",
            console=Console(stderr=True),
        )
        trials = [
            {
                "label": r.label,
                "status": r.status,
                "seconds": r.seconds,
                "gpu": r.tags.get("gpu_check.gpu"),
                "cuda_peak_gb": float(r.tags.get("gpu_check.cuda_peak_gb", "-1")),  # -1: none
                "cuda_visible_devices": r.tags.get("gpu_check.cuda_visible_devices"),
                "metrics": {
                    k: v for k, v in r.metrics.items() if k.startswith(("heldout/", "eval/"))
                },
                "error": r.error,
            }
            for r in summary.records
        ]
        sec.data.update(trials=trials, wall_s=summary.wall_seconds, device=args.device)
        if len(trials) != 2 or any(t["status"] != "FINISHED" for t in trials):
            states = [(t["label"], t["status"], t["error"]) for t in trials]
            raise AssertionError(f"expected 2 FINISHED trials: {states}")
        for t in trials:  # where the trial's own process put its tensors
            on_gpu = t["cuda_peak_gb"] > 0 and t["cuda_visible_devices"] not in ("unset", "")
            if on_gpu != cuda:
                raise AssertionError(f"trial {t['label']} did not run on {args.device}: {t}")
        client = MlflowClient(summary.tracking_uri)
        runs = client.search_runs(
            [client.get_experiment_by_name("gpu-check-smoke").experiment_id],
            filter_string="tags.`harness.role` = 'trial'",
        )
        logged = sorted((r.data.params.get("train.device"), r.info.status) for r in runs)
        expected = [("cuda" if cuda else "cpu", "FINISHED")] * 2
        if logged != expected:
            raise AssertionError(f"MLflow trial runs (train.device, status): {logged}")
        exp = load_experiment(path)
        pin_if_present(exp)  # as `harness tables` does: the trial keys include the adapter's hash
        files = write_tables(exp, log_to_mlflow=True).files
        text = "".join(f.read_text(encoding="utf-8") for f in files if f.suffix == ".md")
        if not ("mean" in text and "ata" in text):
            raise AssertionError("the tables have no mean and ata rows")
        sec.data.update(mlflow_runs=len(runs), tables=sorted(f.name for f in files))
    if sec.left() < 0:
        sec.notes.append(f"took {-sec.left():.0f} s longer than its budget")


def render_sweep(report: Report, sec: Section) -> None:
    d = sec.data
    if "trials" not in d:
        return
    report.para(
        f"experiments/smoke.yaml with train.device {d['device']}, dtype and attention auto, grid "
        f"pooling mean / ata, gpus_per_trial 0.5 on a GPU; sweep wall time {d['wall_s']:.0f} s. "
        "Device: what the trial's own process allocated on CUDA (peak) and the "
        "CUDA_VISIBLE_DEVICES Ray gave it."
        + (
            f" MLflow: {d['mlflow_runs']} trial runs FINISHED with train.device {d['device']}; "
            f"tables: {', '.join(d['tables'])}."
            if "tables" in d
            else ""
        )
    )
    report.table(
        ["trial", "status", "time (s)", "GPU", "CUDA peak (GB)", "CUDA_VISIBLE_DEVICES", "scores"],
        [
            (
                t["label"],
                t["status"],
                f"{t['seconds']:.0f}" if t["seconds"] is not None else "–",
                t["gpu"],
                f"{t['cuda_peak_gb']:.2f}",
                t["cuda_visible_devices"],
                ", ".join(
                    f"{k} {t['metrics'][k]:.3f}"
                    for k in ("heldout/recall_at_1", "eval/avg")
                    if k in t["metrics"]
                ),
            )
            for t in d["trials"]
        ],
        align="llrlrll",
    )


# ---------------------------------------------------------------- report


def gpu_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"flash_attn": flash_attn_version()}
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(
            name=props.name,
            memory_gb=props.total_memory / 1e9,
            capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            count=torch.cuda.device_count(),
        )
    return info


def render(args: argparse.Namespace, sections: dict[str, Section]) -> Report:
    title = "GPU readiness check" + (
        " (--tiny: toy model on the CPU; the figures only show that the code runs)"
        if args.tiny
        else ""
    )
    report = Report(title, device=args.device, libs=LIBS)
    gpu = gpu_info(args.device)
    if "name" in gpu:
        report.para(
            f"GPU: {gpu['name']}, {gpu['memory_gb']:.0f} GB, compute capability "
            f"{gpu['capability']}, CUDA {gpu['cuda']}, {gpu['count']} visible."
        )
    report.para(f"flash-attn: {gpu['flash_attn'] or 'not installed (sdpa is used)'}.")
    report.table(
        ["section", "status", "time (s)", "budget (s)", "skipped, problems, or the error"],
        [
            (
                f"{i}. {s.key}",
                s.status,
                f"{s.seconds:.0f}",
                f"{s.budget_s:.0f}",
                "; ".join([*s.skipped, *s.problems, *([s.error] if s.error else [])]) or "–",
            )
            for i, s in enumerate(sections.values(), 1)
        ],
        align="llrrl",
    )
    renderers = {"cost": render_cost, "ata": render_ata, "sweep": render_sweep}
    for i, s in enumerate(sections.values(), 1):
        report.add(f"## {i}. {s.title}", "")
        if s.status == "not run":
            report.para(
                "Not run"
                + (" (not requested with --sections)." if s.key not in args.sections else ".")
            )
            continue
        if s.notes or s.problems:
            report.add(*(f"- {n}" for n in [*s.problems, *s.notes]), "")
        renderers[s.key](report, s)
        if s.error_detail:
            report.code(s.error_detail)
    return report


def write(args: argparse.Namespace, sections: dict[str, Section], final: bool) -> None:
    """The Markdown report and its JSON twin (``.json`` beside it)."""
    report = render(args, sections)
    twin = {
        "title": report.title,
        "machine": machine(args.device, LIBS),
        "command": command_line(),
        "device": args.device,
        "gpu": gpu_info(args.device),
        "tiny": args.tiny,
        "run_at": time.strftime("%Y-%m-%d %H:%M", time.localtime(STARTED)),
        "seconds": time.time() - STARTED,
        "sections": {k: s.summary() for k, s in sections.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(twin, indent=2) + "\n", encoding="utf-8")
    if final:
        report.write(args.out)
    else:
        args.out.write_text(report.text(), encoding="utf-8")


# ---------------------------------------------------------------- command line


def parse_args() -> argparse.Namespace:
    doc = __doc__ or NAME
    ap = argparse.ArgumentParser(
        description=doc.splitlines()[0],
        epilog="\n".join(doc.splitlines()[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--tiny", action="store_true", help="toy sizes on the CPU, same code")
    ap.add_argument("--sections", nargs="+", choices=list(TITLES), default=list(TITLES))
    ap.add_argument("--out", type=Path, default=None, help=f"default {RESULTS / (NAME + '.md')}")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (--tiny: 1, enough for it)"
    )
    ap.add_argument("--length", type=int, help="tokens per text in section 1 (512)")
    ap.add_argument("--batch", type=int, help="first per-device batch tried (the recipe's, ≤ 64)")
    ap.add_argument("--reps", type=int, help="timed rounds in section 1 (3)")
    ap.add_argument("--ata-lengths", type=int, nargs="+", help="lengths of section 2 (512 1024)")
    ap.add_argument("--ata-batch", type=int, help="per-device batch of section 2 (8)")
    ap.add_argument("--ata-reps", type=int, help="timed rounds per length in section 2 (5)")
    ap.add_argument("--encode-texts", type=int, help="texts in the timed encode (512)")
    ap.add_argument(
        "--simulate-oom-above",
        type=int,
        help="pretend larger batches run out of memory (--tiny: 4, to exercise the halving)",
    )
    for key in TITLES:
        ap.add_argument(f"--budget-{key}", type=float, help="seconds for this section")
    args = ap.parse_args()
    for key, value in PRESETS[args.tiny].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if args.out is None:
        args.out = RESULTS / (NAME + (".tiny.md" if args.tiny else ".md"))
    return args


def main() -> None:
    args = parse_args()
    set_threads(args.threads)
    paper = load_experiment(REPO / "experiments" / "base.yaml")
    sections = {k: Section(k, TITLES[k], getattr(args, f"budget_{k}")) for k in TITLES}
    bench = Bench(args, paper)
    runs: dict[str, Callable[[Section], None]] = {
        "cost": lambda s: cost_section(s, bench),
        "ata": lambda s: ata_section(s, bench),
        "sweep": lambda s: sweep_section(s, args),
    }
    for key in [k for k in TITLES if k in args.sections]:
        if key == "sweep":
            bench.close()  # the trials need the GPU's memory
        sections[key].run(runs[key])
        write(args, sections, final=False)
    write(args, sections, final=True)
    sys.exit(1 if any(s.status in ("failed", "problem") for s in sections.values()) else 0)


if __name__ == "__main__":
    main()
