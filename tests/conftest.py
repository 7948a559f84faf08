"""Shared fixtures: a tiny emoji dataset in image and latent shards, made by a tiny stage-1 autoencoder.

Everything is built once per test session under a temporary directory; tests that train use the tiny configs
(``net=unet_tiny``) so the whole suite stays within minutes on two CPU cores.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """120 emoji -> image shards (train 3 shards, val 1) -> latent shards by a random tiny KL autoencoder."""
    from ldm.autoencoder.kl import KLAutoencoder
    from ldm.autoencoder.loaders import load_kl_autoencoder, save_kl_autoencoder
    from ldm.conditioning.text import TextConditioner
    from ldm.data.emoji import emoji_samples, is_validation_key
    from ldm.encode import encode_shards
    from prepare import split_samples

    root = tmp_path_factory.mktemp("tiny_data")
    counts = split_samples(emoji_samples(size=32, limit=120), str(root / "images"), 40, is_validation_key)
    torch.manual_seed(0)
    ae = KLAutoencoder(
        base_channels=8, channel_mult=(1, 2, 2), z_channels=4, norm_groups=8, mid_attention=False
    )
    save_kl_autoencoder(ae, str(root / "ae" / "tiny_ae"), scale_factor=1.0)
    frozen = load_kl_autoencoder(str(root / "ae" / "tiny_ae.safetensors"))
    text = TextConditioner(max_length=32, dropout_prob=0.0)
    # train latents carry the frozen MiniLM embeddings (the encoder is skipped in training); val latents do
    # not
    for prefix, last, encoder in (("train", 2, text), ("val", 0, None)):
        encode_shards(
            str(root / "images" / f"{prefix}-{{000000..{last:06d}}}.tar"),
            str(root / "latents"),
            prefix,
            frozen,
            image_size=32,
            batch_size=64,
            device="cpu",
            text=encoder,
        )
    return {
        "root": root,
        "images": root / "images",
        "latents": root / "latents",
        "ae": root / "ae" / "tiny_ae.safetensors",
        "counts": counts,
    }


def tiny_overrides(data: dict[str, Path], out_dir: Path, *extra: str) -> list[str]:
    """Hydra overrides for a seconds-long CPU run on the tiny dataset."""
    return [
        "net=unet_tiny",
        "autoencoder=kl",
        f"autoencoder.path={data['ae']}",
        f"data.train_shards='{data['latents']}/train-{{000000..000002}}.tar'",
        f"data.val_shards={data['latents']}/val-000000.tar",
        "data.batch_size=16",
        "trainer=cpu",
        "trainer.max_steps=6",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "logger=csv",
        "callbacks.sample_grid.every_n_steps=0",
        "callbacks.sample_grid.steps=4",
        "callbacks.sample_grid.prompts=[red apple,blue heart]",
        "callbacks.model_checkpoint.every_n_train_steps=3",
        "callbacks.throughput.window=2",
        "callbacks.sample_quality=null",  # FID only where a test asks for it
        f"paths.output_dir={out_dir}",
        f"paths.log_dir={out_dir.parent}",
        *extra,
    ]


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """last.ckpt of a 3-step tiny run (EMA, DDPM eps, unipc sample grid): a base for LoRA and image-to-image
    tests."""
    import train
    from ldm.config_utils import compose_config

    out = tmp_path_factory.mktemp("tiny_checkpoint") / "run"
    cfg = compose_config("train", tiny_overrides(tiny_data, out, "trainer.max_steps=3"))
    assert train.run(cfg)["global_step"] == 3
    return out / "checkpoints" / "last.ckpt"
