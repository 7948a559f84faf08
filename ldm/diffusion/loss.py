"""The conditional latent-diffusion objective (Rombach et al. 2022, eq. 2), for any schedule and
parameterisation.

L = E_{x0, c, sigma ~ p(sigma), eps ~ N(0, I)} w(sigma) || F_theta(x_in, c_noise(sigma), c) - F(x0, eps) ||^2
with x_in = alpha(sigma) x0 + s(sigma) eps from the schedule (Ho et al. 2020, eq. 4 for VP; EDM eq. 2; SD3 eq.
3), the target F of the parameterisation, p(sigma) a noise-level sampler and w a weighting
(``ldm.diffusion.weighting``). The default (uniform t, uniform weight, eps) is DDPM's L_simple (Ho et al.
2020, eq. 14).

Two noise tricks, both off by default:
- offset noise (Guttenberg 2023): eps += offset * n_c with n_c ~ N(0, 1) per (sample, channel), so the model
  can change an image's mean brightness; the target is the offset noise itself.
- input perturbation (Ning et al. 2023, eq. 9): the net sees alpha x0 + s (eps + gamma xi) while the target is
  built from eps, which reduces the exposure bias between training and sampling.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ldm.diffusion.denoiser import append_dims
from ldm.diffusion.parameterization import parameterization_for
from ldm.diffusion.timesteps import UniformTimesteps
from ldm.diffusion.weighting import UniformWeighting


class DiffusionLoss:
    """Draws (sigma, eps), noises x0 and returns the weighted MSE of the net's prediction."""

    def __init__(
        self,
        schedule,
        prediction: str = "eps",
        timesteps: Callable[..., Tensor] | None = None,
        weighting: Callable[..., Tensor] | None = None,
        offset_noise: float = 0.0,
        input_perturbation: float = 0.0,
    ) -> None:
        if offset_noise < 0 or input_perturbation < 0:
            raise ValueError(
                f"offset_noise and input_perturbation must be >= 0 (0 = off; typical 0.05-0.1), got "
                f"{offset_noise} and {input_perturbation}."
            )
        self.schedule = schedule
        self.parameterization = parameterization_for(prediction, schedule)
        self.prediction = prediction
        self.timesteps = timesteps if timesteps is not None else UniformTimesteps()
        self.weighting = weighting if weighting is not None else UniformWeighting()
        self.offset_noise = float(offset_noise)
        self.input_perturbation = float(input_perturbation)

    def __repr__(self) -> str:
        return (
            f"DiffusionLoss(schedule={self.schedule!r}, prediction={self.prediction!r}, "
            f"timesteps={self.timesteps!r}, weighting={self.weighting!r}, offset_noise={self.offset_noise}, "
            f"input_perturbation={self.input_perturbation})"
        )

    def draw(self, x0: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """sigma (B,) float64, eps (B, ...) (with offset noise) and the input noise (with perturbation).

        Drawn on the generator's device (reproducible across devices), then moved to x0's device.
        """
        device = generator.device if generator is not None else x0.device
        batch = x0.shape[0]
        sigma = self.timesteps(self.schedule, batch, generator, device)  # (B,)
        eps = torch.randn(x0.shape, generator=generator, device=device)  # (B, C, H, W)
        if self.offset_noise > 0:
            per_channel = (batch, x0.shape[1]) + (1,) * (x0.ndim - 2)  # (B, C, 1, 1)
            eps = eps + self.offset_noise * torch.randn(per_channel, generator=generator, device=device)
        noise_in = eps
        if self.input_perturbation > 0:
            noise_in = eps + self.input_perturbation * torch.randn(
                x0.shape, generator=generator, device=device
            )
        return {"sigma": sigma.to(x0.device), "eps": eps.to(x0), "noise_in": noise_in.to(x0)}

    def __call__(
        self,
        net: nn.Module,
        x0: Tensor,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
        sigma: Tensor | None = None,
        reduce: bool = True,
        **cond: Tensor,
    ) -> Tensor:
        """x0 (B, C, H, W) clean latents; context (B, L, D) and context_mask (B, L) (positional for old
        callers) and the rest of the ``cond`` dict (vector, concat) go to the net untouched. Returns the
        scalar loss, or the weighted per-sample losses (B,) with ``reduce=False``. ``sigma`` (B,) replaces the
        drawn noise levels (the noise is still drawn from ``generator``): the stratified validation loss uses
        fixed levels."""
        draw = self.draw(x0, generator)
        if sigma is not None:
            draw["sigma"] = sigma.to(device=x0.device, dtype=draw["sigma"].dtype)
        sigma = draw["sigma"]  # (B,)
        _, alpha, s = self.schedule.coefficients(sigma)  # (B,) float64, once per step
        alpha_x, s_x = (append_dims(c, x0.ndim).to(x0.dtype) for c in (alpha, s))  # (B, 1, 1, 1)
        x_in = alpha_x * x0 + s_x * draw["noise_in"]  # (B, C, H, W) (VP: Ho et al. 2020, eq. 4)
        c_noise = self.schedule.c_noise(sigma).float()  # (B,)
        if context is not None:
            cond.update(context=context, context_mask=context_mask)
        pred = net(x_in, c_noise, **cond)  # (B, C, H, W)
        if pred.shape != x0.shape:
            raise ValueError(
                f"net output {tuple(pred.shape)} must match the latents {tuple(x0.shape)}; "
                "set the net's out_channels to the latent channels."
            )
        dtype = torch.promote_types(pred.dtype, torch.float32)  # fp16/bf16 nets: reduce in float32
        tgt = self.parameterization.target(x0, draw["eps"], alpha_x, s_x, self.schedule.sigma_data).to(dtype)
        per_sample = (pred.to(dtype) - tgt).pow(2).flatten(1).mean(1)  # (B,)
        k = self.parameterization.error_scale(alpha, s, self.schedule.sigma_data)
        weight = self.weighting(alpha, s, k, self.schedule.sigma_data).to(dtype)  # (B,)
        weighted = weight * per_sample  # (B,)
        return weighted.mean() if reduce else weighted
