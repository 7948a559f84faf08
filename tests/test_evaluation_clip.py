"""CLIP score through the real loading path (CLIPModel + CLIPProcessor from a directory) on a tiny random
CLIP."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from ldm.evaluation import ClipScorer


def save_tiny_clip(root: Path) -> Path:
    """A randomly initialised CLIP (text 32-d, vision 32-d on 32 px, projection 16) + its processor, saved."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for s in sorted(ByteLevel.alphabet()):
            vocab[s + suffix] = len(vocab)
    merges = [("r", "e"), ("re", "d</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(root)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


def test_clip_score_is_100_times_clipped_cosine(tiny_clip: Path) -> None:
    scorer = ClipScorer(str(tiny_clip))
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 40, 40, generator=g)
    prompts = ["red apple", "blue heart", "a very long caption " * 30, "fire"]  # > 77 tokens: truncated
    scores = scorer(images, prompts)
    assert scores.shape == (4,) and ((scores >= 0) & (scores <= 100)).all()
    # the same numbers by hand, from the saved files
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    processor = CLIPProcessor.from_pretrained(tiny_clip)
    pixels = [(im.permute(1, 2, 0) * 255 + 0.5).floor().byte().numpy() for im in images]
    inputs = processor(
        text=prompts, images=pixels, return_tensors="pt", padding=True, truncation=True, max_length=77
    )
    with torch.no_grad():
        out = model(**inputs)
    cos = F.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
    assert torch.allclose(scores, 100 * cos.clamp(min=0), atol=1e-4)
    # a prompt paired with its own image scores the same whatever the batch around it
    assert torch.allclose(scorer(images[:1], prompts[:1]), scores[:1], atol=1e-4)


def test_clip_errors(tiny_clip: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one prompt per image"):
        ClipScorer(str(tiny_clip))(torch.rand(2, 3, 32, 32), ["x"])
    with pytest.raises(OSError, match="clip_model=.* does not load .*clip_model=null"):
        ClipScorer(str(tmp_path / "nowhere"))
