"""Poolings: ``eos`` (last real token), ``mean`` (over pooled tokens), ``ata`` (anchor-token-aware).

ATA (Negative Matters, ACL 2025) weights each last-layer hidden state by the attention that token
*receives* in the last layer ("attention weights arranged along the key dimension"). The paper gives
no closed formula in what we could read, so the choices made here are explicit:

    received[b, j] = sum_h  sum_{i real, i may attend to j}  softmax_j(q_i . k_j * scale)[b, h, i, j]
    weight[b, j]   = received[b, j] * pooled[b, j] / sum_j' received[b, j'] * pooled[b, j']

- heads are summed (a mean gives the same normalized weights);
- the query rows i are the real (non-padding) tokens, all of them, instruction included: the
  instruction is context every token reads, only its *own* hidden states are left out of the pool
  when ``skip_instruction`` is on (``pooled`` mask);
- for causal models i ranges over i >= j (what the model actually attends), for encoders over all i;
- gradients flow through the weights (LoRA on q/k can learn where to look); the attention rows are
  computed in chunks of query rows and recomputed in backward by a hand-written gradient, so the
  extra memory is one chunk of ``B x H x chunk x L`` instead of the full map, and no other layer
  changes implementation.

How the probabilities are obtained: the last attention module gets its own copy of the model config
whose ``_attn_implementation`` is a registered wrapper. The wrapper runs the model's real attention
kernel (sdpa / flash / eager) unchanged and, while an :class:`AttentionCapture` is active, also
computes the received attention from the same post-rotary query and key tensors. Every other layer
keeps its fused kernel and nothing materializes attention maps of the whole model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

POOLINGS = ("eos", "mean", "ata")
_WRAPPER = "harness_ata"
_QUERY_CHUNK = 256


def pool(
    hidden: Tensor,
    attention_mask: Tensor,
    pool_mask: Tensor,
    method: str,
    received: Tensor | None = None,
) -> Tensor:
    """Pool ``hidden`` (B, L, D) into (B, D).

    ``attention_mask`` marks real tokens; ``pool_mask`` the real tokens that may be pooled (the
    instruction excluded); ``received`` (B, L) is the attention each token receives (``ata`` only).
    """
    if method == "eos":
        return hidden[
            torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)
        ]
    if method == "mean":
        weights = pool_mask.to(hidden.dtype)
    elif method == "ata":
        if received is None:
            raise ValueError("ata pooling needs the received attention of the last layer")
        weights = received.to(hidden.dtype) * pool_mask.to(hidden.dtype)
    else:
        raise ValueError(f"unknown pooling {method!r}; expected one of {POOLINGS}")
    weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    return torch.einsum("bl,bld->bd", weights, hidden)


def ata_weights(received: Tensor, pool_mask: Tensor) -> Tensor:
    """Normalized ATA weights (B, L): non-negative, zero off ``pool_mask``, summing to 1."""
    w = received.float() * pool_mask.float()
    return w / w.sum(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the last real token of each row, for left or right padding."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.bool() * (positions + 1)).argmax(dim=1)


def received_attention(
    query: Tensor,
    key: Tensor,
    scaling: float,
    token_mask: Tensor,
    causal: bool,
    chunk: int = _QUERY_CHUNK,
) -> Tensor:
    """Attention each key position receives: (B, L), summed over heads and real query rows.

    ``query`` (B, H, L, d) and ``key`` (B, H_kv, L, d) are the layer's post-rotary projections
    (grouped-query attention: query head h reads key head h // (H / H_kv), as transformers'
    ``repeat_kv`` does). Computed in float32, ``chunk`` query rows at a time; differentiable in
    ``query`` and ``key`` with a hand-written backward that recomputes each chunk's probabilities
    instead of storing them (see :class:`_ReceivedAttention`).
    """
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"{query.shape[1]} query heads cannot share {key.shape[1]} key heads")
    return _ReceivedAttention.apply(
        query, key, token_mask.bool(), float(scaling), bool(causal), int(chunk)
    )


class _ReceivedAttention(torch.autograd.Function):
    """``received[b, j] = sum_{h, i} w[b, i] P[b, h, i, j]``, ``P = softmax_j(scale q_i . k_j)``
    over the allowed keys, ``w`` = 1 on real query rows.

    Autograd through ``softmax`` + ``einsum`` would keep (or, under checkpointing, recompute and
    then keep) several ``B x H x chunk x L`` tensors per chunk: the probabilities, the broadcast
    gradient of the einsum, the softmax gradient. The gradient has a closed form instead:

        dS[h, i, j] = scale * w_i * P[h, i, j] * (g_j - sum_k P[h, i, k] g_k)

    so backward recomputes ``P`` once per chunk, turns it into ``dS`` in place, and needs two
    matmuls (``dS @ k``, ``dS^T @ q``). Nothing of size L x L is saved between forward and
    backward, and grouped key heads are never repeated in memory.
    """

    @staticmethod
    def forward(
        ctx: Any, query: Tensor, key: Tensor, real: Tensor, scaling: float, causal: bool, chunk: int
    ) -> Tensor:
        ctx.save_for_backward(query, key, real)
        ctx.args = (scaling, causal, chunk)
        total = query.new_zeros((query.shape[0], query.shape[2]), dtype=_work_dtype(query))
        with _no_autocast(query):  # float32 throughout, also inside a bf16 autocast region
            kf = key.to(total.dtype)
            for s, c, qg, w in _chunks(query, real, key.shape[1], chunk):
                probs = _chunk_probs(qg, kf, real, s, c, scaling, causal)  # (B, KV, G*c, L)
                total += torch.matmul(w[:, None, None, :], probs).sum(dim=1).squeeze(1)
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        query, key, real = ctx.saved_tensors
        scaling, causal, chunk = ctx.args
        b, h, _, d = query.shape
        kv = key.shape[1]
        work = _work_dtype(query)
        g_col, g_row = grad.to(work)[:, None, :, None], grad.to(work)[:, None, None, :]
        dq = torch.empty_like(query) if ctx.needs_input_grad[0] else None
        dk = torch.zeros_like(key, dtype=work) if ctx.needs_input_grad[1] else None
        with _no_autocast(query):
            kf = key.to(work)
            for s, c, qg, w in _chunks(query, real, kv, chunk):
                ds = _chunk_probs(qg, kf, real, s, c, scaling, causal)  # P, turned into dS in place
                row = torch.matmul(ds, g_col)  # (B, KV, G*c, 1): sum_k P_ik g_k
                ds.mul_(g_row - row).mul_((w * scaling)[:, None, :, None])
                if dq is not None:
                    dq[:, :, s : s + c] = (
                        torch.matmul(ds, kf).view(b, kv, h // kv, c, d).reshape(b, h, c, d)
                    )
                if dk is not None:
                    dk += torch.matmul(ds.transpose(-1, -2), qg)
        return dq, None if dk is None else dk.to(key.dtype), None, None, None, None


def _work_dtype(t: Tensor) -> torch.dtype:
    """float32 for half-precision inputs (and float32), float64 stays float64 (for gradcheck)."""
    return torch.promote_types(t.dtype, torch.float32)


def _no_autocast(t: Tensor) -> torch.autocast:
    return torch.autocast(device_type=t.device.type, enabled=False)


def _chunks(
    query: Tensor, real: Tensor, kv: int, chunk: int
) -> Iterator[tuple[int, int, Tensor, Tensor]]:
    """Per chunk of query rows: its start and size, the query rows (float32 at least) grouped by
    the key head they read (B, KV, G*c, d), and the row weights (B, G*c): 1 on real tokens, 0 on
    padding."""
    b, h, length, d = query.shape
    group = h // kv
    for s in range(0, length, chunk):
        q = query[:, :, s : s + chunk]
        c = q.shape[2]
        qg = q.to(_work_dtype(q)).reshape(b, kv, group * c, d)  # head j*group+g -> rows g*c+i
        yield s, c, qg, real[:, s : s + c].to(qg.dtype).repeat(1, group)


def _chunk_probs(
    qg: Tensor, kf: Tensor, real: Tensor, start: int, c: int, scaling: float, causal: bool
) -> Tensor:
    """softmax_j(scale q_i . k_j) over allowed keys (real, and j <= i if causal): (B, KV, G*c, L)."""
    length = kf.shape[2]
    scores = torch.matmul(qg, kf.transpose(-1, -2)).mul_(scaling)
    allowed = real[:, None, None, :]  # (B, 1, 1, L)
    if causal:
        positions = torch.arange(length, device=kf.device)
        qpos = positions[start : start + c].repeat(qg.shape[2] // c)  # row g * c + i -> start + i
        allowed = allowed & (positions[None, :] <= qpos[:, None])[None, None]
    scores.masked_fill_(~allowed, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1)


class AttentionCapture:
    """Collects the last layer's received attention during a forward pass (see module docstring)."""

    def __init__(self, model: nn.Module):
        self.module = _last_attention_module(model)
        self.token_mask: Tensor | None = None
        self.received: Tensor | None = None
        base = getattr(self.module.config, "_attn_implementation", None) or "sdpa"
        if base == _WRAPPER:  # already installed (e.g. a second capture on the same model)
            base = self.module._harness_ata_base
        self.module._harness_ata_base = base
        self.module._harness_ata_capture = self
        self.layer = _checkpointed_layer(model, self.module)
        config = copy.copy(self.module.config)
        config._attn_implementation = _WRAPPER
        self.module.config = config
        _register_wrapper()

    @contextmanager
    def capture(self, token_mask: Tensor) -> Iterator[AttentionCapture]:
        # Under gradient checkpointing, backward reruns a layer's forward after this block has
        # exited, when there is no mask to capture with: the recomputation would then save other
        # tensors than the forward did (torch raises CheckpointError). So the last layer, the one
        # whose attention is captured, is never checkpointed; it holds 1/num_layers of the
        # activations. Set on every capture because (re-)enabling checkpointing resets it.
        if self.layer is not None:
            self.layer.gradient_checkpointing = False
        self.token_mask, self.received = token_mask, None
        try:
            yield self
        finally:
            self.token_mask = None

    def _on_attention(self, module: nn.Module, query: Tensor, key: Tensor, scaling: float) -> None:
        if self.token_mask is None:
            return
        self.received = received_attention(
            query, key, scaling, self.token_mask, bool(getattr(module, "is_causal", True))
        )


def _last_attention_module(model: nn.Module) -> nn.Module:
    """The self-attention module of the last layer (anything with q/k projections and a config)."""
    found = [
        m
        for m in model.modules()
        if hasattr(m, "config") and hasattr(m, "is_causal") and _has_qk(m)
    ]
    if not found:
        raise ValueError(
            f"ata pooling: no attention module using transformers' attention interface found in "
            f"{type(model).__name__}; use eos or mean pooling for this architecture"
        )
    return found[-1]


def _checkpointed_layer(model: nn.Module, attention: nn.Module) -> nn.Module | None:
    """The outermost module around ``attention`` that transformers can checkpoint (its decoder
    layer), or None."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    for m in model.modules():
        if isinstance(m, GradientCheckpointingLayer) and any(
            sub is attention for sub in m.modules()
        ):
            return m
    return None


def _has_qk(m: nn.Module) -> bool:
    return (hasattr(m, "q_proj") and hasattr(m, "k_proj")) or (
        hasattr(m, "query") and hasattr(m, "key")
    )


def _ata_attention(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any, **kwargs: Any
):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    base_name = module._harness_ata_base
    base: Callable[..., Any] = (
        ALL_ATTENTION_FUNCTIONS[base_name]
        if base_name in ALL_ATTENTION_FUNCTIONS
        else _eager_of(module)
    )
    out = base(module, query, key, value, attention_mask, **kwargs)
    scaling = kwargs.get("scaling")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    module._harness_ata_capture._on_attention(module, query, key, scaling)
    return out


def _eager_of(module: nn.Module) -> Callable[..., Any]:
    import sys

    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise ValueError(f"ata pooling: no eager attention for {type(module).__name__}")
    return fn


_registered = False


def _register_wrapper() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(_WRAPPER, _ata_attention)
    _registered = True
