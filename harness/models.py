"""Loading a backbone (Hub id, local folder or packaged offline model), dtype/attention choices, LoRA."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from harness.config import LoraSettings, ModelSettings
from synth import packaged

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says which and why."""


@dataclass(frozen=True)
class Backbone:
    model: nn.Module  # the transformer without its LM head (AutoModel)
    tokenizer: Any
    is_causal: bool
    path: str  # resolved local folder or Hub id


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ModelLoadError("train.device is 'cuda' but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[setting]


def autocast_dtype(settings: ModelSettings, device: torch.device) -> torch.dtype | None:
    """bf16 autocast when asked (2-3x faster on CPUs with AVX512-BF16); none by default."""
    return torch.bfloat16 if settings.autocast == "bf16" else None


def pick_attention(setting: str, device: torch.device) -> str:
    if setting != "auto":
        if setting == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ModelLoadError("attn_implementation flash_attention_2 needs the flash-attn package")
        return setting
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_backbone(settings: ModelSettings, device: torch.device) -> Backbone:
    """Load tokenizer and base transformer (no LM head) for embedding."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    try:
        path = packaged.resolve(settings.name)
    except packaged.PackagedModelError as e:
        raise ModelLoadError(str(e)) from None
    dtype = pick_dtype(settings.dtype, device)
    attn = pick_attention(settings.attn_implementation, device)
    try:
        config = AutoConfig.from_pretrained(path, revision=settings.revision)
        tokenizer = AutoTokenizer.from_pretrained(path, revision=settings.revision)
        model = AutoModel.from_pretrained(
            path, revision=settings.revision, dtype=dtype, attn_implementation=attn
        )
    except OSError as e:  # missing id/folder, or the Hub unreachable
        raise ModelLoadError(f"cannot load model {settings.name!r}: {e}".splitlines()[0]) from None
    is_causal = not getattr(config, "is_encoder_decoder", False) and _is_decoder(config)
    if tokenizer.pad_token is None:  # decoder LLMs: pad with EOS (LLM2Vec)
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = settings.padding_side
    model.to(device)
    return Backbone(model=model, tokenizer=tokenizer, is_causal=is_causal, path=path)


def _is_decoder(config: Any) -> bool:
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") for a in archs):
        return True
    return bool(getattr(config, "is_decoder", False))


def apply_lora(model: nn.Module, lora: LoraSettings) -> nn.Module:
    """Wrap ``model`` with trainable LoRA adapters (peft); everything else frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias="none",
    )
    return get_peft_model(model, config)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in backward (non-reentrant torch checkpointing)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(base, "enable_input_require_grads"):
        base.enable_input_require_grads()
