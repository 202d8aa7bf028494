"""Loading a backbone (Hub id, local folder or packaged offline model), dtype/attention choices, LoRA."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.config import ConfigError, LoraSettings, ModelSettings
from harness.init_adapter import read_adapter
from synth import packaged

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says which and why."""


@dataclass(frozen=True)
class Backbone:
    model: nn.Module  # the transformer without its LM head (AutoModel), or with it for MNTP
    tokenizer: Any
    is_decoder: bool  # a decoder LLM (its inputs end with EOS), whatever its attention
    path: str  # resolved local folder or Hub id
    bidirectional: bool = True  # every token attends to every real token (encoders, LLM2Vec)


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
            raise ModelLoadError(
                "attn_implementation flash_attention_2 needs the flash-attn package"
            )
        return setting
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_backbone(
    settings: ModelSettings,
    device: torch.device,
    *,
    lm_head: bool = False,
    attention: str | None = None,
) -> Backbone:
    """Load tokenizer and base transformer (no LM head unless ``lm_head``) for embedding.

    ``attention`` overrides ``settings.attention``; ``settings.init_adapter`` is merged into the
    weights (the backbone then carries no adapter of its own).
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    try:
        path = packaged.resolve(settings.name)
    except packaged.PackagedModelError as e:
        raise ModelLoadError(str(e)) from None
    dtype = pick_dtype(settings.dtype, device)
    attn = pick_attention(settings.attn_implementation, device)
    auto = AutoModelForCausalLM if lm_head else AutoModel
    try:
        config = AutoConfig.from_pretrained(path, revision=settings.revision)
        tokenizer = AutoTokenizer.from_pretrained(path, revision=settings.revision)
        model = auto.from_pretrained(
            path, revision=settings.revision, dtype=dtype, attn_implementation=attn
        )
    except OSError as e:  # missing id/folder, or the Hub unreachable
        raise ModelLoadError(f"cannot load model {settings.name!r}: {e}".splitlines()[0]) from None
    is_decoder = not getattr(config, "is_encoder_decoder", False) and _is_decoder(config)
    bidirectional = set_attention(model, attention or settings.attention, is_decoder=is_decoder)
    if settings.init_adapter:
        _check_pinned(settings.init_adapter, settings.init_adapter_sha256)
        model = merge_adapter(model, settings.init_adapter)
    if tokenizer.pad_token is None:  # decoder LLMs: pad with EOS (LLM2Vec)
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = settings.padding_side
    model.to(device)
    return Backbone(
        model=model,
        tokenizer=tokenizer,
        is_decoder=is_decoder,
        path=path,
        bidirectional=bidirectional,
    )


def set_attention(model: nn.Module, mode: str, *, is_decoder: bool) -> bool:
    """Make a decoder's attention causal or bidirectional in every layer; True if bidirectional.

    Bidirectional needs two switches in transformers 5, both set here: ``config.is_causal = False``
    makes the model build a bidirectional padding mask instead of a causal one (the route the
    ``eager`` and ``sdpa`` kernels read), and ``is_causal = False`` on every attention module is what
    ``sdpa`` falls back to when no mask is needed and what ``flash_attention_2`` (which takes no 4-D
    mask) reads. Encoders are bidirectional already and cannot be made causal here.
    """
    if not is_decoder:
        if mode == "causal":
            raise ModelLoadError(
                "model.attention 'causal' needs a decoder LLM; this model is an encoder"
            )
        return True
    if mode == "native":
        mode = "causal"
    causal = mode == "causal"
    for config in {id(c): c for c in _configs(model)}.values():
        config.is_causal = causal
    modules = [m for m in model.modules() if hasattr(m, "is_causal") and isinstance(m, nn.Module)]
    if not modules:
        raise ModelLoadError(
            f"model.attention {mode!r}: no attention module with an is_causal switch in {type(model).__name__}"
        )
    for m in modules:
        m.is_causal = causal
    return not causal


def _configs(model: nn.Module) -> list[Any]:
    return [
        m.config
        for m in model.modules()
        if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")
    ]


def adapter_target(model: nn.Module) -> nn.Module:
    """The module an embedding adapter belongs to: the transformer without its LM head, so that an
    adapter made by MNTP (on a ``*ForCausalLM``) and one used for embedding (on ``AutoModel``) carry
    the same weight names (LLM2Vec saves its MNTP adapter the same way)."""
    inner = getattr(model, "model", None)
    return inner if hasattr(model, "lm_head") and isinstance(inner, nn.Module) else model


def _check_pinned(source: str, sha256: str | None) -> None:
    """A local init adapter must be the one whose hash the trial key was made with."""
    if sha256 is None or not Path(source).is_dir():
        return
    try:
        found = read_adapter(Path(source)).sha256
    except ConfigError as e:
        raise ModelLoadError(str(e)) from None
    if found != sha256:
        raise ModelLoadError(
            f"model.init_adapter {source}: sha256 {found[:16]}… is not the pinned {sha256[:16]}…"
        )


def load_adapter(model: nn.Module, source: str | Path, what: str) -> nn.Module:
    """``model`` with the PEFT adapter at ``source``; an adapter that is unreadable (a truncated
    or garbled file) or does not fit the model (other modules or ranks in its ``adapter_config``)
    is one :class:`ModelLoadError` naming ``what`` and ``source``."""
    from peft import PeftModel
    from safetensors import SafetensorError

    try:
        return PeftModel.from_pretrained(model, source)
    # OSError: files missing; ValueError: a broken config or modules the model lacks (peft's
    # NoMatchingPeftModuleError); SafetensorError: a cut or garbled weights file
    except (OSError, ValueError, SafetensorError) as e:
        problem = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    except RuntimeError as e:  # torch's load_state_dict: tensors of other shapes (another rank)
        if "Error(s) in loading state_dict" not in str(e):
            raise
        lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        problem = lines[0] if lines else str(e).splitlines()[0]
    raise ModelLoadError(f"{what} {source}: cannot load the adapter ({problem})")


def merge_adapter(model: nn.Module, source: str) -> nn.Module:
    """Merge the PEFT adapter at ``source`` (folder or Hub id) into ``model``'s weights."""
    target = adapter_target(model)
    merged = load_adapter(target, source, "model.init_adapter").merge_and_unload()
    if target is model:
        return merged
    model.model = merged
    return model


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
