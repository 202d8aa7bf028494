"""Poolings on the real packaged SmolLM2 (and MiniLM): padding/batch invariance, ATA weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness.config import ModelSettings
from harness.embedder import Embedder
from harness.pooling import last_token_index, pool, received_attention

INSTRUCTION = "Retrieve a passage that answers the question"
TEXTS = [
    "A man is playing a guitar on the street.",
    "Hi",
    "The committee, after a long debate, approved the new budget. Critics were not convinced.",
    "What is the boiling point of water at high altitude?",
]


@pytest.fixture(scope="module")
def smol_models(smollm2_dir):
    """One SmolLM2 embedder per (pooling, padding side), sharing nothing but the cached weights."""
    torch.manual_seed(0)
    return {
        (pooling, side): Embedder.from_settings(
            ModelSettings(pooling=pooling, padding_side=side, lora={"enabled": False}), "cpu"
        )
        for pooling in ("eos", "mean", "ata")
        for side in ("left", "right")
    }


def _normed(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


@pytest.mark.parametrize("pooling", ["eos", "mean", "ata"])
@pytest.mark.parametrize("instruction", [None, INSTRUCTION])
def test_same_vector_under_left_and_right_padding_and_alone(smol_models, pooling, instruction):
    with torch.inference_mode():
        left = smol_models[(pooling, "left")]
        right = smol_models[(pooling, "right")]
        v_left = left(left.tokenize(TEXTS, instruction))
        v_right = right(right.tokenize(TEXTS, instruction))
        alone = torch.cat([left(left.tokenize([t], instruction)) for t in TEXTS])
    assert torch.allclose(_normed(v_left), _normed(v_right), atol=1e-5)
    assert torch.allclose(_normed(v_left), _normed(alone), atol=1e-5)


@pytest.mark.parametrize("pooling", ["eos", "mean", "ata"])
def test_same_vector_in_a_batch_of_64(smol_models, pooling):
    emb = smol_models[(pooling, "left")]
    texts = [*(TEXTS * 16)[:63], "A short one."]
    with torch.inference_mode():
        batch = emb(emb.tokenize(texts))
        single = emb(emb.tokenize([texts[-1]]))
    assert torch.allclose(_normed(batch[-1:]), _normed(single), atol=1e-5)


def test_ata_weights_are_a_distribution_over_pooled_tokens(smol_models):
    emb = smol_models[("ata", "left")]
    batch = emb.tokenize(TEXTS, INSTRUCTION)
    w = emb.ata_weights(batch)
    assert (w >= 0).all()
    assert torch.allclose(w.sum(dim=1), torch.ones(len(TEXTS)), atol=1e-5)
    assert (w[batch.attention_mask == 0] == 0).all(), "padding gets weight"
    instruction_tokens = (batch.attention_mask == 1) & ~batch.pool_mask
    assert instruction_tokens.any(dim=1).all(), (
        "the instruction prefix should be found in every query"
    )
    assert (w[instruction_tokens] == 0).all(), (
        "instruction tokens get weight despite skip_instruction"
    )


def test_ata_weights_favour_anchor_tokens_on_real_sentences(smol_models, shared_data):
    """The paper's anchors on real sentences: the first token gets far more than a uniform share, and
    sentence punctuation more than the ordinary word tokens (the first token, an attention sink in
    SmolLM2, takes most of the mass, so punctuation is compared with the other non-first tokens)."""
    emb = smol_models[("ata", "right")]
    lines = (shared_data / "STSBenchmark" / "test.tsv").read_text(encoding="utf-8").splitlines()[1:]
    sentences = [s for s in (line.split("\t")[0] for line in lines) if s.rstrip().endswith(".")][
        :48
    ]
    batch = emb.tokenize(sentences)
    w = emb.ata_weights(batch)
    first, punct, words = [], [], []
    for row in range(len(sentences)):
        n = int(batch.attention_mask[row].sum())
        toks = emb.tokenizer.convert_ids_to_tokens(batch.input_ids[row, :n].tolist())
        relative = w[row, :n] * n  # 1.0 = a uniform share
        first.append(float(relative[0]))
        for i, tok in enumerate(toks[1:-1], start=1):  # neither the first token nor the EOS
            (punct if tok in (".", ",", ";", ":", "?", "!") else words).append(float(relative[i]))
    mean = lambda xs: sum(xs) / len(xs)
    assert mean(first) > 2.0
    assert len(punct) >= len(sentences)
    assert mean(punct) > 1.1 * mean(words)
    # the weights are really non-uniform (sdpa gives no attention maps: this catches a silent no-op)
    assert float(w.max(dim=1).values.mean()) > 3 / batch.attention_mask.sum(1).float().mean()


def test_ata_matches_naive_eager_attention(smollm2_dir):
    """The recomputed received attention equals the column sums of the eager model's last-layer map."""
    from transformers import AutoModel

    emb = Embedder.from_settings(
        ModelSettings(pooling="ata", padding_side="left", lora={"enabled": False}), "cpu"
    )
    batch = emb.tokenize(TEXTS, INSTRUCTION)
    with torch.inference_mode():
        emb(batch)
        ours = emb._capture.received
        eager = AutoModel.from_pretrained(
            smollm2_dir, attn_implementation="eager", dtype=torch.float32
        )
        out = eager(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            output_attentions=True,
        )
    probs = out.attentions[-1]  # (B, H, L, L)
    real_rows = batch.attention_mask[:, None, :, None].float()
    naive = (probs * real_rows).sum(dim=(1, 2))
    mask = batch.attention_mask.bool()
    assert torch.allclose(ours[mask], naive[mask], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pooling", ["eos", "mean", "ata"])
def test_gradient_checkpointing_gives_the_same_gradients(smollm2_dir, pooling):
    """`train.gradient_checkpointing` recomputes layers in backward; with two forwards before one
    backward (queries, then documents, as a training step does) the LoRA gradients must equal
    those of the plain model. ATA captured its attention only in the first forward and failed with
    torch's CheckpointError before its layer was kept out of checkpointing."""
    settings = ModelSettings(pooling=pooling, lora={"r": 4, "alpha": 8, "dropout": 0.0})

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        emb = Embedder.from_settings(
            settings, "cpu", lora=True, gradient_checkpointing=checkpointing
        )
        emb.train()
        q = emb(emb.tokenize(TEXTS[:2], INSTRUCTION))
        d = emb(emb.tokenize(TEXTS[2:]))
        (F.normalize(q, dim=-1) @ F.normalize(d, dim=-1).T / 0.05).log_softmax(
            -1
        ).diagonal().sum().neg().backward()
        return {
            n: p.grad.clone()
            for n, p in emb.model.named_parameters()
            if p.requires_grad and p.grad is not None
        }

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for name, g in plain.items():
        assert torch.allclose(g, checkpointed[name], rtol=1e-4, atol=1e-6), name


def _received_by_autograd(query, key, scaling, token_mask, causal):
    """The received attention written the plain way (whole map, autograd through softmax)."""
    h, length = query.shape[1], query.shape[2]
    key = key.repeat_interleave(h // key.shape[1], dim=1)
    real = token_mask.bool()
    scores = query @ key.transpose(-1, -2) * scaling
    allowed = real[:, None, None, :]
    if causal:
        pos = torch.arange(length)
        allowed = allowed & (pos[None, :] <= pos[:, None])[None, None]
    probs = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min).softmax(-1)
    return torch.einsum("bhil,bi->bl", probs, real.to(probs.dtype))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("heads", "kv_heads"), [(6, 2), (3, 3), (4, 1)])
def test_received_attention_values_and_gradients(causal, heads, kv_heads):
    """The chunked forward and the hand-written backward equal plain autograd (float64, so exact
    to rounding), with grouped key heads, left and right padding and a chunk that splits rows."""
    torch.manual_seed(0)
    q = torch.randn(3, heads, 11, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, kv_heads, 11, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[1, 8:] = 0  # right padding
    g = torch.randn(3, 11, dtype=torch.float64)  # a random upstream gradient (sum() has zero grad)

    ours = received_attention(q, k, 0.4, mask, causal, chunk=4)
    (ours * g).sum().backward()
    dq, dk = q.grad.clone(), k.grad.clone()
    q.grad = k.grad = None
    ref = _received_by_autograd(q, k, 0.4, mask, causal)
    (ref * g).sum().backward()

    assert ours.dtype == torch.float64
    assert torch.allclose(ours, ref, atol=1e-12)
    assert torch.allclose(dq, q.grad, atol=1e-12) and torch.allclose(dk, k.grad, atol=1e-12)
    assert dq.abs().sum() > 0 and dk.abs().sum() > 0
    assert torch.autograd.gradcheck(
        lambda a, b: received_attention(a, b, 0.4, mask, causal, chunk=4),
        (q.detach().requires_grad_(), k.detach().requires_grad_()),
    )


def test_received_attention_is_float32_for_half_inputs_and_under_autocast():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 9, 8)
    mask = torch.ones(2, 9, dtype=torch.long)
    ref = received_attention(q, k, 0.3, mask, True, chunk=4)
    qb, kb = q.bfloat16().requires_grad_(), k.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = received_attention(qb, kb, 0.3, mask, True, chunk=4)
    assert out.dtype == torch.float32
    assert torch.allclose(out, ref, atol=0.05)  # only the bf16 rounding of q and k differs
    (out * torch.randn_like(out)).sum().backward()
    assert qb.grad.dtype == torch.bfloat16 and kb.grad.dtype == torch.bfloat16


def test_eos_and_mean_on_hand_made_tensors():
    hidden = torch.arange(2 * 4 * 2, dtype=torch.float32).reshape(2, 4, 2)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])
    assert last_token_index(mask).tolist() == [3, 1]
    eos = pool(hidden, mask, mask.bool(), "eos")
    assert eos.tolist() == [hidden[0, 3].tolist(), hidden[1, 1].tolist()]
    mean = pool(hidden, mask, mask.bool(), "mean")
    assert torch.allclose(mean[1], hidden[1, :2].mean(0))
    with pytest.raises(ValueError, match="unknown pooling"):
        pool(hidden, mask, mask.bool(), "max")


def test_encoder_models_work_too(minilm_dir):
    """A BERT encoder (packaged MiniLM) with every pooling, ata included (bidirectional attention)."""
    texts = TEXTS[:3]
    for pooling in ("eos", "mean", "ata"):
        emb = Embedder.from_settings(
            ModelSettings(
                name="packaged:all-minilm-l6-v2", pooling=pooling, lora={"enabled": False}
            ),
            "cpu",
        )
        assert not emb.is_decoder
        with torch.inference_mode():
            v = emb(emb.tokenize(texts))
            alone = emb(emb.tokenize(texts[1:2]))
        assert v.shape == (3, 384)
        assert torch.allclose(_normed(v[1:2]), _normed(alone), atol=1e-5)
