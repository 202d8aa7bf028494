"""The LLM2Vec backbone on the real packaged SmolLM2: bidirectional attention in every layer and
kernel, ATA over all real query rows, the llm2vec input format and its pool span, and an init
adapter merged before the trainable LoRA."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from harness.config import ModelSettings, TemplateSpec
from harness.embedder import Embedder
from harness.models import ModelLoadError, apply_lora, load_backbone
from harness.templates import E5, INST, TemplateError, chat_user_turn, resolve_template

KERNELS = ["sdpa", "eager"] + (
    ["flash_attention_2"] if importlib.util.find_spec("flash_attn") else []
)
TEXTS = [
    "A man is playing a guitar on the street.",
    "Hi",
    "The committee, after a long debate, approved the new budget. Critics were not convinced.",
    "What is the boiling point of water at high altitude?",
]
INSTRUCTION = "Retrieve semantically similar text"
# Mistral-7B-Instruct-v0.2's chat template (tokenizer_config.json), copied to test the [INST] route
MISTRAL_CHAT = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% endif %}{% endfor %}"
)


def _settings(**kw) -> ModelSettings:
    return ModelSettings(**{"lora": {"enabled": False}, "dtype": "float32", **kw})


def _first_token_states(model, tokenizer, texts: list[str]) -> torch.Tensor:
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    positions = (enc["attention_mask"].cumsum(1) - 1).clamp_min(0)
    with torch.inference_mode():
        hidden = model(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], position_ids=positions
        ).last_hidden_state
    first = enc["attention_mask"].argmax(dim=1)  # left padding: the first real token
    return hidden[torch.arange(len(texts)), first]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_the_first_token_sees_the_last_word_only_when_bidirectional(smollm2_dir, kernel, attention):
    backbone = load_backbone(
        _settings(attention=attention, attn_implementation=kernel), torch.device("cpu")
    )
    # the same length in tokens, so the batch has no padding and sdpa may skip the mask
    states = _first_token_states(
        backbone.model, backbone.tokenizer, ["The cat sat on the mat.", "The cat sat on the rug."]
    )
    diff = float((states[0] - states[1]).abs().max())
    if attention == "causal":
        assert diff == 0.0
    else:
        assert diff > 1e-3, f"{kernel}: the first token's state does not depend on the last word"
    assert backbone.bidirectional == (attention == "bidirectional")


def test_bidirectional_with_padding_matches_each_text_alone(smollm2_dir):
    """Padding tokens are never attended to: a padded batch gives every text's states alone."""
    backbone = load_backbone(
        _settings(attention="bidirectional", padding_side="left"), torch.device("cpu")
    )
    tok = backbone.tokenizer
    batch = _first_token_states(backbone.model, tok, TEXTS)
    alone = torch.cat([_first_token_states(backbone.model, tok, [t]) for t in TEXTS])
    assert torch.allclose(batch, alone, atol=1e-4)


def test_an_encoder_cannot_be_made_causal(minilm_dir):
    with pytest.raises(ModelLoadError, match="needs a decoder"):
        load_backbone(
            ModelSettings(name="packaged:all-minilm-l6-v2", attention="causal"), torch.device("cpu")
        )


@pytest.fixture(scope="module")
def bidi_models(smollm2_dir):
    return {
        (pooling, side, kernel): Embedder.from_settings(
            _settings(
                pooling=pooling,
                padding_side=side,
                attention="bidirectional",
                template="llm2vec",
                attn_implementation=kernel,
            ),
            "cpu",
        )
        for pooling in ("eos", "mean", "ata")
        for side in ("left", "right")
        for kernel in ("eager", "sdpa")
    }


# eager is exact here (0.0); torch's CPU sdpa kernel sums a long, mostly masked row in another order
# than a short one, and SmolLM2's first-token activations (an attention sink) carry that rounding
# to ~2e-5 after 30 layers, so sdpa gets a looser bound (the causal sdpa path stays within 1e-5).
TOLERANCE = {"eager": 1e-5, "sdpa": 5e-5}


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
@pytest.mark.parametrize("pooling", ["eos", "mean", "ata"])
@pytest.mark.parametrize("instruction", [None, INSTRUCTION])
def test_bidirectional_vectors_do_not_depend_on_padding_or_batch(
    bidi_models, pooling, instruction, kernel
):
    left, right = bidi_models[(pooling, "left", kernel)], bidi_models[(pooling, "right", kernel)]
    atol = TOLERANCE[kernel]
    texts = [*(TEXTS * 16)[:63], "A short one."]
    with torch.inference_mode():
        v_left = F.normalize(left(left.tokenize(texts, instruction)), dim=-1)
        v_right = F.normalize(right(right.tokenize(texts, instruction)), dim=-1)
        alone = F.normalize(
            torch.cat([left(left.tokenize([t], instruction)) for t in TEXTS]), dim=-1
        )
        last = F.normalize(left(left.tokenize(texts[-1:], instruction)), dim=-1)
    assert torch.allclose(v_left, v_right, atol=atol)
    assert torch.allclose(v_left[: len(TEXTS)], alone, atol=atol)
    assert torch.allclose(v_left[-1:], last, atol=atol)


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_ata_received_attention_sums_every_real_query_row(smollm2_dir, attention):
    """The captured received attention equals the eager kernel's own last-layer probabilities summed
    over heads and real query rows: rows i >= j when causal, all rows when bidirectional."""
    emb = Embedder.from_settings(
        _settings(pooling="ata", attention=attention, attn_implementation="eager"), "cpu"
    )
    batch = emb.tokenize(TEXTS, INSTRUCTION)
    with torch.inference_mode():
        emb(batch)
        received = emb._capture.received.clone()
        out = emb.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            output_attentions=True,
        )
    probs = out.attentions[-1]  # (B, H, L, L), from the real kernel with the model's own mask
    real = batch.attention_mask.bool()
    expected = (probs * real[:, None, :, None]).sum(dim=(1, 2)) * real
    assert torch.allclose(received * real, expected, atol=1e-4)
    # what makes the two modes differ: under causal attention the last real token is read only by itself
    last = (
        batch.attention_mask.shape[1] - 1
    )  # left padding: the last column is every row's last token
    heads = probs.shape[1]
    if attention == "causal":
        assert torch.allclose(received[:, last], probs[:, :, last, last].sum(1), atol=1e-4)
        assert float(received[:, last].max()) <= heads + 1e-4
    else:
        assert float(received[:, last].min()) < heads  # read by many rows, each a share < 1


def test_llm2vec_template_on_a_chatml_model_pools_text_and_closing(smollm2_dir):
    emb = Embedder.from_settings(_settings(pooling="mean", template="llm2vec"), "cpu")
    assert emb.template.instructed == "<|im_start|>user\n{instruction}; {text}<|im_end|>"
    enc = emb.tokenize_one("The cat sat.", INSTRUCTION, 64)
    tokens = emb.tokenizer.convert_ids_to_tokens(enc.ids)
    pooled = [t for t, p in zip(tokens, enc.pooled) if p]
    assert tokens[0] == "<|im_start|>" and "Ret" in tokens[:6]
    assert pooled == ["ĠThe", "Ġcat", "Ġsat", ".", "<|im_end|>"], pooled  # the text and the closing
    doc = emb.tokenize_one("The cat sat.", None, 64)
    doc_pooled = [t for t, p in zip(emb.tokenizer.convert_ids_to_tokens(doc.ids), doc.pooled) if p]
    assert doc_pooled == ["The", "Ġcat", "Ġsat", ".", "<|im_end|>"], (
        "documents skip the opening too"
    )


def test_llm2vec_template_on_an_inst_model_is_llm2vecs_format(smollm2_dir):
    backbone = load_backbone(_settings(), torch.device("cpu"))
    tok = backbone.tokenizer
    tok.chat_template = MISTRAL_CHAT
    assert resolve_template("llm2vec", tok) == INST
    text, start = INST.render("The cat sat.", INSTRUCTION)
    assert text == f"[INST] {INSTRUCTION}; The cat sat. [/INST]"
    assert text[start:] == "The cat sat. [/INST]"
    assert INST.render("Doc.", None) == ("[INST] Doc. [/INST]", len("[INST] "))


def test_templates_e5_custom_and_errors(smollm2_dir):
    assert E5.render("q?", "Find it") == (
        "Instruct: Find it\nQuery: q?",
        len("Instruct: Find it\nQuery: "),
    )
    assert E5.render("d.", None) == ("d.", 0)
    custom = ModelSettings(template="<{instruction}> {text} </>").template
    assert isinstance(custom, TemplateSpec) and custom.plain == "{text}"
    with pytest.raises(ValueError, match="template"):
        ModelSettings(template="no placeholders here")
    with pytest.raises(ValueError, match="must come before"):
        ModelSettings(template={"instructed": "{text} {instruction}"})

    class NoChat:
        chat_template = None

    with pytest.raises(TemplateError, match="needs a chat template"):
        chat_user_turn(NoChat())


def test_old_saved_settings_with_query_template_still_load():
    old = ModelSettings.model_validate({"query_template": "Task: {instruction}\nQ: {query}"})
    assert old.template == TemplateSpec(instructed="Task: {instruction}\nQ: {text}")
    assert (
        ModelSettings.model_validate(
            {"query_template": "Instruct: {instruction}\nQuery: {query}"}
        ).template
        == "e5"
    )


def test_init_adapter_is_merged_before_the_trainable_lora(smollm2_dir, tmp_path):
    from harness.init_adapter import read_adapter

    settings = _settings(pooling="mean", lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0})
    backbone = load_backbone(settings, torch.device("cpu"))
    torch.manual_seed(0)
    peft = apply_lora(backbone.model, settings.lora)
    for name, p in peft.named_parameters():
        if "lora_B" in name:  # a non-trivial adapter (lora_B starts at zero)
            torch.nn.init.normal_(p, std=0.02)
    peft.save_pretrained(tmp_path / "init")
    sha = read_adapter(tmp_path / "init").sha256
    with torch.inference_mode():
        expected = F.normalize(
            Embedder(
                type(backbone)(
                    peft.merge_and_unload(), backbone.tokenizer, True, backbone.path, False
                ),
                settings,
                torch.device("cpu"),
            ).encode(TEXTS),
            dim=-1,
        )
        base = F.normalize(Embedder.from_settings(settings, "cpu").encode(TEXTS), dim=-1)
    emb = Embedder.from_settings(
        settings.model_copy(
            update={"init_adapter": str(tmp_path / "init"), "init_adapter_sha256": sha}
        ),
        "cpu",
        lora=True,
    )
    trainable = {n for n, p in emb.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable), "only the new LoRA trains"
    with torch.inference_mode():
        got = F.normalize(
            emb.encode(TEXTS), dim=-1
        )  # the new LoRA starts at zero: merged base only
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, base, atol=1e-3), "the init adapter changed nothing"
    # saved with the model: it reloads without the original folder
    emb.save(tmp_path / "model")
    (tmp_path / "init" / "adapter_model.safetensors").unlink()
    with torch.inference_mode():
        again = F.normalize(Embedder.load(tmp_path / "model", "cpu").encode(TEXTS), dim=-1)
    assert torch.allclose(again, expected, atol=1e-5)


def test_a_changed_init_adapter_is_refused(smollm2_dir, tmp_path):
    settings = _settings(lora={"enabled": True, "r": 2, "alpha": 4, "dropout": 0.0})
    apply_lora(load_backbone(settings, torch.device("cpu")).model, settings.lora).save_pretrained(
        tmp_path / "a"
    )
    with pytest.raises(ModelLoadError, match="is not the pinned"):
        load_backbone(
            _settings(init_adapter=str(tmp_path / "a"), init_adapter_sha256="0" * 64),
            torch.device("cpu"),
        )


def test_a_missing_init_adapter_is_a_one_line_error(smollm2_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="init_adapter"):
        load_backbone(_settings(init_adapter=str(tmp_path / "nope")), torch.device("cpu"))


def test_a_long_text_is_cut_before_the_template_closing(smollm2_dir):
    template = {"instructed": "Q: {instruction} | {text} [END]", "plain": "D: {text} [END]"}
    emb = Embedder.from_settings(_settings(pooling="mean", template=template), "cpu")
    long = " ".join(TEXTS * 20)
    for instruction in (None, INSTRUCTION):
        enc = emb.tokenize_one(long, instruction, 40)
        decoded = emb.tokenizer.decode(enc.ids)
        assert len(enc.ids) <= 40 and decoded.endswith(" [END]<|im_end|>"), decoded
        assert (
            all(enc.pooled[-4:]) and sum(enc.pooled) > 20
        )  # the closing and the text's head are pooled
    e5 = Embedder.from_settings(_settings(pooling="mean"), "cpu")
    plain = e5.tokenize_one(long, INSTRUCTION, 40)
    assert len(plain.ids) == 40 and plain.ids[-1] == e5.tokenizer.eos_token_id
