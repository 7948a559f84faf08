"""A tiny random Stable Diffusion 1.x-shaped pipeline (UNet, AutoencoderKL, CLIP text encoder + a byte-level
CLIP tokenizer built from its alphabet, no hub) saved to a directory, and the overrides that make
``experiment=finetune_sd`` describe it."""

from __future__ import annotations

from pathlib import Path

import torch

TOKENS = 16  # the tokenizer's model_max_length = the text encoder's positions = conditioner.max_length
UNET = dict(
    sample_size=8,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
)
NET_OVERRIDES = [  # net=unet_sd resized to UNET
    "net.model_channels=32",
    "net.channel_mult=[1,2]",
    "net.num_res_blocks=1",
    "net.attention_resolutions=[1]",
    "net.num_heads=4",
    "net.context_dim=32",
    "net.norm_groups=8",
    "net.gradient_checkpointing=false",
]
SCHEDULER = dict(  # Stable Diffusion 1.x's training schedule
    num_train_timesteps=1000,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    steps_offset=1,
    clip_sample=False,
    set_alpha_to_one=True,
)


def jitter(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random offsets on every parameter (zero-initialised convs included) so every tensor matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def tiny_clip_tokenizer():
    """A CLIP BPE tokenizer over the byte-level alphabet (no merges: one token per character)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars + [c + "</w>" for c in chars]:
        vocab[c] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TOKENS)


def save_tiny_sd_pipeline(path: Path, prediction_type: str = "epsilon") -> Path:
    """A random StableDiffusionPipeline (16x16 images, 8x8x4 latents, 32-d CLIP context) saved to ``path``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = jitter(UNet2DConditionModel(**UNET), seed=1)
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=16,
    ).eval()
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=514,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=TOKENS,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    ).eval()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tiny_clip_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler(**SCHEDULER, prediction_type=prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def finetune_overrides(pipeline: Path, *extra: str) -> list[str]:
    """``experiment=finetune_sd`` on the tiny pipeline, CPU-sized."""
    return [
        "experiment=finetune_sd",
        f"paths.pretrained_pipeline={pipeline}",
        *NET_OVERRIDES,
        f"conditioner.max_length={TOKENS}",
        "image_size=16",
        "trainer=cpu",
        *extra,
    ]
