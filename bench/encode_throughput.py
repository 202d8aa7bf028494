"""Encoding throughput for evaluation: the harness's mteb encoder vs SentenceTransformer.encode.

Both sides embed the same texts with the same model folder (the packaged SmolLM2-135M-Instruct,
fp32, sdpa attention), mean pooling, the same max length and batch size: SciFact corpus documents
as mteb builds them (title + " " + text; mixed lengths), a seeded sample. The harness side is
``harness.evaluation.encoder.EmbedderEncoder`` (what ``mteb.evaluate`` calls during `harness eval`
and every sweep trial) fed a DataLoader as mteb does, on the document side of SciFact; it sorts
texts by token count. ``SentenceTransformer.encode`` sorts them by character length. The ST side
gets each text with the EOS token the harness appends, so both embed the same token ids (checked:
the cosine similarity of the two sides' vectors is reported). Passes alternate (harness, ST, then
ST, harness, ...) after a one-batch warm-up; medians are reported. ``--unsorted`` adds the harness
encoder without length sorting, to show what the sorting buys. Target (issue 7): at least 1.0x.

    OMP_NUM_THREADS=2 python bench/encode_throughput.py --threads 2
"""

from __future__ import annotations

# _common first: importing it sets the offline environment (HF_HUB_OFFLINE, ...)
from _common import (
    SMOLLM2,
    Report,
    median,
    parse,
    parser,
    sentence_transformer,
    spread,
    time_interleaved,
    verdict,
)

# isort: split
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.config import ModelSettings
from harness.embedder import Embedder
from harness.evaluation.encoder import EmbedderEncoder
from harness.evaluation.suites import data_dir
from synth.packaged import resolve

NAME = "encode_throughput"
QUICK = {"texts": 12, "max_length": 160, "batch": 4, "reps": 1}
HARNESS, ST, UNSORTED = "harness mteb encoder", "SentenceTransformer.encode", "harness, unsorted"


def scifact_texts(data: Path, n: int, seed: int) -> list[str]:
    """``n`` SciFact corpus documents (seeded sample), as mteb's dataloader joins them."""
    path = data / "SciFact" / "corpus.jsonl"
    rows = [json.loads(line) for line in path.open(encoding="utf-8")]
    rows = random.Random(seed).sample(rows, min(n, len(rows)))
    return [(r.get("title", "") + " " + r["text"]).strip() for r in rows]


def harness_encode(encoder: EmbedderEncoder, texts: Sequence[str], batch: int) -> np.ndarray:
    """The call mteb makes for a retrieval corpus (document side), with mteb-style batches."""
    import mteb
    from datasets import Dataset
    from mteb.types import PromptType
    from torch.utils.data import DataLoader

    loader = DataLoader(Dataset.from_dict({"text": list(texts)}), batch_size=batch)
    return encoder.encode(
        loader,
        task_metadata=mteb.get_task("SciFact").metadata,
        hf_split="test",
        hf_subset="default",
        prompt_type=PromptType.document,
        batch_size=batch,
    )


@torch.inference_mode()
def unsorted_encode(
    emb: Embedder, texts: Sequence[str], batch: int, max_length: int
) -> torch.Tensor:
    """Embedder.encode without its length sorting: batches in the given order."""
    emb.eval()
    items = [emb.tokenize_one(t, None, max_length) for t in texts]
    return torch.cat(
        [emb(emb.collate(items[i : i + batch])).cpu() for i in range(0, len(items), batch)]
    )


def padding_share(lengths: Sequence[int], batch: int) -> float:
    """Share of padded positions when ``lengths`` are batched in the given order."""
    padded = sum(
        max(lengths[i : i + batch]) * len(lengths[i : i + batch])
        for i in range(0, len(lengths), batch)
    )
    return 1 - sum(lengths) / padded


def main() -> None:
    ap = parser(__doc__, NAME)
    ap.add_argument(
        "--data",
        type=Path,
        default=None,
        help="shared data folder (default: $NM_SHARED_DATA or ../shared/data)",
    )
    ap.add_argument("--texts", type=int, default=128, help="SciFact corpus documents to embed")
    ap.add_argument("--max-length", type=int, default=512, help="max tokens per text")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument(
        "--reps", type=int, default=3, help="passes over the texts per variant, interleaved"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--unsorted",
        action="store_true",
        help="also time the harness encoder without length sorting",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parse(ap, QUICK)

    texts = scifact_texts(data_dir(args.data), args.texts, args.seed)
    folder = resolve(SMOLLM2)
    settings = ModelSettings(
        name=SMOLLM2,
        pooling="mean",
        dtype="float32",
        attn_implementation="sdpa",
        max_query_length=args.max_length,
        max_doc_length=args.max_length,
    )
    emb = Embedder.from_settings(settings, args.device)
    encoder = EmbedderEncoder(emb, symmetric_max_length=args.max_length)
    st = sentence_transformer(folder, args.max_length, args.device)
    st_texts = [t + st.tokenizer.eos_token for t in texts]

    def st_encode(items: Sequence[str]) -> np.ndarray:
        return st.encode(
            list(items), batch_size=args.batch, convert_to_numpy=True, show_progress_bar=False
        )

    out: dict[str, Any] = {}  # each variant's last vectors, to check both sides agree
    calls: dict[str, Callable[[], Any]] = {
        HARNESS: lambda: out.__setitem__(HARNESS, harness_encode(encoder, texts, args.batch)),
        ST: lambda: out.__setitem__(ST, st_encode(st_texts)),
    }
    if args.unsorted:
        calls[UNSORTED] = lambda: unsorted_encode(emb, texts, args.batch, args.max_length)
    # warm-up: one batch of the longest texts each, the largest shapes a pass sees (a full
    # warm-up pass would double the run)
    longest = sorted(range(len(texts)), key=lambda i: -len(texts[i]))[: args.batch]
    harness_encode(encoder, [texts[i] for i in longest], args.batch)
    st_encode([st_texts[i] for i in longest])
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else None
    times = time_interleaved(calls, args.reps, warmup=0, sync=sync)

    a, b = out[HARNESS], out[ST]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    lengths = [len(emb.tokenize_one(t, None, args.max_length).ids) for t in texts]

    report = Report(
        "Encoding throughput: harness mteb encoder vs SentenceTransformer.encode",
        device=args.device,
        libs=("sentence-transformers", "mteb", "transformers"),
    )
    report.para(
        f"Model: packaged SmolLM2-135M-Instruct ({folder}), fp32, sdpa, mean pooling, max length "
        f"{args.max_length}, batch {args.batch}. Texts: {len(texts)} SciFact corpus documents "
        f"(seed {args.seed}), {np.mean(lengths):.0f} tokens on average (min {min(lengths)}, "
        f"median {int(np.median(lengths))}, max {max(lengths)}). {args.reps} passes per variant, "
        "interleaved, after a one-batch warm-up; spread = min–max of the passes."
    )
    med = {k: median(v) for k, v in times.items()}
    report.table(
        ["variant", "median pass (s)", "spread (s)", "sentences/s", "vs ST"],
        [
            (
                k,
                f"{med[k]:.2f}",
                spread(times[k], 2),
                f"{len(texts) / med[k]:.2f}",
                f"{med[ST] / med[k]:.3f}x",
            )
            for k in times
        ],
    )
    ratio = med[ST] / med[HARNESS]
    by_tokens = sorted(lengths, reverse=True)
    by_chars = [lengths[i] for i in sorted(range(len(texts)), key=lambda i: -len(texts[i]))]
    report.para(
        f"Harness / ST sentences/s: **{ratio:.3f}x**. "
        f"Target at least 1.0x: {verdict(ratio >= 1.0)}."
    )
    report.para(
        f"Padding (share of padded positions): {100 * padding_share(by_tokens, args.batch):.1f}% "
        f"sorted by tokens (harness), {100 * padding_share(by_chars, args.batch):.1f}% sorted by "
        f"characters (ST), {100 * padding_share(lengths, args.batch):.1f}% unsorted. Same vectors: "
        f"cosine similarity harness vs ST mean {cos.mean():.5f}, min {cos.min():.5f} (below 1 only "
        "where truncation drops the EOS the ST side gets as text)."
    )
    report.write(args.out)


if __name__ == "__main__":
    main()
