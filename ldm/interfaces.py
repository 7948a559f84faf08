"""The interfaces the parts of a latent-diffusion model meet, in one place: backbone, conditioner, noise schedule.

These are structural (``typing.Protocol``): a new part needs no base class, only these members. They are
``runtime_checkable``, so ``isinstance(part, Backbone)`` checks that the members exist (not their signatures;
``tests/test_interfaces.py`` checks every configured part against them, the backbone's argument names included).

Who uses what:
    Backbone     ``Denoiser`` and ``DiffusionLoss`` call it; ``LatentDiffusion`` checks its channels against the
                 autoencoder and its ``context_dim`` against the conditioner.
    Conditioner  ``LatentDiffusion`` (batch[batch_key] -> drop -> forward) and ``ldm.generate.generate``
                 (forward on prompts and on ``null_inputs`` for classifier-free guidance).
    Schedule     ``Denoiser``, ``DiffusionLoss``, the timestep samplers and weightings, ``sampling_sigmas`` and
                 ``check_sampler``: the net sees a * x = alpha * x0 + s * eps (``coefficients``).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

BACKBONE_ARGS = ("x", "c_noise", "context", "context_mask")


@runtime_checkable
class Backbone(Protocol):
    """``net(x, c_noise, context=None, context_mask=None) -> Tensor`` of x's shape (the prediction F).

    x (B, in_channels, h, w) the net input x_in; c_noise (B,) the schedule's noise input (``Schedule.c_noise``);
    context (B, L, context_dim) cross-attention tokens or None; context_mask (B, L) bool, True = attend.
    """

    in_channels: int
    out_channels: int
    context_dim: int | None

    def forward(
        self, x: Tensor, c_noise: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None
    ) -> Tensor: ...

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor: ...


@runtime_checkable
class Conditioner(Protocol):
    """Turns a batch field into the ``cond`` dict the backbone reads, and owns its dropout for guidance.

    ``forward(inputs) -> {"context": (B, L, output_dim), "context_mask": (B, L)}``; ``drop(inputs, generator)``
    replaces inputs by the null input with probability ``dropout_prob``; ``null_inputs(n)`` is the unconditional
    input of classifier-free guidance; ``batch_key`` names the batch field it reads (e.g. "txt", "cls").
    """

    batch_key: str
    output_dim: int
    dropout_prob: float

    def __call__(self, inputs: Any) -> dict[str, Tensor]: ...

    def drop(self, inputs: Any, generator: torch.Generator | None = None) -> Any: ...

    def null_inputs(self, n: int) -> Any: ...


@runtime_checkable
class Schedule(Protocol):
    """A noise schedule in the coordinates its samplers integrate (``space``: "ve" or "flow").

    ``coefficients(sigma)`` -> (a, alpha, s), each like sigma: the net sees a * x = alpha * x0 + s * eps;
    ``c_noise(sigma)`` the net's noise input; ``sigma_at_fraction(u)`` maps u in [0, 1) to a training noise level;
    ``init_noise_scale(sigma_max)`` scales N(0, I) into the sampler's first state; ``spacings`` are the sampling grids
    it allows (``ldm.sampling.grids``), ``default_spacing`` its own; ``alpha_min`` the smallest signal coefficient.
    """

    space: str
    spacings: tuple[str, ...]
    default_spacing: str
    sigma_min: float
    sigma_max: float
    sigma_data: float
    alpha_min: float

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]: ...

    def c_noise(self, sigma: Tensor) -> Tensor: ...

    def sigma_at_fraction(self, u: Tensor) -> Tensor: ...

    def init_noise_scale(self, sigma: float) -> float: ...
