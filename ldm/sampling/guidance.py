"""Classifier-free guidance (Ho & Salimans 2022, eq. 6) as a denoiser wrapper.

D_cfg(x, sigma) = D(x, sigma, uncond) + scale * (D(x, sigma, cond) - D(x, sigma, uncond)), with both branches
evaluated in ONE call on the doubled batch [uncond; cond]. A negative prompt is simply a non-empty ``uncond``.
Guiding the x0 estimate is equivalent to guiding eps (x0 = x - sigma * eps is affine in eps at fixed x, sigma).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

CONTEXT_KEYS = ("context", "context_mask")


def _pad_tokens(t: Tensor, length: int) -> Tensor:
    """Zero/False-pad dim 1 (tokens) of (B, L, ...) to ``length``."""
    pad = [0, 0] * (t.ndim - 2) + [0, length - t.shape[1]]
    return F.pad(t, pad)


def _batched_pair(cond: dict[str, Tensor], uncond: dict[str, Tensor]) -> dict[str, Tensor]:
    """Concatenate uncond (batch 1 or B) and cond (batch B) into {key: (2B, ...)} in the order [uncond; cond]."""
    if set(cond) != set(uncond) or not set(cond) <= set(CONTEXT_KEYS) or "context" not in cond:
        raise ValueError(
            f"cond and uncond must both hold 'context' (and optionally 'context_mask'); got "
            f"{sorted(cond)} and {sorted(uncond)}."
        )
    batch = cond["context"].shape[0]
    length = max(cond["context"].shape[1], uncond["context"].shape[1])
    if cond["context"].shape[1] != uncond["context"].shape[1] and "context_mask" not in cond:
        raise ValueError(
            "cond and uncond contexts differ in length; pass context_mask so the shorter is padded."
        )
    out: dict[str, Tensor] = {}
    for key in cond:
        c, u = _pad_tokens(cond[key], length), _pad_tokens(uncond[key], length)  # (B, L, ...), (1|B, L, ...)
        if u.shape[0] == 1 and batch > 1:
            u = u.expand(batch, *u.shape[1:])
        if u.shape != c.shape:
            raise ValueError(
                f"uncond[{key!r}] {tuple(uncond[key].shape)} does not match cond {tuple(cond[key].shape)}; "
                "give uncond batch 1 or the same batch and feature size."
            )
        out[key] = torch.cat([u, c.to(u.device)])  # (2B, L, ...)
    return out


class CFGDenoiser:
    """Wraps ``denoiser(x, sigma, context=..., context_mask=...)`` into a guided denoiser ``(x, sigma) -> x0``."""

    def __init__(
        self, denoiser: Callable, cond: dict[str, Tensor], uncond: dict[str, Tensor], scale: float
    ) -> None:
        self.denoiser = denoiser
        self.cond = dict(cond)
        self.scale = float(scale)
        self.pair = _batched_pair(self.cond, dict(uncond))  # {key: (2B, ...)}
        self.batch = self.cond["context"].shape[0]

    def __call__(self, x: Tensor, sigma: Tensor, **kwargs) -> Tensor:
        """x (B, ...); sigma scalar or (B,); kwargs go to the wrapped denoiser. Returns the guided x0 (B, ...)."""
        if x.shape[0] != self.batch:
            raise ValueError(
                f"x has batch {x.shape[0]} but cond has batch {self.batch}; build one CFGDenoiser per batch."
            )
        if set(kwargs) & set(CONTEXT_KEYS):
            raise ValueError(
                "context/context_mask are held by CFGDenoiser; do not pass them again in extra_args."
            )
        if self.scale == 1.0:  # guidance is the identity: skip the unconditional branch
            return self.denoiser(x, sigma, **self.cond, **kwargs)
        sigma = torch.as_tensor(sigma, device=x.device)
        sigma_in = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma  # (B,)
        out = self.denoiser(
            torch.cat([x, x]), torch.cat([sigma_in, sigma_in]), **self.pair, **kwargs
        )  # (2B, ...)
        uncond, cond = out.chunk(2)  # (B, ...) each
        return uncond + self.scale * (cond - uncond)  # Ho & Salimans 2022, eq. 6
