"""Per-channel latent normalisation: the diffusion model sees x = (z - mean) / std, channel by channel.

Rombach rescaling (``FrozenAutoencoder``) divides every channel by one number, so a latent space whose
channels differ in mean and spread reaches the diffusion model far from N(0, I): the shipped emoji
autoencoder's scaled latents have channel means 1.28, 0.05, 0.73, -0.25 and stds 0.59, 0.37, 0.41, 1.39. A
forward process that starts from such data puts its noise levels in the wrong place per channel, and sampling
starts from a standard normal prior the data never reached. Normalising each channel by the training set's
statistics (as diffusers' ``latents_mean`` / ``latents_std`` do for some VAEs) fixes both.

The statistics live in buffers, so checkpoints carry them and sampling undoes them before decoding; an
identity norm (mean 0, std 1) is exact (no rounding) and is what checkpoints without the buffers load as.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["LatentNorm", "latent_norm_from_stats"]


class LatentNorm(nn.Module):
    """x = (z - mean) / std per channel; ``denormalize`` inverts it. Identity until ``set_stats``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels, dtype=torch.float64))
        self.register_buffer("std", torch.ones(channels, dtype=torch.float64))

    @property
    def is_identity(self) -> bool:
        return bool((self.mean == 0).all() and (self.std == 1).all())

    def set_stats(self, mean: Sequence[float], std: Sequence[float]) -> None:
        channels = self.mean.numel()
        if len(mean) != channels or len(std) != channels:
            raise ValueError(
                f"latent_norm needs {channels} means and stds (one per latent channel), got {len(mean)} and "
                f"{len(std)}: give model.latent_norm={{mean: [...], std: [...]}} with {channels} values each"
            )
        if not all(float(s) > 0 for s in std):
            raise ValueError(f"latent_norm std must be > 0 per channel, got {list(std)}")
        self.mean.copy_(torch.tensor([float(m) for m in mean], dtype=torch.float64))
        self.std.copy_(torch.tensor([float(s) for s in std], dtype=torch.float64))

    def _shaped(self, z: Tensor) -> tuple[Tensor, Tensor]:
        shape = (1, -1) + (1,) * (z.ndim - 2)  # (1, C, 1, 1)
        dtype = z.dtype if z.is_floating_point() else torch.float32
        return self.mean.to(z.device, dtype).view(shape), self.std.to(z.device, dtype).view(shape)

    def normalize(self, z: Tensor) -> Tensor:
        """(B, C, h, w) scaled latents -> diffusion-space latents (the identity norm returns z exactly)."""
        mean, std = self._shaped(z)
        return (z - mean) / std

    def denormalize(self, x: Tensor) -> Tensor:
        """(B, C, h, w) diffusion-space latents -> scaled latents the autoencoder decodes."""
        mean, std = self._shaped(x)
        return x * std + mean

    def extra_repr(self) -> str:
        if self.is_identity:
            return "identity"
        return f"mean={[round(float(m), 4) for m in self.mean]}, std={[round(float(s), 4) for s in self.std]}"


def latent_norm_from_stats(spec: Any, index_meta: Mapping[str, Any] | None) -> tuple[list, list] | None:
    """(mean, std) for ``model.latent_norm``: none -> None; per_channel -> the training shards' channel stats
    (written by ``prepare.py latents``); {mean, std} -> those values."""
    if spec is None or spec == "none":
        return None
    if isinstance(spec, Mapping):
        if set(spec) != {"mean", "std"}:
            raise ValueError(
                f"model.latent_norm as a mapping needs exactly the keys mean and std, got {sorted(spec)}"
            )
        return list(spec["mean"]), list(spec["std"])
    if spec != "per_channel":
        raise ValueError(f"model.latent_norm={spec!r}: use none, per_channel or {{mean: [...], std: [...]}}")
    stats = (index_meta or {}).get("latent_stats") or {}
    if "channel_mean" not in stats or "channel_std" not in stats:
        raise ValueError(
            "model.latent_norm=per_channel takes the channel statistics from the latent shards' index, and "
            "the training data has none: encode with `python prepare.py latents ...` or give "
            "model.latent_norm={mean: [...], std: [...]} (or model.latent_norm=none)"
        )
    return list(stats["channel_mean"]), list(stats["channel_std"])
