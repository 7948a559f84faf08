"""The interfaces the parts of a latent-diffusion model meet, in one place: backbone, conditioner, noise
schedule.

These are structural (``typing.Protocol``): a new part needs no base class, only these members. They are
``runtime_checkable``, so ``isinstance(part, Backbone)`` checks that the members exist (not their signatures;
``tests/test_interfaces.py`` checks every configured part against them, the backbone's argument names
included).

Who uses what:
    Backbone     ``Denoiser`` and ``DiffusionLoss`` call it; ``LatentDiffusion`` checks its channels against
                 the autoencoder and its ``context_dim`` / ``vector_dim`` / ``concat_channels`` against the
                 conditioners.
    Conditioner  ``ldm.conditioning.multi.MultiConditioner`` (batch[batch_key] -> drop -> forward, one per
                 conditioner, merged into one ``cond`` dict), used by ``LatentDiffusion`` and
                 ``ldm.generate``.

The conditioning reaches the backbone as ONE dict ``cond`` whose keys are ``COND_KEYS``; the denoiser, the
loss and the guidance wrapper pass it through untouched as keyword arguments (``net(x, c_noise, **cond)``),
and only the backbone unpacks it. Keyword arguments rather than a positional dict: every call site that names
an input (``net(x, t, context=ctx)``, diffusers-style converters, tests) keeps working, a backbone that lacks
an input fails with a plain TypeError naming it, and the signature documents which inputs a net takes.
    Schedule     ``Denoiser``, ``DiffusionLoss``, the timestep samplers and weightings, ``sampling_sigmas``
                 and ``check_sampler``: the net sees a * x = alpha * x0 + s * eps (``coefficients``).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

# What a ``cond`` dict may hold (all optional; a conditioner of each output kind fills its keys):
#   context (B, L, context_dim) + context_mask (B, L) bool   cross-attention tokens  (output kind "crossattn")
#   vector (B, vector_dim)                 added to the timestep embedding           (output kind "vector")
#   concat (B, concat_channels, h, w)      channels concatenated to x                (output kind "concat")
COND_KEYS = ("context", "context_mask", "vector", "concat")
OUTPUT_KINDS = {"crossattn": ("context", "context_mask"), "vector": ("vector",), "concat": ("concat",)}
BACKBONE_ARGS = ("x", "c_noise", *COND_KEYS)


@runtime_checkable
class Backbone(Protocol):
    """``net(x, c_noise, **cond) -> Tensor`` of x's shape (the prediction F); ``cond`` keys are ``COND_KEYS``.

    x (B, in_channels, h, w) the net input x_in; c_noise (B,) the schedule's noise input
    (``Schedule.c_noise``); context (B, L, context_dim) cross-attention tokens or None; context_mask (B, L)
    bool, True = attend; vector (B, vector_dim) or None, added to the timestep embedding (zero-initialised
    projection); concat (B, concat_channels, h, w) or None, concatenated to x along the channels before the
    first layer. ``in_channels`` counts x only (the latent channels), not ``concat_channels``.
    """

    in_channels: int
    out_channels: int
    context_dim: int | None
    vector_dim: int | None
    concat_channels: int

    def forward(
        self,
        x: Tensor,
        c_noise: Tensor,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        vector: Tensor | None = None,
        concat: Tensor | None = None,
    ) -> Tensor: ...

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor: ...


@runtime_checkable
class Conditioner(Protocol):
    """Turns batch field(s) into part of the ``cond`` dict the backbone reads, and owns its dropout for
    guidance.

    ``output`` is its kind ("crossattn", "vector" or "concat", ``OUTPUT_KINDS``) and ``forward(inputs)``
    returns that kind's keys: {"context": (B, L, output_dim), "context_mask": (B, L)}, {"vector": (B,
    output_dim)} or {"concat": (B, output_dim, h, w)}. ``drop(inputs, generator)`` replaces inputs by the null
    input with probability ``dropout_prob``; ``null_inputs(n)`` is the unconditional input; ``guidance`` says
    whether classifier-free guidance swaps it for the null input (text, labels) or keeps it in both branches
    (size conditioning). ``batch_key`` names the batch field it reads ("txt", "cls"), or a tuple of fields
    (then inputs are a dict).
    """

    batch_key: str | tuple[str, ...]
    output: str
    output_dim: int
    dropout_prob: float
    guidance: bool

    def __call__(self, inputs: Any) -> dict[str, Tensor]: ...

    def drop(self, inputs: Any, generator: torch.Generator | None = None) -> Any: ...

    def null_inputs(self, n: int) -> Any: ...


@runtime_checkable
class Schedule(Protocol):
    """A noise schedule in the coordinates its samplers integrate (``space``: "ve" or "flow").

    ``coefficients(sigma)`` -> (a, alpha, s), each like sigma: the net sees a * x = alpha * x0 + s * eps;
    ``c_noise(sigma)`` the net's noise input; ``sigma_at_fraction(u)`` maps u in [0, 1) to a training noise
    level; ``init_noise_scale(sigma_max)`` scales N(0, I) into the sampler's first state; ``spacings`` are the
    sampling grids it allows (``ldm.sampling.grids``), ``default_spacing`` its own; ``alpha_min`` the smallest
    signal coefficient.
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
