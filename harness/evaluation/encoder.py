"""The mteb encoder around a harness ``Embedder`` (or anything with the same ``encode``).

mteb hands the encoder a DataLoader per side of a task plus ``prompt_type``; this wrapper picks
the instruction for that side (``instructions.py``), gathers the texts, embeds each distinct text
once (STS pairs repeat sentences) and leaves batching, length sorting and dtype to the Embedder.
Results are cached by mteb under ``name/revision/experiment``: each trained model must get its own
name (the trial key), and evaluation settings that change scores go into ``experiment_kwargs``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType

from harness.evaluation.instructions import Instructions

if TYPE_CHECKING:
    from mteb.abstasks.task_metadata import TaskMetadata
    from mteb.types import BatchedInput
    from torch.utils.data import DataLoader


class TextEmbedder(Protocol):
    """What the evaluation needs from a model (``harness.embedder.Embedder`` has it)."""

    name: str
    revision: str
    max_doc_length: int  # the budget of texts without an instruction (symmetric tasks' both sides)

    def encode(
        self,
        texts: Sequence[str],
        *,
        instruction: str | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
        show_progress: bool = False,
    ) -> torch.Tensor: ...


class EmbedderEncoder(AbsEncoder):
    """mteb's encoder protocol over a :class:`TextEmbedder`; cosine similarity."""

    def __init__(
        self,
        embedder: TextEmbedder,
        *,
        name: str | None = None,
        revision: str | None = None,
        instructions: Instructions | None = None,
        symmetric_max_length: int | None = None,
        experiment_kwargs: Mapping[str, Any] | None = None,
        progress: bool = False,
    ) -> None:
        self.model = embedder
        self.instructions = instructions or Instructions()
        # Both sides of a symmetric task are full texts (a review, an abstract): embed them with
        # the document length budget rather than the (shorter) query one.
        self.symmetric_max_length = symmetric_max_length
        self.progress = progress
        self.mteb_model_meta = ModelMeta.create_empty(
            overwrites={
                "name": name or embedder.name,
                "revision": revision or embedder.revision,
                "similarity_fn_name": ScoringFunction.COSINE,  # the enum: the string fails late
                "use_instructions": True,
                "framework": ["PyTorch"],
                "experiment_kwargs": dict(experiment_kwargs) if experiment_kwargs else None,
            }
        )

    def encode(
        self,
        inputs: DataLoader[BatchedInput],
        *,
        task_metadata: TaskMetadata,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        texts = [text for batch in inputs for text in batch["text"]]
        unique = list(dict.fromkeys(texts))
        instruction = self.instructions.for_input(
            task_metadata.name, task_metadata.type, prompt_type
        )
        vectors = self.model.encode(
            unique,
            instruction=instruction,
            batch_size=int(kwargs.get("batch_size") or 32),
            max_length=self.symmetric_max_length if prompt_type is None else None,
            show_progress=self.progress,
        )
        if not bool(torch.isfinite(vectors).all()):  # mteb would score NaN vectors without a word
            raise FloatingPointError(
                f"{task_metadata.name}: the model's embeddings are not finite (NaN or inf)"
            )
        row = {text: i for i, text in enumerate(unique)}
        return vectors.float().numpy()[[row[t] for t in texts]]
