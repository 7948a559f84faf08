"""Preconditioned denoiser D(x; sigma) around a discrete-time eps- or v-prediction network.

Convention of Karras et al. 2022 ("EDM", eq. 7 and Table 1, "VP" column) and k-diffusion: the state is
x = x0 + sigma * eps (VE coordinates) and D returns the x0 estimate. The network itself is the usual DDPM network
trained on VP inputs x_t = sqrt(abar) x0 + sqrt(1 - abar) eps at integer t, so
    c_in = 1 / sqrt(sigma^2 + 1)   (x * c_in is exactly the VP x_t, since abar = 1 / (1 + sigma^2))
    c_noise = t(sigma)             (continuous timestep, ``DiscreteSchedule.sigma_to_t``)
and the output F is turned into x0 by the parameterisation:
    eps (Ho et al. 2020):           x0 = x - sigma * F
    v   (Salimans & Ho 2022, eq. in Sec. 4 / App. D):
                                    x0 = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) * F
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ldm.diffusion.schedules import DiscreteSchedule

PREDICTIONS = ("eps", "v")


def check_prediction(prediction: str) -> str:
    """Validate a parameterisation name ("eps" | "v")."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}.")
    return prediction


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """(B,) -> (B, 1, ..., 1) with ``ndim`` dims in total, for broadcasting per-sample scalars."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


class Denoiser(nn.Module):
    """D(x, sigma) -> x0 estimate, wrapping ``net(x_t, c_noise, context=..., context_mask=...)``."""

    def __init__(self, net: nn.Module, schedule: DiscreteSchedule, prediction: str = "eps") -> None:
        super().__init__()
        self.net = net
        self.schedule = schedule
        self.prediction = check_prediction(prediction)

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

    def forward(
        self, x: Tensor, sigma: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None
    ) -> Tensor:
        """x (B, ...) noisy sample in VE coordinates; sigma scalar or (B,). Returns x0 estimate (B, ...)."""
        sigma = self._batch_sigma(x, sigma)  # (B,)
        s = append_dims(sigma, x.ndim)  # (B, 1, ..., 1)
        c_in = (s**2 + 1).rsqrt()  # (B, 1, ..., 1) EDM Table 1 VP: 1/sqrt(sigma^2 + 1)
        c_noise = self.schedule.sigma_to_t(sigma)  # (B,)
        out = self.net((x * c_in).to(x.dtype), c_noise, context=context, context_mask=context_mask)
        if out.shape != x.shape:
            raise ValueError(
                f"net output {tuple(out.shape)} must match its input {tuple(x.shape)}; "
                "set the net's out_channels to the latent channels."
            )
        if self.prediction == "eps":
            x0 = x - s * out  # eps: x = x0 + sigma * eps
        else:
            x0 = x * c_in**2 - s * c_in * out  # v: x0 = sqrt(abar) x_t - sqrt(1 - abar) v
        return x0.to(x.dtype)
