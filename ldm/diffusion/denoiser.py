"""Preconditioned denoiser D(x, sigma) -> x0 estimate around a network, for any schedule and parameterisation.

Convention of Karras et al. 2022 ("EDM", eq. 7) and k-diffusion: samplers hold the state x in the schedule's
own coordinates (``schedule.space``: "ve" x = x0 + sigma eps for discrete VP and EDM schedules; "flow" x =
(1 - t) x0 + t eps for rectified flow, where the sigma argument is t) and D returns the x0 estimate. The
schedule gives (a, alpha, s) with a * x = alpha * x0 + s * eps: the net sees x_in = a * x (for VP: exactly the
DDPM input x_t, a = c_in = 1/sqrt(sigma^2 + 1), EDM Table 1) and c_noise (the training timestep t(sigma) for
VP); ``ldm.diffusion.parameterization`` turns its output F into x0 (eps, v, x0, flow velocity or EDM's F).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ldm.diffusion.parameterization import PREDICTIONS, check_prediction, parameterization_for

__all__ = ["PREDICTIONS", "Denoiser", "append_dims", "check_prediction"]


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """(B,) -> (B, 1, ..., 1) with ``ndim`` dims in total, for broadcasting per-sample scalars."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


class Denoiser(nn.Module):
    """D(x, sigma, **cond) -> x0 estimate, wrapping ``net(x_in, c_noise, **cond)``.

    ``cond`` (``ldm.interfaces.COND_KEYS``: context, context_mask, vector, concat) passes through untouched:
    only the net reads it."""

    def __init__(self, net: nn.Module, schedule, prediction: str = "eps") -> None:
        super().__init__()
        self.net = net
        self.schedule = schedule
        self.parameterization = parameterization_for(prediction, schedule)
        self.prediction = prediction

    def _batch_sigma(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """Scalar or (B,) sigma -> (B,) tensor on x's device."""
        sigma = torch.as_tensor(sigma, device=x.device)
        if not sigma.is_floating_point():
            sigma = sigma.to(torch.float32)
        if sigma.ndim == 0:
            return sigma.expand(x.shape[0])
        if sigma.shape != (x.shape[0],):
            raise ValueError(
                f"sigma must be a scalar or shape ({x.shape[0]},) to match x {tuple(x.shape)}, "
                f"got {tuple(sigma.shape)}; pass one sigma per sample."
            )
        return sigma

    def _coefficients(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(a, alpha, s) as (B, 1, ..., 1) in x's dtype."""
        return tuple(append_dims(c, x.ndim).to(x.dtype) for c in self.schedule.coefficients(sigma))

    def forward(self, x: Tensor, sigma: Tensor, **cond: Tensor) -> Tensor:
        """x (B, ...) noisy sample in the schedule's coordinates; sigma scalar or (B,); cond the net's
        conditioning (e.g. context (B, L, D), context_mask (B, L)). Returns the x0 estimate (B, ...)."""
        sigma = self._batch_sigma(x, sigma)  # (B,)
        a, alpha, s = self._coefficients(x, sigma)  # (B, 1, ..., 1) each
        x_in = (x * a).to(x.dtype)  # (B, ...) what the net was trained on
        out = self.net(x_in, self.schedule.c_noise(sigma), **cond)
        if out.shape != x.shape:
            raise ValueError(
                f"net output {tuple(out.shape)} must match its input {tuple(x.shape)}; "
                "set the net's out_channels to the latent channels."
            )
        x0 = self.parameterization.to_x0(out.to(x.dtype), x_in, alpha, s, self.schedule.sigma_data)
        return x0.to(x.dtype)

    def prediction_from_x0(self, x: Tensor, sigma: Tensor, x0: Tensor) -> Tensor:
        """The net output that gives ``x0`` at (x, sigma): the model's own prediction space (guidance
        rescale)."""
        sigma = self._batch_sigma(x, sigma)
        a, alpha, s = self._coefficients(x, sigma)
        return self.parameterization.from_x0(x0, x * a, alpha, s, self.schedule.sigma_data)

    def x0_from_prediction(self, x: Tensor, sigma: Tensor, out: Tensor) -> Tensor:
        """Inverse of ``prediction_from_x0``."""
        sigma = self._batch_sigma(x, sigma)
        a, alpha, s = self._coefficients(x, sigma)
        return self.parameterization.to_x0(out, x * a, alpha, s, self.schedule.sigma_data)
