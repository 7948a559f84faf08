"""The conditional latent-diffusion objective (Rombach et al. 2022, eq. 2).

L = E_{x0, c, t ~ U{0..T-1}, eps ~ N(0, I)} || target - net(x_t, t, c) ||^2 with
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (Ho et al. 2020, eq. 4) and target
eps (Ho et al. 2020, eq. 14, "L_simple") or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho 2022, Sec. 4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.diffusion.denoiser import append_dims, check_prediction
from ldm.diffusion.schedules import DiscreteSchedule


class DiffusionLoss:
    """Draws (t, eps), noises x0 at t and returns the MSE of the net's eps or v prediction."""

    def __init__(self, schedule: DiscreteSchedule, prediction: str = "eps") -> None:
        self.schedule = schedule
        self.prediction = check_prediction(prediction)

    def __repr__(self) -> str:
        return f"DiffusionLoss(schedule={self.schedule!r}, prediction={self.prediction!r})"

    def _coefficients(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """sqrt(abar_t), sqrt(1 - abar_t) as (B, 1, ..., 1) in x0's dtype and device."""
        abar = self.schedule.alphas_cumprod.to(x0.device)[t.to(x0.device)]  # (B,) float64
        sqrt_abar = append_dims(abar.sqrt(), x0.ndim).to(x0.dtype)  # (B, 1, ..., 1)
        sqrt_one_minus = append_dims((1.0 - abar).sqrt(), x0.ndim).to(x0.dtype)  # (B, 1, ..., 1)
        return sqrt_abar, sqrt_one_minus

    def q_sample(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (Ho et al. 2020, eq. 4). x0, eps (B, ...); t (B,) int."""
        sqrt_abar, sqrt_one_minus = self._coefficients(x0, t)
        return sqrt_abar * x0 + sqrt_one_minus * eps  # (B, ...)

    def target(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """The regression target: eps, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho 2022)."""
        if self.prediction == "eps":
            return eps
        sqrt_abar, sqrt_one_minus = self._coefficients(x0, t)
        return sqrt_abar * eps - sqrt_one_minus * x0  # (B, ...)

    def sample_t_eps(self, x0: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """t ~ U{0..T-1} (B,) int64 and eps ~ N(0, I) like x0, drawn on the generator's device then moved."""
        device = generator.device if generator is not None else x0.device
        t = torch.randint(0, self.schedule.num_timesteps, (x0.shape[0],), generator=generator, device=device)
        eps = torch.randn(x0.shape, generator=generator, device=device)
        return t.to(x0.device), eps.to(x0)

    def __call__(
        self,
        net: nn.Module,
        x0: Tensor,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """x0 (B, C, H, W) clean latents; context (B, L, D); context_mask (B, L). Returns the scalar loss."""
        t, eps = self.sample_t_eps(x0, generator)  # (B,), (B, C, H, W)
        x_t = self.q_sample(x0, t, eps)  # (B, C, H, W)
        pred = net(x_t, t.float(), context=context, context_mask=context_mask)  # (B, C, H, W)
        if pred.shape != x0.shape:
            raise ValueError(
                f"net output {tuple(pred.shape)} must match the latents {tuple(x0.shape)}; "
                "set the net's out_channels to the latent channels."
            )
        dtype = torch.promote_types(pred.dtype, torch.float32)  # fp16/bf16 nets: reduce in float32
        return F.mse_loss(pred.to(dtype), self.target(x0, t, eps).to(dtype))
