"""What ``bench/gpu_check.py`` measures: the Mistral-7B architecture with random weights, built
through the harness's own model code; the harness's training step on synthetic token ids; the FLOP
count and the devices' peak FLOPs. Import ``_common`` first (it sets the offline environment).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from harness.config import ModelSettings
from harness.embedder import Embedder, Encoded
from harness.models import (
    Backbone,
    apply_lora,
    enable_gradient_checkpointing,
    pick_attention,
    pick_dtype,
    set_attention,
)
from harness.schedules import Example
from harness.train import StepRunner

# Mistral-7B-Instruct-v0.2's published config.json (the values that change cost or numerics).
MISTRAL_7B: dict[str, Any] = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "vocab_size": 32000,
    "rope_theta": 1e6,
    "max_position_embeddings": 32768,
    "sliding_window": None,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "architectures": ["MistralForCausalLM"],
}
# The same architecture at toy size, for --tiny (CPU, seconds).
TINY: dict[str, Any] = {
    **MISTRAL_7B,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
}
EOS = 2

# Dense (no sparsity) bf16 tensor-core peak per GPU, from NVIDIA's data sheets; the first name
# found in the device name wins, so the specific names come before "H100".
PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
)


def label(pooling: str, attention: str) -> str:
    """A variant's name: ``ata bidirectional``."""
    return f"{pooling} {attention}"


def count(n: float) -> str:
    """2120000 -> 2.12M, 7241732096 -> 7.24B."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    """The device's dense bf16 peak (FLOP/s) and its name; None where it is not in the table."""
    if device.type != "cuda":
        return None, "CPU"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16:
        if key in name:
            return value, name
    return None, name


def flash_attn_version() -> str | None:
    """The flash-attn version when it imports (a broken install counts as none)."""
    try:
        return str(importlib.import_module("flash_attn").__version__)
    except Exception:  # ImportError, or an ABI mismatch with torch raising something else
        return None


# ---------------------------------------------------------------- the model


@dataclass(frozen=True)
class IdsOnly:
    """What the embedder reads of a tokenizer when its inputs come as token ids: Mistral's EOS,
    padded with EOS (LLM2Vec). No tokenizer file is needed, so nothing is downloaded."""

    eos_token_id: int = EOS
    pad_token_id: int = EOS


@dataclass(frozen=True)
class Shapes:
    """What the FLOP count needs of the model."""

    layers: int
    attn_width: int  # query heads x head size
    linear: int  # weights of the frozen linear layers
    lora: int  # trainable LoRA weights

    def step_flops(
        self, tokens: int, length: int, causal: bool, recomputed_layers: int
    ) -> tuple[float, float]:
        """(model FLOPs, hardware FLOPs) of one training step over ``tokens`` tokens at ``length``.

        Per token: forward 2N + 2N_lora + A; backward through the frozen weights 2N (activation
        gradients only) + 4N_lora (activations and LoRA weights) + 2A; A = the attention scores
        and the weighted sum, 4 x length x width per layer (causal: (length + 1) / 2 keys on
        average). Model FLOPs (what MFU counts) leave out the recomputation of checkpointed
        layers; hardware FLOPs add it. Pooling, ATA's received attention and the loss are left
        out (each well under 1% of a 7B step at 512 tokens).
        """
        keys = (length + 1) / 2 if causal else length
        attn = self.layers * 4 * keys * self.attn_width
        forward = 2 * self.linear + 2 * self.lora + attn
        model = tokens * (forward + 2 * self.linear + 4 * self.lora + 2 * attn)
        return model, model + tokens * forward * recomputed_layers / self.layers


def build_model(
    arch: dict[str, Any], settings: ModelSettings, device: torch.device
) -> tuple[nn.Module, str, list[str]]:
    """The architecture with random weights, made in the harness's dtype and attention kernel
    directly on ``device``; returns the model, its kernel and notes (a flash-attn fallback)."""
    from transformers import AutoModel, MistralConfig

    notes = []
    attn = pick_attention(settings.attn_implementation, device)
    if attn == "flash_attention_2" and flash_attn_version() is None:
        notes.append("flash-attn is installed but does not import: sdpa instead")
        attn = "sdpa"
    if device.type == "cuda" and attn != "flash_attention_2":
        notes.append("flash-attn not installed: sdpa (LLM2Vec used flash-attention-2)")
    config = MistralConfig(**arch)
    with torch.device(device):
        model = AutoModel.from_config(
            config, dtype=pick_dtype(settings.dtype, device), attn_implementation=attn
        )
    return model, attn, notes


def shared_embedders(
    model: nn.Module,
    settings: ModelSettings,
    device: torch.device,
    poolings: Sequence[str],
    checkpointing: bool,
) -> tuple[dict[str, Embedder], Shapes]:
    """One LoRA model behind an embedder per pooling (a 7B model fits once, not three times).

    The harness's own wrappers: bidirectional attention, LoRA, gradient checkpointing, pooling.
    The ata embedder's wrapper kernel stays installed for the others; without an active capture
    it only calls the real kernel. Call :func:`prepare` before each variant's step.
    """
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    cfg = model.config
    head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    model = apply_lora(model, settings.lora)
    if checkpointing:
        enable_gradient_checkpointing(model)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    backbone = Backbone(
        model=model,
        tokenizer=IdsOnly(),
        is_decoder=True,
        path="random weights",
        bidirectional=settings.attention == "bidirectional",
    )
    embs = {
        p: Embedder(backbone, settings.model_copy(update={"pooling": p}), device) for p in poolings
    }
    for emb in embs.values():
        emb.train()
    shapes = Shapes(cfg.num_hidden_layers, cfg.num_attention_heads * head, linear, lora)
    return embs, shapes


def prepare(emb: Embedder, attention: str, checkpointing: bool) -> None:
    """Set the shared model up for one variant: its attention, and the last layer checkpointed
    as in a trial of that pooling (an ata capture turns it off again for itself)."""
    set_attention(emb.model, attention, is_decoder=True)
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in emb.model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if layers and checkpointing:
        layers[-1].gradient_checkpointing = True


def attention_check(emb: Embedder, attention: str, vocab: int) -> tuple[str, bool]:
    """Whether ``attention`` holds on this kernel: the first token's last hidden state changes
    with the last token under bidirectional attention and stays under causal (one row left-padded,
    as the harness pads). Returns a line for the report and whether it held."""
    prepare(emb, attention, checkpointing=False)
    ids = torch.randint(3, vocab, (16,)).tolist()
    rows = [Encoded([*ids[:15], EOS], [True] * 16), Encoded([*ids[:11], EOS], [True] * 12)]
    other = [Encoded([*ids[:14], ids[14] % (vocab - 3) + 3, EOS], [True] * 16), rows[1]]
    states = []
    emb.eval()  # no LoRA dropout: the two passes differ only in the last token
    try:
        with torch.no_grad():
            for items in (rows, other):
                b = emb.collate(items).to(emb.device)
                out = emb.model(
                    input_ids=b.input_ids,
                    attention_mask=b.attention_mask,
                    position_ids=b.position_ids,
                )
                states.append(out.last_hidden_state[0, 0].float())
    finally:
        emb.train()
    change = float((states[0] - states[1]).abs().max() / states[0].abs().max())
    ok = change > 1e-3 if attention == "bidirectional" else change < 1e-3
    verdict = "holds" if ok else "**DOES NOT HOLD**"
    return (
        f"{attention} attention {verdict}: the first token's state changes by {change:.3g} "
        "(relative) when the last token changes",
        ok,
    )


# ---------------------------------------------------------------- the training step


def synthetic_batch(
    batch: int, length: int, negatives: int, vocab: int, seed: int = 0
) -> tuple[list[Example], list[Encoded], list[Encoded]]:
    """Examples (texts only name them) and their token ids: every text ``length`` tokens ending in
    EOS; a query's first 16 tokens stand for its instruction (not pooled)."""
    g = torch.Generator().manual_seed(seed)
    instruction = min(16, length // 4)

    def text(pooled_from: int) -> Encoded:
        ids = [*torch.randint(3, vocab, (length - 1,), generator=g).tolist(), EOS]
        return Encoded(ids, [i >= pooled_from for i in range(length)])

    examples = [
        Example(
            "i",
            f"q{i}",
            f"p{i}",
            tuple(f"n{i}.{k}" for k in range(negatives)),
            (1,) * negatives,
            str(i),
        )
        for i in range(batch)
    ]
    queries = [text(instruction) for _ in range(batch)]
    docs = [text(0) for _ in range(batch * (1 + negatives))]
    return examples, queries, docs


class SyntheticSteps(StepRunner):
    """The harness's training step (:class:`harness.train.StepRunner`: embed queries and
    documents, InfoNCE over in-batch + hard negatives, backward) on pre-made token ids."""

    def __init__(
        self, embedder: Embedder, temperature: float, ids: tuple[list[Encoded], list[Encoded]]
    ):
        super().__init__(embedder, temperature, chunk=None)
        self.ids = ids

    def tokenize(self, batch: Sequence[Example]) -> tuple[list[Encoded], list[Encoded], list[str]]:
        texts = [ex.positive for ex in batch] + [n for ex in batch for n in ex.negatives]
        return self.ids[0], self.ids[1], texts


def train_step(
    runner: StepRunner,
    examples: Sequence[Example],
    optimizer: torch.optim.Optimizer,
    max_grad_norm: float | None,
) -> float:
    """One optimization step as ``harness.train`` runs it: step, clip, AdamW update."""
    loss = runner(examples)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if not math.isfinite(loss):
        raise FloatingPointError(f"the training step's loss is {loss}")
    return loss
