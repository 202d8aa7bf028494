"""What an experiment is: the typed schema of an experiment file, and a trial's identity.

The pydantic models (:class:`Experiment` and its sections) with their defaults and checks, the names
accepted as grid axes, and what makes two trials the same (:func:`trial_key`). Reading a file
(``extends``, ``--set``) and expanding the grid into trials is :mod:`harness.experiment_file`.

Over 400 lines because it is the whole experiment schema: every section of the file, with its
defaults and the source of each value, in one place to read (split, a reader would chase a field
across modules).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from synth.configfile import ConfigFileError, Strict, expand_env

STRATEGIES = ("curriculum", "reverse", "random", "level-1", "level-2", "level-3", "level-4", "all")
POOLINGS = ("eos", "mean", "ata")
TEMPLATES = ("e5", "llm2vec")  # named input formats, see harness/templates.py
BATCHINGS = ("mixed", "by_task")
MAX_TRAINING_EXAMPLES = 20_000_000  # a schedule holds every example of the run (~0.3 kB each)
# Sections one sweep shares across its trials: the MLflow experiment and store, the corpus shipped to
# every trial, Ray's per-trial resources, the MNTP stage, the tables.
FIXED_PER_SWEEP = (
    "name",
    "description",
    "corpus",
    "tracking",
    "resources",
    "mntp",
    "tables",
    "grid",
    "search",
)
# Short names accepted as grid axes and in --cell, mapped to their dotted field.
AXIS_ALIASES = {"strategy": "train.strategy", "pooling": "model.pooling", "seed": "train.seed"}

Strategy = Literal[
    "curriculum", "reverse", "random", "level-1", "level-2", "level-3", "level-4", "all"
]
Pooling = Literal["eos", "mean", "ata"]
Attention = Literal["native", "causal", "bidirectional"]


class ConfigError(ConfigFileError):
    """An experiment file is invalid; the message names the file and the field."""


class _Strict(Strict):
    # On top of Strict's extra="forbid": NaN and infinities are never a valid setting (a NaN lr
    # would train a model of NaNs), and assigning to a field validates the value.
    model_config = ConfigDict(validate_assignment=True, allow_inf_nan=False)


class TemplateSpec(_Strict):
    """A custom input format: ``{text}`` is the text, ``{instruction}`` the task instruction."""

    instructed: str  # texts with an instruction, e.g. "Instruct: {instruction}\nQuery: {text}"
    plain: str = "{text}"  # texts without one (documents of asymmetric tasks)

    @field_validator("instructed")
    @classmethod
    def _instructed(cls, v: str) -> str:
        if "{text}" not in v or "{instruction}" not in v:
            raise ValueError("must contain {instruction} and {text}")
        if v.index("{instruction}") > v.index("{text}"):
            raise ValueError("{instruction} must come before {text} (the text is what gets pooled)")
        return v

    @field_validator("plain")
    @classmethod
    def _plain(cls, v: str) -> str:
        if "{text}" not in v or "{instruction}" in v:
            raise ValueError("must contain {text} and no {instruction}")
        return v


class LoraSettings(_Strict):
    enabled: bool = True
    r: int = Field(16, ge=1, le=4096)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    # "all-linear" = every linear layer but the output head (LLM2Vec's q,k,v,o,gate,up,down on Llama)
    target_modules: str | list[str] = "all-linear"


class ModelSettings(_Strict):
    # A Hub id, a local folder, or a packaged offline model: "packaged:smollm2-135m-instruct",
    # "packaged:all-minilm-l6-v2".
    name: str = "packaged:smollm2-135m-instruct"
    revision: str | None = None
    pooling: Pooling = "ata"
    # Attention of the backbone: "bidirectional" makes a decoder LLM attend to every real token in
    # every layer (LLM2Vec); "causal" keeps a decoder as pretrained; "native" is the architecture's
    # own (causal for decoders, bidirectional for encoders). See harness/models.py.
    attention: Attention = "native"
    # A PEFT adapter (folder or Hub id) merged into the base before the trainable LoRA is added,
    # as LLM2Vec merges its MNTP adapter; `harness mntp` makes one. A folder is relative to the file.
    init_adapter: str | None = None
    # sha256 of the init adapter's files: filled in by the harness (a trial key input); set it to
    # pin an adapter, and a run refuses one that differs.
    init_adapter_sha256: str | None = None
    # For an adapter the file's own mntp: block built: the hash of its recipe (base model, MNTP
    # settings, text). Filled in by the harness; it stands for the adapter in the trial key instead of
    # the weights' hash, so a store of finished trials stays valid on a machine that rebuilds the
    # adapter (same recipe, weights equal up to float noise, as a rerun trial's are).
    init_adapter_recipe: str | None = None
    lora: LoraSettings = LoraSettings()
    max_query_length: int = Field(128, ge=8)
    max_doc_length: int = Field(256, ge=8)
    # auto: bf16 on GPU, fp32 on CPU
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    autocast: Literal["auto", "none", "bf16"] = "auto"  # auto: none (weights already bf16 on GPU)
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    # The input format (harness/templates.py): "e5", "llm2vec", or a custom template with {text}
    # (and {instruction}): a string for instructed texts, or {instructed: ..., plain: ...}.
    template: str | TemplateSpec = "e5"
    skip_instruction: bool = True  # pool the text and the template's closing only (LLM2Vec default)
    padding_side: Literal["left", "right"] = "left"

    @field_validator("init_adapter_sha256", mode="before")
    @classmethod
    def _sha256(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):  # YAML reads an all-digit hash as int
            v = f"{v:064d}"
        if isinstance(v, str) and not re.fullmatch(r"[0-9a-f]{64}", v):
            raise ValueError("must be a sha256: 64 lowercase hex digits")
        return v

    @model_validator(mode="before")
    @classmethod
    def _old_query_template(cls, data: Any) -> Any:
        """Models saved before ``template`` existed carry ``query_template``: read it as a custom template."""
        if isinstance(data, dict) and "query_template" in data:
            data = dict(data)
            old = data.pop("query_template")
            if "template" not in data and old != "Instruct: {instruction}\nQuery: {query}":
                data["template"] = {"instructed": str(old).replace("{query}", "{text}")}
        return data

    @field_validator("template")
    @classmethod
    def _template_name(cls, v: str | TemplateSpec) -> str | TemplateSpec:
        if isinstance(v, str) and v not in TEMPLATES:
            if "{text}" not in v:
                raise ValueError(
                    f"must be one of {', '.join(TEMPLATES)} or a template with {{text}}"
                )
            return TemplateSpec(instructed=v)
        return v


class TrainSettings(_Strict):
    strategy: Strategy = "curriculum"
    steps: int = Field(1000, ge=1, le=10_000_000)
    batch_size: int = Field(64, ge=2, le=1_000_000)
    lr: float = Field(2e-4, gt=0, le=1.0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    temperature: float = Field(0.02, gt=0, le=100.0)
    # Hard negatives per query. The schedule picks the level; extra negatives come from the
    # levels nearest to it. Strategy "all" always uses all four.
    negatives_per_query: int = Field(1, ge=0, le=4)
    # Split the batch into chunks of this size with GradCache (same gradients, less memory).
    grad_cache_chunk: int | None = Field(None, ge=1)
    gradient_checkpointing: bool = False
    # "mixed": batches drawn from the whole corpus; "by_task": every batch from one task (the rows
    # sharing source and subtask), so in-batch negatives are same-task, as in LLM2Vec/E5 training.
    batching: Literal["mixed", "by_task"] = "mixed"
    # Which rows the strategy schedules: "all", or only "synthetic" ones (source == "synthetic",
    # the MGH data); the other rows (a mixed-in retrieval corpus) keep level ``other_rows_level``
    # (1: the mined hard negative, the nearest available when absent) at every step.
    schedule_rows: Literal["all", "synthetic"] = "all"
    other_rows_level: int = Field(1, ge=1, le=4)
    seed: int = Field(0, ge=0, lt=2**32)  # numpy and CUDA take 32-bit seeds
    heldout_size: int = Field(256, ge=0)  # rows kept out of training for the cheap held-out metric
    heldout_before: bool = False  # also score the untrained model (logged as heldout_base/*)
    log_every: int = Field(1, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Save the training state (LoRA, optimizer, LR schedule, RNGs, schedule position) every this
    # many steps; a trial that fails (resources.max_failures) or is run again resumes from its
    # last one. Off by default; not in the trial key (it does not change a result).
    checkpoint_every: int | None = Field(None, ge=1)
    keep_checkpoints: int = Field(2, ge=1)  # the last K kept in the storage path

    @model_validator(mode="after")
    def _stream_fits(self) -> TrainSettings:
        # the schedule is built whole before training (it is logged and checked): bound its size
        if self.steps * self.batch_size > MAX_TRAINING_EXAMPLES:
            raise ValueError(
                f"steps x batch_size = {self.steps * self.batch_size:,} training examples; at most "
                f"{MAX_TRAINING_EXAMPLES:,} (the paper's full training is 1,600 x 64 = 102,400)"
            )
        return self


class CorpusBuild(_Strict):
    """How to build the corpus when ``path`` does not exist yet: a ``synth`` config file."""

    kind: Literal["mine", "generate"]
    config: str  # path to the synth YAML, relative to the experiment file


class CorpusSettings(_Strict):
    path: str
    build: CorpusBuild | None = None
    # A corpus the sweep builds loses every row holding a text of the evaluation tasks (normalised
    # exact match; harness/decontamination.py). An existing corpus is only checked, with a warning.
    decontaminate: bool = True


class EvalSettings(_Strict):
    # A named suite (see `harness suites`) and/or explicit tasks: mteb task names or local folders.
    suite: str | None = None
    tasks: list[str] = Field(default_factory=list)
    # per-task query instruction overrides
    instructions: dict[str, str] = Field(default_factory=dict)
    batch_size: int = Field(32, ge=1)
    max_docs: int | None = Field(None, ge=1)  # cap corpus size of local retrieval tasks (smoke)
    # cap the evaluated examples of each local task (pairs, test texts, queries; a seeded sample):
    # CPU-sized suites whose scores estimate the full tasks' (harness/evaluation/local_tasks.py)
    max_examples: int | None = Field(None, ge=1)
    enabled: bool = True
    # Also score the untrained model of the trial's own configuration (template, lengths, adapter,
    # pooling; LoRA at its initial identity) on the same tasks, once per arm (cached, see
    # harness/untrained.py): the tables' "untrained" rows, logged as eval_base/*.
    untrained: bool = True


class MntpSettings(_Strict):
    """Masked next-token prediction, LLM2Vec's adaptation of a decoder to bidirectional attention
    (``harness mntp``). Values from LLM2Vec's ``train_configs/mntp/Mistral.json`` unless noted."""

    # Plain text to train on: "corpus" (the experiment corpus's own texts) and/or files or folders
    # of .txt (one text per non-empty line) or .jsonl ({"text": ...}), relative to the file.
    text: list[str] = Field(default_factory=lambda: ["corpus"])
    output: str  # the adapter folder, relative to the file; model.init_adapter points here
    attention: Attention = "bidirectional"
    steps: int = Field(1000, ge=1, le=10_000_000)
    batch_size: int = Field(32, ge=1, le=1_000_000)
    max_length: int = Field(512, ge=8)  # texts are concatenated and cut into blocks of this length
    mask_probability: float = Field(0.8, gt=0, lt=1)
    # None: the tokenizer's mask token, else "_" (LLM2Vec's "blank" mask for Llama/Mistral)
    mask_token: str | None = None
    # LLM2Vec's config sets none: transformers' Trainer default
    lr: float = Field(5e-5, gt=0, le=1.0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    lora: LoraSettings = LoraSettings(r=16, alpha=32, dropout=0.05)  # LLM2Vec: r 16, alpha 2r
    gradient_checkpointing: bool = False
    # blocks kept out to measure the masked-token loss before/after
    eval_blocks: int = Field(32, ge=0)
    seed: int = Field(42, ge=0, lt=2**32)
    log_every: int = Field(1, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class SearchParam(_Strict):
    type: Literal["float", "loguniform", "int", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> SearchParam:
        if self.type == "choice":
            if not self.values:
                raise ValueError("type 'choice' needs 'values'")
        elif self.low is None or self.high is None or self.low >= self.high:
            raise ValueError(f"type {self.type!r} needs low < high")
        return self


class SearchSettings(_Strict):
    params: dict[str, SearchParam]  # dotted field -> range
    metric: str = "eval/avg"
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(8, ge=1)
    max_concurrent: int = Field(2, ge=1)
    seed: int = 0


class ResourceSettings(_Strict):
    # Per worker: a trial is ``workers_per_trial`` workers (one Ray Train job, data-parallel over
    # the global batch ``train.batch_size``: the same result as one worker) of these resources each.
    gpus_per_trial: float = Field(0, ge=0)
    cpus_per_trial: float = Field(1, gt=0)
    workers_per_trial: int = Field(1, ge=1)
    # how Ray places one trial's workers: PACK fills a node first, SPREAD one worker per node
    placement_strategy: Literal["PACK", "SPREAD"] = "PACK"
    max_concurrent_trials: int | None = Field(None, ge=1)
    max_failures: int = Field(0, ge=0)  # Ray retries of a failed trial
    # Where Ray Tune keeps the sweep's trial state and checkpoints (train.checkpoint_every): a
    # local folder (default <results>/ray), or on a multi-node cluster a place every node reaches:
    # a shared mount or a URI pyarrow opens (s3://bucket/path, gs://...).
    storage_path: str | None = None
    # Run the next trial in the finished trial's worker process (Tune's reuse_actors): saves the
    # worker start and the torch/transformers imports (see bench/sweep_overhead.py).
    reuse_workers: bool = True
    # Custom Ray resources per trial, e.g. {"accelerator_type:A100": 0.01} or a test's {"fake_gpu": 1}
    custom: dict[str, float] = Field(default_factory=dict)

    def per_worker(self) -> dict[str, float]:
        """The Ray resources of one worker of a trial (no GPU key when it needs none)."""
        gpus = {"GPU": self.gpus_per_trial} if self.gpus_per_trial else {}
        return {"CPU": self.cpus_per_trial, **gpus, **self.custom}


class TrackingSettings(_Strict):
    uri: str = "sqlite:///results/mlflow.db"  # relative sqlite paths resolve against the cwd
    artifact_location: str | None = None
    system_metrics: bool = True
    # Also log each trial's model as an MLflow model (a sentence-transformers folder, registrable):
    # a full copy of the base weights per trial, so off by default; `harness export RUN_ID --log`
    # logs one run's model when it is wanted. Every run tags where its trained model is either way.
    log_model: bool = False


class TablesSettings(_Strict):
    rows: list[str] | None = None  # grid axes that make a table row (default: all but seed)
    baseline: dict[str, Any] | None = None  # e.g. {pooling: mean}
    output_dir: str | None = None  # default results/<name>


class Experiment(_Strict):
    name: str = Field(min_length=1, max_length=200)
    description: str = ""
    corpus: CorpusSettings
    model: ModelSettings = ModelSettings()
    train: TrainSettings = TrainSettings()
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    search: SearchSettings | None = None
    eval: EvalSettings = EvalSettings()
    resources: ResourceSettings = ResourceSettings()
    tracking: TrackingSettings = TrackingSettings()
    tables: TablesSettings = TablesSettings()
    mntp: MntpSettings | None = None

    # Where the file came from (not part of the schema; excluded from dumps).
    source: str | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _workers_fit_batch(self) -> Experiment:
        workers, gpus = self.resources.workers_per_trial, self.resources.gpus_per_trial
        if workers > 1 and self.train.batch_size < workers:
            raise ValueError(
                f"resources.workers_per_trial {workers} needs train.batch_size >= {workers} (every "
                f"worker embeds a share of the global batch of {self.train.batch_size})"
            )
        if workers > 1 and gpus != int(gpus):
            raise ValueError(
                f"resources.gpus_per_trial {gpus} with workers_per_trial {workers}: give each "
                "worker whole GPUs (NCCL cannot run two workers of a trial on one GPU)"
            )
        return self

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        # the name becomes folder names under results/: it must not leave them
        if v.strip(". ") == "" or any(c in v for c in "/\\\0") or any(ord(c) < 32 for c in v):
            raise ValueError(
                "must be a plain name: no '/', '\\', control characters, and not '.' or '..'"
            )
        return v

    @field_validator("grid")
    @classmethod
    def _grid_axes(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        for axis, values in grid.items():
            field = AXIS_ALIASES.get(axis, axis)
            if not field_exists(field):
                raise ValueError(
                    f"grid axis {axis!r} is not a field of the experiment (axes: "
                    f"{', '.join(AXIS_ALIASES)} or any dotted field, e.g. model.lora.r)"
                )
            if field.split(".")[0] in FIXED_PER_SWEEP:
                raise ValueError(
                    f"grid axis {axis!r} cannot vary per trial ({', '.join(FIXED_PER_SWEEP)} are one per "
                    "sweep): use one experiment file per value"
                )
            if not isinstance(values, list) or not values:
                raise ValueError(f"grid axis {axis!r} needs a non-empty list of values")
            if len({json.dumps(v, sort_keys=True, default=str) for v in values}) != len(values):
                raise ValueError(f"grid axis {axis!r} repeats a value")
            if field in out:
                raise ValueError(f"grid axis {axis!r} given twice")
            out[field] = values
        return out

    def resolve_path(self, p: str) -> Path:
        """A path from the file, relative to the file's folder (or the cwd when from a string);
        ``${VAR}`` / ``${VAR:-default}`` come from the environment (unset without default: an error)."""
        path = Path(expand_env(p, f"{self.source or '<experiment>'}: path {p!r}", ConfigError))
        if path.is_absolute() or self.source is None:
            return path
        return Path(self.source).parent / path


def field_exists(dotted: str) -> bool:
    """Whether ``dotted`` (e.g. ``model.lora.r``) names a field of :class:`Experiment`."""
    model: Any = Experiment
    for part in dotted.split("."):
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return False
        model = fields[part].annotation
        # unwrap Optional[X]
        args = [a for a in getattr(model, "__args__", ()) if a is not type(None)]
        if args and not hasattr(model, "model_fields"):
            model = args[0]
    return True


# ---------------------------------------------------------------- paths and trial identity


def is_local_path(s: str) -> bool:
    """Whether a model/adapter reference is a local folder rather than a Hub id (``owner/name``):
    it starts with ``.``, ``/`` or ``~``, or has other than exactly one ``/``."""
    return s.startswith((".", "/", "~")) or s.count("/") != 1


def path_part(text: str) -> str:
    """``text`` as one safe path component (names, cell labels): no separators, no '..'."""
    safe = re.sub(r"[^\w.=-]+", "_", text).strip(".")
    return safe or "_"


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def trial_params(exp: Experiment) -> dict[str, Any]:
    """The resolved config of one trial as flat dotted params (what MLflow logs)."""
    data = exp.model_dump(mode="json", exclude={"grid", "search", "tables", "mntp"})
    return flatten(data)


# Fields added after stores existed: at their default they leave the trial key, so a store made
# before a field existed still matches the trials it finished (they ran with that default).
# Settings that never change a result (how often the state is saved): never in the key.
KEY_EXCLUDED: set[tuple[str, str]] = {
    ("train", "checkpoint_every"),
    ("train", "keep_checkpoints"),
    ("eval", "untrained"),  # scores the untrained model beside the trial, not the trial
    ("corpus", "decontaminate"),  # what it changes, it changes in the corpus and so its hash
}
KEY_NEUTRAL_DEFAULTS: dict[tuple[str, str], Any] = {
    ("model", "init_adapter_recipe"): None,
    ("train", "schedule_rows"): "all",
    ("train", "other_rows_level"): 1,
    ("eval", "max_examples"): None,
}


def key_data(exp: Experiment) -> dict[str, Any]:
    """The settings that change a trial's result, normalized as the trial key hashes them: the
    init adapter by its recipe or content hash (wherever its files lie), new fields at their
    defaults left out, settings that never change a result dropped."""
    data = exp.model_dump(
        mode="json",
        exclude={"grid", "search", "tables", "tracking", "resources", "description", "mntp"},
    )
    if data["model"]["init_adapter_recipe"]:
        del data["model"]["init_adapter"], data["model"]["init_adapter_sha256"]
    elif data["model"]["init_adapter_sha256"]:
        data["model"].pop("init_adapter")
    for section, name in KEY_EXCLUDED:
        data[section].pop(name, None)
    for (section, name), default in KEY_NEUTRAL_DEFAULTS.items():
        if data[section].get(name, default) == default:
            data[section].pop(name, None)
    return data


def content_key(data: Any) -> str:
    """16 hex digits of the sha256 of ``data`` as canonical JSON."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def trial_key(exp: Experiment, corpus_sha256: str) -> str:
    """Hash of everything that changes a trial's result: resolved training config + corpus (and the
    init adapter's recipe or content hash, which stands for the adapter wherever its files lie)."""
    return content_key({"config": key_data(exp), "corpus": corpus_sha256})
