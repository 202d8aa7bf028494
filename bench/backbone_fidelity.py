"""Causal vs bidirectional (+MNTP) backbone: what ATA pools, how anisotropic the vectors are, and what
training makes of it, on the packaged SmolLM2-135M (issue 15).

For each backbone -- the harness's old default (causal, E5 format), LLM2Vec's bidirectional + llm2vec
format without and with an MNTP adapter -- untrained and after a short LoRA training with ATA and
with mean pooling, it measures:

- sink share: the share of the last layer's received attention (all real tokens) that goes to the
  first input token (the attention sink of a causal decoder);
- first pooled share: the ATA weight of the first *pooled* token (what "ATA collapses onto the first
  token" means for the vector);
- anisotropy: the mean pairwise cosine of unrelated sentences (STSBenchmark test sentence1, distinct
  pairs), per pooling: eos / mean / ata;
- held-out R@1 and level accuracy on the smoke corpus's held-out rows, and STS scores (Spearman x 100,
  mteb's evaluator) on local BIOSSES for the untrained models.

Each cell is cached in ``--work`` (JSON), so a rerun resumes where it stopped. The MNTP adapter is
trained once (``harness mntp``'s code) on STSBenchmark *train* sentences.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import _common  # noqa: F401  (offline environment first)
import torch
import torch.nn.functional as F
from _common import REPO, Report, corpus_path, parse, parser

from harness.config import ModelSettings
from harness.embedder import Embedder
from harness.experiment_file import validate
from harness.pooling import ata_weights

BACKBONES = {
    "causal + e5": {"attention": "causal", "template": "e5"},
    "bidirectional + llm2vec": {"attention": "bidirectional", "template": "llm2vec"},
    "bidirectional + llm2vec + MNTP": {
        "attention": "bidirectional",
        "template": "llm2vec",
        "mntp": True,
    },
}
POOLINGS = ("eos", "mean", "ata")


def shared_data() -> Path:
    import os

    return Path(os.environ.get("NM_SHARED_DATA") or REPO.parent / "shared" / "data")


def sentences(name: str, split: str, n: int, column: int = 0) -> list[str]:
    lines = (shared_data() / name / f"{split}.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return list(dict.fromkeys(line.split("\t")[column] for line in lines))[:n]


def settings(
    backbone: dict, pooling: str, mntp_dir: Path | None, lora: bool = False
) -> ModelSettings:
    from harness.init_adapter import read_adapter

    with_mntp = backbone.get("mntp") and mntp_dir is not None
    return ModelSettings(
        init_adapter_sha256=read_adapter(mntp_dir).sha256
        if with_mntp
        else None,  # keeps mteb's cache apart
        pooling=pooling,
        attention=backbone["attention"],
        template=backbone["template"],
        init_adapter=str(mntp_dir) if with_mntp else None,
        dtype="float32",
        autocast="bf16",
        max_query_length=64,
        max_doc_length=64,
        lora={"enabled": lora, "r": 8, "alpha": 16, "dropout": 0.0},
    )


@torch.inference_mode()
def analyse(emb: Embedder, texts: list[str]) -> dict[str, float]:
    """Sink share and first pooled share (ATA), anisotropy of this embedder's pooling."""
    out: dict[str, float] = {}
    vectors = F.normalize(emb.encode(texts, batch_size=16), dim=-1)
    cos = vectors @ vectors.T
    n = len(texts)
    out["anisotropy"] = float((cos.sum() - n) / (n * (n - 1)))
    if emb.settings.pooling == "ata":
        sink, first = [], []
        for s in range(0, n, 16):
            batch = emb.tokenize(texts[s : s + 16])
            emb(batch)  # fills the capture with this batch's received attention
            w = ata_weights(emb._capture.received, batch.pool_mask)
            received = emb._capture.received.float() * batch.attention_mask
            first_real = batch.attention_mask.argmax(dim=1)
            first_pooled = batch.pool_mask.float().argmax(dim=1)
            rows = torch.arange(len(first_real))
            sink += (received[rows, first_real] / received.sum(1)).tolist()
            first += w[rows, first_pooled].tolist()
        out["sink_share"] = sum(sink) / len(sink)
        out["first_pooled_share"] = sum(first) / len(first)
    return out


def sts_scores(emb: Embedder, work: Path) -> dict[str, float]:
    from harness.config import EvalSettings
    from harness.evaluation.run import evaluate_embedder

    evaluated = evaluate_embedder(
        emb,
        EvalSettings(tasks=[str(shared_data() / "BIOSSES")]),
        output_dir=work / "mteb",
        progress=False,
    )
    return {k: v for k, v in evaluated.metrics.items() if k.startswith("eval/")}


def mntp_adapter(work: Path, steps: int) -> Path:
    from harness.mntp import is_done, run_mntp

    text = work / "mntp-text.txt"
    if not text.exists():
        train = sentences("STSBenchmark", "train", 20000) + sentences(
            "STSBenchmark", "train", 20000, column=1
        )
        text.write_text("\n".join(train), encoding="utf-8")
    exp = validate(
        {
            "name": "backbone-fidelity",
            "corpus": {"path": "."},
            "model": {"dtype": "float32", "autocast": "bf16"},
            "mntp": {
                "text": [str(text)],
                "output": str(work / "mntp"),
                "steps": steps,
                "batch_size": 8,
                "max_length": 128,
                "lr": 2e-4,
                "eval_blocks": 32,
                "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
                "device": "cpu",
            },
            "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}"},
        }
    )
    if not is_done(exp, work / "mntp"):
        run_mntp(exp, None, say=lambda s: print(s, file=sys.stderr))
    return work / "mntp"


def cached(work: Path, key: str, compute) -> dict:
    path = work / "cells" / (key.replace(" ", "_").replace("+", "p") + ".json")
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2))
    return value


def main() -> None:
    ap = parser(__doc__, "backbone_fidelity")
    ap.add_argument(
        "--work",
        type=Path,
        default=Path("results/backbone-work"),
        help="cache of finished cells (resume)",
    )
    ap.add_argument("--texts", type=int, default=64, help="unrelated sentences for the anisotropy")
    ap.add_argument("--steps", type=int, default=60, help="LoRA training steps (batch 8)")
    ap.add_argument("--mntp-steps", type=int, default=200)
    ap.add_argument("--corpus", type=Path, default=None)
    args = parse(ap, {"texts": 16, "steps": 4, "mntp_steps": 4})
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    texts = sentences("STSBenchmark", "test", args.texts)
    corpus_dir = corpus_path(args.corpus)
    mntp_dir = mntp_adapter(work, args.mntp_steps)
    mntp_meta = json.loads((mntp_dir / "mntp.json").read_text())

    from harness.heldout import heldout_metrics
    from harness.schedules import split_heldout
    from harness.train import train_one
    from synth.corpus import read_corpus

    corpus = read_corpus(corpus_dir)
    _, heldout = split_heldout(corpus.frame, 64)
    rows = []
    for label, backbone in BACKBONES.items():
        for state in ("untrained", f"{args.steps} steps"):
            for pooling in POOLINGS:

                def compute(pooling=pooling, state=state, backbone=backbone, label=label) -> dict:
                    if state == "untrained":
                        emb = Embedder.from_settings(settings(backbone, pooling, mntp_dir), "cpu")
                        result = {
                            **analyse(emb, texts),
                            **heldout_metrics(emb, heldout, batch_size=8),
                        }
                        if pooling != "eos":
                            result.update(sts_scores(emb, work))
                        return result
                    if pooling == "eos":
                        return {}
                    exp = validate(
                        {
                            "name": "backbone-fidelity",
                            "corpus": {"path": str(corpus_dir)},
                            "model": settings(backbone, pooling, mntp_dir, lora=True).model_dump(
                                mode="json"
                            ),
                            "train": {
                                "steps": args.steps,
                                "batch_size": 8,
                                "lr": 5e-4,
                                "warmup_steps": 5,
                                "temperature": 0.05,
                                "heldout_size": 64,
                                "device": "cpu",
                                "seed": 1,
                            },
                        }
                    )
                    out_dir = (
                        work / "models" / f"{label}-{pooling}".replace(" ", "_").replace("+", "p")
                    )
                    trained = train_one(exp, corpus, output_dir=out_dir, progress=True)
                    emb = Embedder.load(trained.model_dir, "cpu")
                    return {
                        **analyse(emb, texts),
                        **trained.heldout,
                        "train_seconds": trained.seconds,
                    }

                result = cached(work, f"{label}-{state}-{pooling}", compute)
                if result:
                    rows.append((label, state, pooling, result))
                    print(f"{label} | {state} | {pooling}: {result}", file=sys.stderr)

    def fmt(v: float | None, digits: int = 3) -> str:
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"

    report = Report("Backbone fidelity: causal vs bidirectional (+MNTP), SmolLM2-135M")
    report.para(
        f"Anisotropy over {len(texts)} distinct STSBenchmark test sentences (mean pairwise cosine; lower = "
        f"more spread); held-out metrics on 64 held-out rows of `{corpus_dir}` (recall@1 among the "
        f"batch's positives and hard negatives, batches of 8); BIOSSES: Spearman x 100 (mteb). Training: "
        f"{args.steps} LoRA steps (r 8), batch 8, lr 5e-4, temperature 0.05, seed 1, curriculum. MNTP: "
        f"{mntp_meta['steps']} steps, batch 8, blocks of 128 tokens of STSBenchmark train sentences, held-out "
        f"masked-token loss {mntp_meta['eval_before']['mntp/eval_loss']:.2f} -> "
        f"{mntp_meta['eval_after']['mntp/eval_loss']:.2f}, "
        f"accuracy {mntp_meta['eval_before']['mntp/eval_accuracy']:.3f} -> "
        f"{mntp_meta['eval_after']['mntp/eval_accuracy']:.3f}."
    )
    report.table(
        [
            "backbone",
            "state",
            "pooling",
            "sink share",
            "first pooled share",
            "anisotropy",
            "held-out R@1",
            "acc level 1",
            "BIOSSES",
        ],
        [
            (
                label,
                state,
                pooling,
                fmt(r.get("sink_share")),
                fmt(r.get("first_pooled_share")),
                fmt(r.get("anisotropy")),
                fmt(r.get("heldout/recall_at_1")),
                fmt(r.get("heldout/acc_level_1")),
                fmt(100 * r["eval/BIOSSES"], 2) if r.get("eval/BIOSSES") is not None else "–",
            )
            for label, state, pooling, r in rows
        ],
        "lllrrrrrr",
    )
    report.write(args.out)


if __name__ == "__main__":
    main()
