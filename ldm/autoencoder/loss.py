"""Stage-1 objective for the KL autoencoder (Rombach et al. 2022, sec. 3 and appendix G).

The paper trains with a pixel loss + LPIPS perceptual loss + a patch-GAN loss + a tiny KL term. LPIPS and
the GAN discriminator's feature network need pretrained weights that cannot be downloaded here (no hub,
offline machine), so this loss keeps only the pixel and KL terms:

    L = rec + kl_weight * KL / (C * H * W)

where rec is the per-element mean L1 (or L2) distance and KL is the per-image KL of q(z|x) to N(0, I)
summed over the latent's C, h, w and averaged over the batch. Rombach et al. sum the pixel loss over the
image instead of averaging it; dividing their whole objective by C * H * W gives the formula above, so
``kl_weight`` keeps the paper's meaning (1e-6) while ``rec`` stays a readable per-pixel number.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ldm.autoencoder.kl import DiagonalGaussian

__all__ = ["KLAutoencoderLoss", "psnr"]

_PIXEL_LOSSES = ("l1", "l2")


def psnr(x: Tensor, y: Tensor, data_range: float = 2.0) -> Tensor:
    """Peak signal-to-noise ratio per image, 10 log10(range^2 / MSE)  # (B,).

    ``data_range`` is 2.0 for images in [-1, 1]. The MSE is clamped at 1e-12 so identical images give a
    large finite value (~126 dB at range 2) instead of inf.
    """
    if x.shape != y.shape:
        raise ValueError(f"psnr needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(dim=1).clamp_min(1e-12)  # (B,)
    return 10.0 * torch.log10(data_range**2 / mse)


class KLAutoencoderLoss:
    """Pixel reconstruction + KL regulariser; returns (loss, logs) with detached logs rec/kl/psnr/loss."""

    def __init__(self, kl_weight: float = 1e-6, pixel_loss: str = "l1") -> None:
        if pixel_loss not in _PIXEL_LOSSES:
            raise ValueError(f"pixel_loss={pixel_loss!r} is unknown; use one of {_PIXEL_LOSSES}")
        if kl_weight < 0:
            raise ValueError(f"kl_weight={kl_weight} must be >= 0")
        self.kl_weight = float(kl_weight)
        self.pixel_loss = pixel_loss

    def __call__(
        self, x: Tensor, recon: Tensor, posterior: DiagonalGaussian
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if x.shape != recon.shape:
            raise ValueError(f"x {tuple(x.shape)} and recon {tuple(recon.shape)} must have one shape")
        diff = recon - x  # (B, C, H, W)
        rec = diff.abs().mean() if self.pixel_loss == "l1" else diff.pow(2).mean()  # per-element mean
        kl = posterior.kl().mean()  # (B,) -> scalar, nats per image
        numel_per_image = x[0].numel()  # C * H * W
        loss = rec + self.kl_weight * kl / numel_per_image
        logs = {
            "loss": loss.detach(),
            "rec": rec.detach(),
            "kl": kl.detach(),
            "psnr": psnr(x.detach(), recon.detach()).mean(),
        }
        return loss, logs
