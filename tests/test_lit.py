"""The Lightning glue: conditioning from precomputed embeddings equals the live encoder, EMA maths, frozen
parts."""

from __future__ import annotations

import pytest
import torch

from ldm.autoencoder.kl import KLAutoencoder
from ldm.autoencoder.loaders import load_kl_autoencoder, save_kl_autoencoder
from ldm.conditioning.text import TextConditioner
from ldm.data.shard_dataset import pad_embeddings
from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.loss import DiffusionLoss
from ldm.diffusion.schedules import DiscreteSchedule
from ldm.lit.ema import EMA
from ldm.lit.latent_diffusion import LatentDiffusion
from ldm.nets.unet import UNet

CAPTIONS = [
    "red apple",
    "woman detective: medium-dark skin tone",
    "blue heart",
    "family: man, woman, girl, boy",
]


@pytest.fixture(scope="module")
def text() -> TextConditioner:
    return TextConditioner(max_length=32, dropout_prob=0.5)


@pytest.fixture(scope="module")
def module(text: TextConditioner, tmp_path_factory: pytest.TempPathFactory) -> LatentDiffusion:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ae") / "ae"
    save_kl_autoencoder(
        KLAutoencoder(base_channels=8, norm_groups=8, mid_attention=False), str(path), scale_factor=0.5
    )
    net = UNet(
        model_channels=32, channel_mult=(1, 2), attention_resolutions=(1, 2), num_heads=2, norm_groups=8
    )
    for p in (
        net.parameters()
    ):  # leave the zero-initialised output layers non-zero so outputs depend on the context
        torch.nn.init.normal_(p, std=0.05)
    schedule = DiscreteSchedule(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    return LatentDiffusion(
        Denoiser(net, schedule),
        DiffusionLoss(schedule),
        text,
        optimizer=torch.optim.AdamW,
        autoencoder=load_kl_autoencoder(str(path) + ".safetensors"),
    )


def test_precomputed_embeddings_equal_the_live_encoder(
    module: LatentDiffusion, text: TextConditioner
) -> None:
    live = module.conditioning({"txt": CAPTIONS}, generator=None)
    stored = [torch.from_numpy(e.astype("float32")) for e in text.token_embeddings(CAPTIONS)]  # fp16 on disk
    context, mask = pad_embeddings(stored)  # padded only to the longest caption in the batch
    assert context.shape[1] < live["context"].shape[1]
    pre = module.conditioning({"txt": CAPTIONS, "context": context, "context_mask": mask}, generator=None)
    x, t = torch.randn(4, 4, 8, 8), torch.tensor([10.0, 200.0, 500.0, 900.0])
    out_live = module.net(x, t, **live)
    out_pre = module.net(x, t, **pre)
    torch.testing.assert_close(out_pre, out_live, rtol=2e-3, atol=2e-3)
    other = module.net(x, t, **module.conditioning({"txt": CAPTIONS[::-1]}, generator=None))
    assert (other - out_live).abs().max() > 1e-2  # the context matters, so the comparison above can fail


def test_caption_dropout_on_precomputed_embeddings_gives_the_null_caption(
    module: LatentDiffusion, text: TextConditioner
) -> None:
    stored = [torch.from_numpy(e.astype("float32")) for e in text.token_embeddings(CAPTIONS * 8)]
    context, mask = pad_embeddings(stored)
    g = torch.Generator().manual_seed(3)
    out = module.conditioning({"txt": CAPTIONS * 8, "context": context, "context_mask": mask}, generator=g)
    null = text([""])
    n0 = int(null["context_mask"].sum())
    dropped = [
        i
        for i in range(32)
        if int(out["context_mask"][i].sum()) == n0
        and torch.allclose(out["context"][i, :n0], null["context"][0, :n0])
    ]
    assert 8 <= len(dropped) <= 24  # p = 0.5 of 32
    kept = [i for i in range(32) if i not in dropped]
    for i in kept:
        torch.testing.assert_close(out["context"][i, : context.shape[1]], context[i])
    # the same generator seed drops the same rows as the live-caption path would
    live_drop = text.drop(CAPTIONS * 8, generator=torch.Generator().manual_seed(3))
    assert sorted(i for i, c in enumerate(live_drop) if c == "") == dropped


def test_only_the_denoiser_is_optimised(module: LatentDiffusion) -> None:
    trainable = {id(p) for p in module.trainable_parameters()}
    assert trainable == {id(p) for p in module.net.parameters()}
    assert not any(p.requires_grad for p in module.autoencoder.parameters())
    assert not any(p.requires_grad for p in module.conditioner.parameters())
    module.train()
    assert not module.autoencoder.training and not module.conditioner.training


def test_channel_check_on_latents(module: LatentDiffusion) -> None:
    with pytest.raises(ValueError, match="latents have 3 channels but the network takes 4"):
        module.latents({"latent": torch.zeros(1, 3, 8, 8)})


def test_ema_update_follows_the_warmup_formula() -> None:
    class Holder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(2, 2)

    holder = Holder()
    ema = EMA(decay=0.9)
    ema.shadow = {k: v.clone() for k, v in holder.net.state_dict().items()}
    trainer = type("T", (), {"global_step": 1, "accumulate_grad_batches": 1})()
    expected = holder.net.weight.detach().clone()
    for n in range(1, 6):
        with torch.no_grad():
            holder.net.weight.add_(1.0)
        ema.on_train_batch_end(trainer, holder, None, None, 0)
        decay = min(0.9, (1 + n) / (10 + n))
        expected = decay * expected + (1 - decay) * holder.net.weight.detach()
    torch.testing.assert_close(ema.shadow["weight"], expected)
