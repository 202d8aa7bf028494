"""The embedding model: backbone (+ LoRA) + instruction template + pooling, with save/load in one call.

Inputs are built so that every pooling gives the same vector whatever the padding side or batch:
explicit ``position_ids`` (counted over real tokens only), an EOS appended to decoder inputs
(``eos`` pooling reads it), and a ``pool_mask`` that leaves out padding and the part of the input
format before the text (``skip_instruction``); how is ``harness/inputs.py``'s, shared with the
sentence-transformers module of an export. The format itself is ``harness/templates.py``'s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from harness import __version__
from harness.config import ModelSettings
from harness.inputs import Batch, Encoded, collate, tokenize_one
from harness.models import (
    Backbone,
    ModelLoadError,
    apply_lora,
    autocast_dtype,
    enable_gradient_checkpointing,
    load_adapter,
    load_backbone,
    pick_device,
)
from harness.pooling import AttentionCapture, pool
from harness.templates import resolve_template
from harness.weights import WEIGHT_SUFFIXES, file_hashes, finite_problem, hash_problem

log = logging.getLogger(__name__)
META_FILE = "embedder.json"
ADAPTER_DIR = "adapter"
INIT_ADAPTER_DIR = "init_adapter"  # a copy of model.init_adapter, so a saved model reloads anywhere
# In embedder.json: the sha256 of every file under ADAPTER_DIR and INIT_ADAPTER_DIR, by path
# relative to the model folder, recorded when the model is saved and checked whenever it loads.
FILES_KEY = "files"


class SavedModelError(ModelLoadError):
    """A saved model whose files are not the ones it was saved with, or whose weights are not
    finite; the message names the file."""


def _weight_files(path: Path) -> list[Path]:
    return sorted(
        p
        for folder in (ADAPTER_DIR, INIT_ADAPTER_DIR)
        if (path / folder).is_dir()
        for p in (path / folder).rglob("*")
        if p.is_file()
    )


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``embedder.json`` of a saved model; a missing or unreadable one is one line."""
    meta_file = Path(path) / META_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path}: not a saved harness model (no {META_FILE})")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SavedModelError(f"{meta_file}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("settings"), dict):
        raise SavedModelError(f"{meta_file}: not a saved model's description (no settings)")
    return meta


def check_saved(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check a saved model before it is used, and return its ``embedder.json``: every file recorded
    there must have its recorded sha256 (a model saved before hashes were recorded has none to
    check), and every weight of its adapters must load and be finite."""
    path = Path(path)
    meta = read_meta(path)
    recorded = meta.get(FILES_KEY)
    if recorded is not None and not isinstance(recorded, dict):
        raise SavedModelError(f"{path / META_FILE}: {FILES_KEY!r} is not a mapping")
    problem = hash_problem(path, recorded or {}, path / META_FILE) or next(
        (
            p
            for f in _weight_files(path)
            if f.suffix in WEIGHT_SUFFIXES and (p := finite_problem(f))
        ),
        None,
    )
    if problem:
        raise SavedModelError(problem)
    return meta


class Embedder(nn.Module):
    def __init__(
        self,
        backbone: Backbone,
        settings: ModelSettings,
        device: torch.device,
        *,
        name: str | None = None,
        revision: str = "base",
    ):
        super().__init__()
        self.model = backbone.model
        self.tokenizer = backbone.tokenizer
        self.is_decoder = backbone.is_decoder
        self.bidirectional = backbone.bidirectional
        self.template = resolve_template(settings.template, self.tokenizer)
        self.settings = settings
        self.device = device
        # mteb caches results by name + revision: the default name carries everything that changes
        # an untrained model's vectors (trained models get a unique name from their trial key)
        precision = "" if settings.autocast in ("auto", "none") else f"-{settings.autocast}"
        variant = "".join(
            f"-{v}"
            for v in (
                None if settings.attention == "native" else settings.attention,
                settings.template
                if isinstance(settings.template, str) and settings.template != "e5"
                else None,
                f"init-{settings.init_adapter_sha256[:10]}"
                if settings.init_adapter_sha256
                else None,
            )
            if v
        )
        if not isinstance(settings.template, str):  # a custom template: name it by its hash
            variant += (
                "-tpl"
                + hashlib.sha256(settings.template.model_dump_json().encode()).hexdigest()[:8]
            )
        self.name = (
            name
            or f"{Path(settings.name.replace('packaged:', '')).name}-{settings.pooling}{variant}{precision}"
        )
        self.revision = revision
        self._autocast = autocast_dtype(settings, device)
        self._capture = AttentionCapture(self.model) if settings.pooling == "ata" else None
        self._eos_id = self.tokenizer.eos_token_id if self.is_decoder else None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_settings(
        cls,
        settings: ModelSettings,
        device: torch.device | str | None = None,
        *,
        lora: bool = False,
        gradient_checkpointing: bool = False,
        name: str | None = None,
        revision: str = "base",
    ) -> Embedder:
        """An embedder of the base model; with ``lora`` the LoRA adapters are added (trainable)."""
        dev = torch.device(device) if device is not None else pick_device("auto")
        backbone = load_backbone(settings, dev)
        if lora and settings.lora.enabled:
            model = apply_lora(backbone.model, settings.lora)
            backbone = dataclasses.replace(backbone, model=model)
        if gradient_checkpointing:
            enable_gradient_checkpointing(backbone.model)
        emb = cls(backbone, settings, dev, name=name, revision=revision)
        if not lora:
            emb.eval()
        return emb

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], device: torch.device | str | None = None
    ) -> Embedder:
        """Reload a model saved by :meth:`save`: base model, LoRA adapter, pooling and template,
        once :func:`check_saved` passes (else :class:`SavedModelError`)."""
        path = Path(path)
        meta = check_saved(path)
        try:
            settings = ModelSettings.model_validate(meta["settings"])
        except ValueError as e:  # pydantic's ValidationError
            first = str(e).splitlines()[0]
            raise SavedModelError(f"{path / META_FILE}: settings are not valid ({first})") from None
        if (
            path / INIT_ADAPTER_DIR
        ).is_dir():  # the copy saved with the model, wherever it came from
            settings = settings.model_copy(update={"init_adapter": str(path / INIT_ADAPTER_DIR)})
        dev = torch.device(device) if device is not None else pick_device("auto")
        backbone = load_backbone(settings, dev)
        model = backbone.model
        if (path / ADAPTER_DIR).is_dir():
            model = load_adapter(model, path / ADAPTER_DIR, "the trained adapter").to(dev)
        emb = cls(
            dataclasses.replace(backbone, model=model),
            settings,
            dev,
            name=meta.get("name"),
            revision=meta.get("revision", "base"),
        )
        return emb.eval()

    def save(self, path: str | os.PathLike[str], **extra: Any) -> Path:
        """Write the adapter (if any) and ``embedder.json`` (everything needed to reload, and the
        adapter files' sha256)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if hasattr(self.model, "peft_config"):
            self.model.save_pretrained(path / ADAPTER_DIR)
        source = self.settings.init_adapter
        if (
            source
            and Path(source).is_dir()
            and Path(source).resolve() != (path / INIT_ADAPTER_DIR).resolve()
        ):
            shutil.copytree(source, path / INIT_ADAPTER_DIR, dirs_exist_ok=True)
        meta = {
            "name": self.name,
            "revision": self.revision,
            "settings": self.settings.model_dump(mode="json"),
            "harness_version": __version__,
            **extra,
            FILES_KEY: file_hashes(path, _weight_files(path)),
        }
        tmp = path / f".{META_FILE}.tmp"  # written last and whole: the files it records are there
        tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path / META_FILE)
        return path

    # ------------------------------------------------------------------ inputs

    def format(self, text: str, instruction: str | None) -> tuple[str, int]:
        """The string fed to the model and the character where its pooled span starts."""
        return self.template.render(text, instruction)

    def tokenize_one(self, text: str, instruction: str | None, max_length: int) -> Encoded:
        return tokenize_one(
            self.tokenizer,
            self.format,
            text,
            instruction,
            max_length,
            eos_id=self._eos_id,
            skip_instruction=self.settings.skip_instruction,
        )

    def collate(self, items: Sequence[Encoded]) -> Batch:
        """Pad to the longest item on the configured side; positions count real tokens only."""
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return collate(items, pad_id=pad_id, left=self.settings.padding_side == "left")

    def tokenize(
        self,
        texts: Sequence[str],
        instruction: str | Sequence[str | None] | None = None,
        *,
        max_length: int | None = None,
    ) -> Batch:
        instructions = (
            [instruction] * len(texts)
            if instruction is None or isinstance(instruction, str)
            else list(instruction)
        )
        if max_length is None:
            max_length = (
                self.settings.max_query_length
                if any(instructions)
                else self.settings.max_doc_length
            )
        return self.collate(
            [self.tokenize_one(t, i, max_length) for t, i in zip(texts, instructions)]
        )

    # ------------------------------------------------------------------ forward

    def forward(self, batch: Batch) -> Tensor:
        """Embeddings (B, D) in float32, not normalized."""
        batch = batch.to(self.device)
        amp = (
            torch.autocast(self.device.type, dtype=self._autocast)
            if self._autocast
            else nullcontext()
        )
        cap = self._capture.capture(batch.attention_mask) if self._capture else nullcontext()
        with amp, cap:
            out = self.model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
            )
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        received = self._capture.received if self._capture else None
        return pool(
            hidden.float(), batch.attention_mask, batch.pool_mask, self.settings.pooling, received
        )

    def ata_weights(self, batch: Batch) -> Tensor:
        """The normalized ATA weights of a batch (for analysis and tests)."""
        from harness.pooling import ata_weights

        if self._capture is None:
            raise ValueError("ata_weights needs an embedder with ata pooling")
        with torch.inference_mode():
            self.forward(batch)
        assert self._capture.received is not None
        return ata_weights(self._capture.received, batch.pool_mask.to(self.device))

    @torch.inference_mode()
    def encode(
        self,
        texts: Sequence[str],
        *,
        instruction: str | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
        show_progress: bool = False,
    ) -> Tensor:
        """Embed ``texts`` (length-sorted batches to cut padding); (N, D) float32 on the CPU."""
        if not len(texts):
            return torch.empty((0, self.dimension))
        if max_length is None:
            max_length = (
                self.settings.max_query_length if instruction else self.settings.max_doc_length
            )
        items = [self.tokenize_one(t, instruction, max_length) for t in texts]
        order = sorted(range(len(items)), key=lambda i: -len(items[i].ids))
        out: Tensor | None = None
        was_training = self.training
        self.eval()
        batches = range(0, len(order), batch_size)
        if show_progress:
            from rich.progress import track

            batches = track(batches, description=f"encoding {len(texts)} texts", transient=True)
        for start in batches:
            idx = order[start : start + batch_size]
            emb = self.forward(self.collate([items[i] for i in idx])).cpu()
            if out is None:
                out = torch.empty((len(texts), emb.shape[1]), dtype=torch.float32)
            out[idx] = emb
        self.train(was_training)
        assert out is not None
        return out

    @property
    def max_doc_length(self) -> int:
        """The token budget of texts without an instruction (both sides of a symmetric task)."""
        return self.settings.max_doc_length

    @property
    def dimension(self) -> int:
        cfg = (
            self.model.config
            if hasattr(self.model, "config")
            else self.model.get_base_model().config
        )
        return int(cfg.hidden_size)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
