"""The frozen autoencoder the diffusion model sees (Rombach et al. 2022, sec. 3 and 4.3.2).

The diffusion model works on rescaled latents z = (mode(q(z|x)) - shift) * scale, with scale = 1 / std of
the unscaled latents so that z has roughly unit variance ("Rombach rescaling"); shift is 0 for SD-style
VAEs and the latent mean for SD3/Flux-style ones. The wrapper is always in eval mode, has no trainable
parameters and never builds a graph, so it can sit inside a LightningModule without entering the
optimizer or being switched to train mode by ``.train()``.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["DiffusersAutoencoderAdaptor", "FrozenAutoencoder", "weights_sha256"]


def weights_sha256(module: nn.Module) -> str:
    """SHA-256 over the state dict (sorted names, dtypes, shapes, raw bytes): identifies the weights
    independently of the file format they were stored in."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class DiffusersAutoencoderAdaptor(nn.Module):
    """Gives a diffusers ``AutoencoderKL`` the encode(x) -> posterior / decode(z) -> Tensor interface."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def encode(self, x: Tensor) -> Any:
        """x (B, 3, H, W) -> diffusers DiagonalGaussianDistribution (has .mode(), .sample())."""
        return self.vae.encode(x).latent_dist

    def decode(self, z: Tensor) -> Tensor:
        """z (B, C, h, w) -> image (B, 3, H, W)."""
        return self.vae.decode(z).sample


class FrozenAutoencoder(nn.Module):
    """Frozen encoder/decoder with the latent scale/shift: encode gives diffusion-space latents."""

    def __init__(
        self,
        model: nn.Module,
        *,
        scale_factor: float,
        shift_factor: float = 0.0,
        latent_channels: int,
        downsample_factor: int,
        identity: dict,
    ) -> None:
        super().__init__()
        for method in ("encode", "decode"):
            if not callable(getattr(model, method, None)):
                raise TypeError(
                    f"{type(model).__name__} has no {method}(); wrap diffusers models in "
                    f"DiffusersAutoencoderAdaptor"
                )
        missing = {"name", "sha256"} - set(identity)
        if missing:
            raise ValueError(f"identity needs keys 'name' and 'sha256' (missing {sorted(missing)})")
        if scale_factor <= 0:
            raise ValueError(f"scale_factor={scale_factor} must be > 0; compute it with latent_stats()")
        self.model = model
        self.scale_factor = float(scale_factor)
        self.shift_factor = float(shift_factor)
        self.latent_channels = int(latent_channels)
        self.downsample_factor = int(downsample_factor)
        self._name = str(identity["name"])
        self._sha256 = str(identity["sha256"])
        self.model.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenAutoencoder:
        """Ignores ``mode``: the autoencoder stays in eval mode (dropout off, norms frozen)."""
        return super().train(False)

    @property
    def identity(self) -> dict:
        """What produced a latent: stored beside latent shards and checked when they are read back."""
        return {
            "name": self._name,
            "sha256": self._sha256,
            "scale_factor": self.scale_factor,
            "shift_factor": self.shift_factor,
            "latent_channels": self.latent_channels,
            "downsample_factor": self.downsample_factor,
        }

    @torch.no_grad()
    def encode_unscaled(self, x: Tensor) -> Tensor:
        """x (B, 3, H, W) in [-1, 1] -> posterior mode (B, C, H/f, W/f), before scale/shift."""
        return self.model.encode(x).mode()

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """x (B, 3, H, W) in [-1, 1] -> z = (mode - shift) * scale  # (B, C, H/f, W/f)."""
        return (self.encode_unscaled(x) - self.shift_factor) * self.scale_factor

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """z (B, C, h, w) in diffusion space -> image (B, 3, h * f, w * f), ~[-1, 1]."""
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(
                f"expected latents (B, {self.latent_channels}, h, w), got {tuple(z.shape)}; the net's "
                "out_channels must equal the autoencoder's latent_channels"
            )
        return self.model.decode(z / self.scale_factor + self.shift_factor)

    def extra_repr(self) -> str:
        return (
            f"name={self._name!r}, scale={self.scale_factor:.5g}, shift={self.shift_factor:.5g}, "
            f"latent_channels={self.latent_channels}, f={self.downsample_factor}"
        )
