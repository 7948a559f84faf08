"""Autoencoders: the frozen wrapper the diffusion model uses, its loaders, and the stage-1 KL model + loss."""

from ldm.autoencoder.frozen import DiffusersAutoencoderAdaptor, FrozenAutoencoder, weights_sha256
from ldm.autoencoder.kl import DiagonalGaussian, KLAutoencoder
from ldm.autoencoder.loaders import (
    SHIPPED_AUTOENCODER,
    kl_autoencoder_from_checkpoint,
    latent_stats,
    load_diffusers_autoencoder,
    load_kl_autoencoder,
    save_kl_autoencoder,
)
from ldm.autoencoder.loss import KLAutoencoderLoss, psnr

__all__ = [
    "SHIPPED_AUTOENCODER",
    "DiagonalGaussian",
    "DiffusersAutoencoderAdaptor",
    "FrozenAutoencoder",
    "KLAutoencoder",
    "KLAutoencoderLoss",
    "kl_autoencoder_from_checkpoint",
    "latent_stats",
    "load_diffusers_autoencoder",
    "load_kl_autoencoder",
    "psnr",
    "save_kl_autoencoder",
    "weights_sha256",
]
