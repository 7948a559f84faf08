"""The checks every backbone (UNet, DiT) makes on ``forward``'s inputs: one-line errors that name the fix."""

from __future__ import annotations

from torch import Tensor, nn


def check_backbone_inputs(
    net: nn.Module,
    x: Tensor,
    c_noise: Tensor,
    context: Tensor | None,
    context_mask: Tensor | None,
    *,
    multiple: int,
    size_fix: str,
) -> tuple[Tensor, Tensor | None]:
    """The checks every backbone makes on ``forward``'s inputs (UNet, DiT), one-line errors naming the fix.

    ``multiple``: what the latent's height and width must be divisible by (``size_fix`` says how to get
    there). Returns c_noise (B,) and the mask as bool (B, L) or None."""
    name = type(net).__name__
    if x.ndim != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != net.in_channels:
        raise ValueError(
            f"x has {x.shape[1]} channels but the {name} expects in_channels={net.in_channels}; "
            "set net.in_channels to the autoencoder's latent channels"
        )
    if x.shape[2] % multiple or x.shape[3] % multiple:
        raise ValueError(f"latent size {tuple(x.shape[2:])} is not divisible by {size_fix}")
    b = x.shape[0]
    c_noise = c_noise.reshape(-1)
    if c_noise.numel() == 1:
        c_noise = c_noise.expand(b)
    if c_noise.numel() != b:
        raise ValueError(f"c_noise must have shape (B,) = ({b},), got {c_noise.numel()} values")
    if net.context_dim is None:
        if context is not None:
            raise ValueError(
                f"context given to an unconditional {name}; set net.context_dim to the conditioner's "
                "output dim or do not pass context"
            )
        return c_noise, None
    if context is None:
        raise ValueError(f"{name} has context_dim={net.context_dim} but no context was passed")
    if context.ndim != 3 or context.shape[0] != b:
        raise ValueError(f"context must be (B={b}, L, D), got shape {tuple(context.shape)}")
    if context.shape[-1] != net.context_dim:
        raise ValueError(
            f"context last dim is {context.shape[-1]} but the {name} has context_dim={net.context_dim}; "
            "set net.context_dim to the conditioner's output dim"
        )
    if context_mask is None:
        return c_noise, None
    if context_mask.shape != context.shape[:2]:
        raise ValueError(
            f"context_mask must be (B, L) = {tuple(context.shape[:2])}, got {tuple(context_mask.shape)}"
        )
    if context_mask.is_floating_point():
        raise ValueError("context_mask must be bool (True = real token) or integer 1/0, not float")
    return c_noise, context_mask.bool()


def check_vector_and_concat(net: nn.Module, x: Tensor, vector: Tensor | None, concat: Tensor | None) -> None:
    """The checks on the two optional inputs (``ldm.interfaces.COND_KEYS``): the pooled/size/label ``vector``
    added to the timestep embedding and the ``concat`` channels joined to x; one-line errors naming the
    fix."""
    name = type(net).__name__
    if (vector is None) != (net.vector_dim is None):
        raise ValueError(
            f"{name} has vector_dim={net.vector_dim} but {'no' if vector is None else 'a'} vector was "
            f"passed: set "
            "net.vector_dim to the summed output_dim of the conditioners with output=vector (null when there "
            "are none)"
        )
    if vector is not None and (vector.ndim != 2 or vector.shape != (x.shape[0], net.vector_dim)):
        raise ValueError(
            f"vector must be (B, vector_dim) = ({x.shape[0]}, {net.vector_dim}), got {tuple(vector.shape)}: "
            "set net.vector_dim to the summed output_dim of the vector conditioners"
        )
    if (concat is None) != (net.concat_channels == 0):
        raise ValueError(
            f"{name} has concat_channels={net.concat_channels} but {'no' if concat is None else 'a'} concat "
            f"input was "
            "passed: set net.concat_channels to the channels of the output=concat conditioners (0 when there "
            "are none)"
        )
    if concat is not None and concat.shape != (x.shape[0], net.concat_channels, *x.shape[2:]):
        raise ValueError(
            f"concat must be (B, concat_channels, h, w) = {(x.shape[0], net.concat_channels, *x.shape[2:])}, "
            f"got {tuple(concat.shape)}: give the concat conditioner inputs at the latent size"
        )
