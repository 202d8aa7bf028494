"""The model card (``README.md``) of an exported model: what it is, how to load it, its prompts,
how it was trained (the trial's configuration, corpus hash, MLflow run) and its scores.

Hub metadata sits in the YAML header (``base_model``, ``library_name``, ``pipeline_tag``, ``tags``),
as the Hub and sentence-transformers' own cards put it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from harness.config import ModelSettings
    from harness.export import Provenance

POOLING = {
    "eos": "the hidden state of the last token (an EOS ends every input)",
    "mean": "the mean of the pooled tokens' hidden states",
    "ata": "anchor-token-aware: the pooled tokens' hidden states weighted by the attention each "
    "receives in the last layer (Negative Matters, ACL 2025)",
}
SCORE_PREFIXES = ("eval/", "heldout/")


def model_card(
    *,
    base_model: str,
    settings: ModelSettings,
    provenance: Provenance,
    config: Mapping[str, Any],
    prompts: Mapping[str, str],
    merged: bool,
    bidirectional: bool,
    dtype: str,
    dimension: int,
    files: Sequence[str],
) -> str:
    """The card's Markdown.

    Args:
        base_model: the base model's portable name (a Hub id where there is one).
        config: the training configuration to show, already free of local paths.
        merged: the LoRA adapter is merged into the weights (else it is in ``adapter/``).
        bidirectional: the backbone attends both ways (else causally).
        files: the folder's top-level entries.
    """
    has_adapter = settings.lora.enabled and not merged
    header = {
        "base_model": base_model,
        "library_name": "sentence-transformers",
        "pipeline_tag": "sentence-similarity",
        "tags": [
            "sentence-transformers",
            "sentence-similarity",
            "feature-extraction",
            "negative-matters",
            *(["lora", "peft"] if has_adapter else []),
        ],
    }
    title = provenance.run_name or provenance.meta.get("name") or base_model
    sections = [
        f"---\n{yaml.safe_dump(header, sort_keys=False)}---",
        f"# {title}",
        f"A text embedding model fine-tuned from `{base_model}` with LoRA and InfoNCE over graded "
        "hard negatives by the Negative Matters ablation harness, exported with `harness export`.",
        _usage(has_adapter),
        "## Model\n\n"
        + _table(_model_rows(settings, base_model, merged, bidirectional, dtype, dimension)),
        "## Prompts\n\n"
        "A prompt is the input format's opening with an instruction filled in; the module adds "
        "the format's closing after the text and pools the text only. `encode_query` uses "
        "`query`, `encode_document` uses `document` (no instruction); the task-type prompts are "
        "the ones mteb looks up for symmetric tasks.\n\n"
        + _table(
            [(f"`{name}`", _code(text) if text else "(none)") for name, text in prompts.items()],
            ("name", "prompt"),
        ),
        "## Training\n\n" + _table(_training_rows(provenance)),
        "### Configuration\n\n```yaml\n" + yaml.safe_dump(dict(config), sort_keys=False) + "```",
        "## Evaluation\n\n" + _scores(provenance.metrics),
        "## Files\n\n" + ", ".join(f"`{f}`" for f in files),
    ]
    return "\n\n".join(sections) + "\n"


def _usage(has_adapter: bool) -> str:
    needs = "torch, transformers, sentence-transformers >= 6" + (" and peft" if has_adapter else "")
    return f"""## Usage

```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("PATH_OR_HUB_ID", trust_remote_code=True)
queries = model.encode_query(["How do plants make food?"])
documents = model.encode_document(["Photosynthesis turns light into chemical energy."])
print(model.similarity(queries, documents))  # cosine
# any other instruction (filled into the input format):
model.encode(["A man plays a guitar."], instruction="Retrieve semantically similar text.")
```

`trust_remote_code=True` is needed: the folder ships its own sentence-transformers module, \
`st_module.py` (with `inputs.py` and `pooling.py`), and sentence-transformers 6 imports a module \
class from outside its own package only with it. Read the three files before you trust them. The \
module builds the inputs as the harness trained them (the input format's closing after the text, \
an EOS on decoder inputs), switches a decoder to its trained attention (bidirectional or causal) \
and pools as trained; a stock `Transformer` + `Pooling` pipeline cannot. It needs {needs}."""


def _model_rows(
    settings: ModelSettings,
    base_model: str,
    merged: bool,
    bidirectional: bool,
    dtype: str,
    dimension: int,
) -> list[tuple[str, str]]:
    lora = settings.lora
    targets = (
        lora.target_modules
        if isinstance(lora.target_modules, str)
        else ", ".join(lora.target_modules)
    )
    where = "merged into the weights" if merged else "kept apart in `adapter/` (peft)"
    rows = [("base model", f"`{base_model}`")]
    if settings.name.startswith("packaged:"):
        rows.append(("base weights", f"the harness's packaged offline copy `{settings.name}`"))
    if settings.init_adapter_sha256 or settings.init_adapter:
        sha = settings.init_adapter_sha256 or "unknown"
        rows.append(("init adapter (MNTP)", f"merged into the weights; sha256 `{sha}`"))
    rows += [
        (
            "LoRA",
            f"r {lora.r}, alpha {lora.alpha:g}, targets {targets}; {where}"
            if lora.enabled
            else "none (the base weights were trained)",
        ),
        ("attention", "bidirectional" if bidirectional else "causal"),
        ("pooling", f"`{settings.pooling}`: {POOLING[settings.pooling]}"),
        (
            "pooled tokens",
            "the text and the input format's closing"
            if settings.skip_instruction
            else "every token",
        ),
        (
            "max length",
            f"{settings.max_query_length} tokens with a prompt, {settings.max_doc_length} without",
        ),
        ("weights", dtype),
        ("dimension", str(dimension)),
        ("similarity", "cosine"),
    ]
    return rows


def _training_rows(provenance: Provenance) -> list[tuple[str, str]]:
    meta, tags = provenance.meta, provenance.tags
    rows: list[tuple[str, str]] = []
    if provenance.run_id:
        where = f"`{provenance.run_id}`"
        if provenance.run_name or provenance.experiment:
            where += f" ({provenance.run_name or ''} in experiment {provenance.experiment or '?'})"
        rows.append(("MLflow run", where))
    for label, value in (
        ("trial key", tags.get("trial_key") or meta.get("revision")),
        ("corpus sha256", meta.get("corpus_sha256") or tags.get("corpus_sha256")),
        ("steps", meta.get("steps")),
        ("negative levels in order", ", ".join(map(str, meta.get("level_order") or [])) or None),
        ("harness version", meta.get("harness_version")),
        ("git commit", tags.get("git_sha")),
    ):
        if value not in (None, "", "base"):
            rows.append((label, f"`{value}`"))
    return rows or [("", "no training record")]


def _scores(metrics: Mapping[str, float]) -> str:
    rows = [
        (f"`{k}`", f"{v:.4f}") for k, v in sorted(metrics.items()) if k.startswith(SCORE_PREFIXES)
    ]
    if not rows:
        return "No scores were recorded with this model (export from its MLflow run to show them)."
    return (
        "Main scores of mteb tasks (`eval/`), their means, and the harness's held-out metric "
        "(`heldout/`, on corpus rows kept out of training).\n\n" + _table(rows, ("metric", "score"))
    )


def _table(rows: Sequence[tuple[str, str]], head: tuple[str, str] = ("", "")) -> str:
    lines = [f"| {head[0]} | {head[1]} |", "|---|---|"]
    lines += [f"| {a} | {b.replace('|', '&#124;')} |" for a, b in rows]
    return "\n".join(lines)


def _code(text: str) -> str:
    return "`" + text.replace("\n", "\\n").replace("`", "'") + "`"
