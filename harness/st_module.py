"""A sentence-transformers module that embeds as a harness ``Embedder`` does, without the harness.

``harness export`` ships this file in the exported folder with the two it imports, ``inputs.py``
(token ids, pool mask, padding) and ``pooling.py`` (eos, mean, ATA); it imports nothing else of
the harness, so ``SentenceTransformer(folder, trust_remote_code=True)`` needs only torch,
transformers and sentence-transformers (and peft for a folder with an unmerged adapter).

A stock ``Transformer`` + ``Pooling`` pipeline cannot reproduce these models: a decoder trained
bidirectionally (LLM2Vec) must be switched to bidirectional attention after loading, every decoder
input ends with an EOS the tokenizer may not add, the template can close after the text (LLM2Vec's
`` [/INST]``), and ATA pooling reads the attention the last layer's tokens receive.

Prompts are literal prefixes, as sentence-transformers expects: the template's opening with the
instruction filled in (``"Instruct: {instruction}\\nQuery: "`` gives ``"Instruct: Given a query,
retrieve documents that answer the query\\nQuery: "``); the module appends the template's closing
after the text and pools the text only. ``encode(..., instruction=...)`` fills in the template
itself; a text without prompt or instruction gets the plain template (documents).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer

from .inputs import collate, tokenize_one
from .pooling import AttentionCapture, pool

try:  # sentence-transformers >= 6
    from sentence_transformers.base.modules import InputModule
except ImportError:  # pragma: no cover - older releases (not supported: their prompts differ)
    from sentence_transformers.models import InputModule

TEXT = "{text}"
INSTRUCTION = "{instruction}"
ADAPTER_DIR = "adapter"
SOURCE_FILES = ("st_module.py", "inputs.py", "pooling.py")  # this file and what it imports


class HarnessEmbedding(InputModule):
    """Tokenizer, transformer and pooling of a harness-trained embedding model in one module.

    Args:
        model: the transformer without its LM head (a peft model when an adapter is kept apart).
        tokenizer: its tokenizer.
        pooling: ``eos``, ``mean`` or ``ata``.
        bidirectional: every token attends to every real token (a decoder is switched to it).
        is_decoder: a decoder LLM (its inputs end with EOS).
        instructed: the input format of texts with an instruction (``{instruction}``, ``{text}``).
        plain: the input format of texts without one (``{text}``).
        skip_instruction: pool the text and the template's closing only.
        padding_side: ``left`` or ``right`` (the vectors do not depend on it).
        max_query_length: token budget of instructed texts (EOS included).
        max_doc_length: token budget of plain texts.
        autocast: ``bf16`` to run under bfloat16 autocast, anything else for none.
        attn_implementation: the attention kernel to load with (None: transformers' default).
        base_model: the base model's portable name (Hub id), for the adapter's config.
    """

    config_file_name = "harness_embedding.json"
    config_keys: ClassVar[list[str]] = [
        "pooling",
        "bidirectional",
        "is_decoder",
        "instructed",
        "plain",
        "skip_instruction",
        "padding_side",
        "max_query_length",
        "max_doc_length",
        "autocast",
        "attn_implementation",
        "base_model",
    ]
    forward_kwargs: ClassVar[set[str]] = {"instruction"}
    save_in_root = True

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        pooling: str,
        bidirectional: bool,
        is_decoder: bool,
        instructed: str,
        plain: str = TEXT,
        skip_instruction: bool = True,
        padding_side: str = "left",
        max_query_length: int = 512,
        max_doc_length: int = 512,
        autocast: str = "none",
        attn_implementation: str | None = None,
        base_model: str | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.bidirectional = bidirectional
        self.is_decoder = is_decoder
        self.instructed = instructed
        self.plain = plain
        self.skip_instruction = skip_instruction
        self.padding_side = padding_side
        self.max_query_length = max_query_length
        self.max_doc_length = max_doc_length
        self.autocast = autocast
        self.attn_implementation = attn_implementation
        self.base_model = base_model
        if tokenizer.pad_token is None:  # decoders: pad with EOS, as in training
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = padding_side
        if is_decoder:
            set_causal(model, not bidirectional)
        self._eos_id = tokenizer.eos_token_id if is_decoder else None
        self._opening, self._closing = instructed.split(TEXT, 1)
        self._capture = AttentionCapture(model) if pooling == "ata" else None

    # ------------------------------------------------------------------ inputs

    def render(self, text: str, prompt: str | None) -> tuple[str, int]:
        """The string fed to the model for ``text`` after ``prompt`` (a template opening), and
        the character where its pooled span starts."""
        if prompt:
            return prompt + text + self._closing, len(prompt)
        before, after = self.plain.split(TEXT, 1)
        return before + text + after, len(before)

    def prompt_for(self, instruction: str) -> str:
        """The prompt (a literal prefix) that puts ``instruction`` into the template."""
        return self._opening.replace(INSTRUCTION, instruction)

    def preprocess(
        self,
        inputs: Sequence[Any],
        prompt: str | None = None,
        instruction: str | None = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        """Token ids, attention mask, positions and pool mask of a batch of texts."""
        if any(not isinstance(t, str) for t in inputs):
            raise ValueError(f"{type(self).__name__} embeds texts (str) only")
        if instruction:
            prompt = self.prompt_for(instruction)
        max_length = self.max_query_length if prompt else self.max_doc_length
        items = [
            tokenize_one(
                self.tokenizer,
                self.render,
                text,
                prompt or None,
                max_length,
                eos_id=self._eos_id,
                skip_instruction=self.skip_instruction,
            )
            for text in inputs
        ]
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        batch = collate(items, pad_id=pad_id, left=self.padding_side == "left")
        return {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "position_ids": batch.position_ids,
            "pool_mask": batch.pool_mask,
        }

    @property
    def max_seq_length(self) -> int:
        return max(self.max_query_length, self.max_doc_length)

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        self.max_query_length = self.max_doc_length = int(value)

    # ------------------------------------------------------------------ forward

    def forward(self, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        mask = features["attention_mask"]
        device = mask.device
        amp = (
            torch.autocast(device.type, dtype=torch.bfloat16)
            if self.autocast == "bf16"
            else nullcontext()
        )
        cap = self._capture.capture(mask) if self._capture else nullcontext()
        with amp, cap:
            out = self.model(
                input_ids=features["input_ids"],
                attention_mask=mask,
                position_ids=features["position_ids"],
            )
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        received = self._capture.received if self._capture else None
        features["token_embeddings"] = hidden
        features["sentence_embedding"] = pool(
            hidden.float(), mask, features["pool_mask"], self.pooling, received
        )
        return features

    def get_embedding_dimension(self) -> int:
        return int(_base(self.model).config.hidden_size)

    # ------------------------------------------------------------------ save and load

    def save(
        self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any
    ) -> None:
        """The weights (base, and a peft adapter in ``adapter/`` if kept apart), the tokenizer,
        this module's settings and its source files."""
        out = Path(output_path)
        out.mkdir(parents=True, exist_ok=True)
        base = _base(self.model)
        if base is not self.model:  # weights without the LoRA layers, the adapter beside them
            self.model.save_pretrained(out / ADAPTER_DIR, safe_serialization=safe_serialization)
            _portable_adapter(out / ADAPTER_DIR, self.base_model)
            state = {
                k.replace(".base_layer.", "."): v
                for k, v in base.state_dict().items()
                if "lora_" not in k
            }
            base.save_pretrained(out, state_dict=state, safe_serialization=safe_serialization)
        else:
            base.save_pretrained(out, safe_serialization=safe_serialization)
        self.save_tokenizer(str(out))
        self.save_config(str(out))
        here = Path(__file__).parent
        for name in SOURCE_FILES:
            source = here / name
            if source.resolve() != (out / name).resolve():
                shutil.copyfile(source, out / name)

    @classmethod
    def load(
        cls,
        model_name_or_path: str,
        subfolder: str = "",
        token: bool | str | None = None,
        cache_folder: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        config_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> HarnessEmbedding:
        hub = {
            "token": token,
            "cache_folder": cache_folder,
            "revision": revision,
            "local_files_only": local_files_only,
        }
        settings = cls.load_config(model_name_or_path, subfolder=subfolder, **hub)
        folder = cls.load_dir_path(model_name_or_path, subfolder=subfolder, **hub)
        if folder is None:
            raise FileNotFoundError(f"{model_name_or_path}: no model folder")
        tokenizer = AutoTokenizer.from_pretrained(folder, **(processor_kwargs or {}))
        options = {"dtype": "auto", **(model_kwargs or {})}
        if settings.get("attn_implementation"):
            options.setdefault("attn_implementation", settings["attn_implementation"])
        model = AutoModel.from_pretrained(folder, **options)
        if os.path.isdir(os.path.join(folder, ADAPTER_DIR)):
            try:
                from peft import PeftModel
            except ImportError:
                raise ImportError(
                    f"{model_name_or_path} keeps its LoRA adapter apart: `pip install peft`"
                ) from None
            model = PeftModel.from_pretrained(model, os.path.join(folder, ADAPTER_DIR))
        return cls(model.eval(), tokenizer, **settings)


def set_causal(model: nn.Module, causal: bool) -> None:
    """Causal or bidirectional attention in every layer of a decoder: ``config.is_causal`` makes
    the model build the matching mask (``eager``, ``sdpa``), the modules' ``is_causal`` is what
    ``sdpa`` without a mask and ``flash_attention_2`` read (``harness.models.set_attention``)."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config.is_causal = causal
        if hasattr(module, "is_causal"):
            module.is_causal = causal


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _portable_adapter(folder: Path, base_model: str | None) -> None:
    """peft writes the base model's local folder into the adapter's config and an empty model card
    beside it: name the base by its portable name instead, and leave the card to the folder's."""
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base_model
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (folder / "README.md").unlink(missing_ok=True)
