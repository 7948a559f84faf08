"""Classifier-free guidance (Ho & Salimans 2022, eq. 6) as a denoiser wrapper.

D_cfg(x, sigma) = D(x, sigma, uncond) + scale * (D(x, sigma, cond) - D(x, sigma, uncond)), with both branches
evaluated in ONE call on the doubled batch [uncond; cond]. A negative prompt is simply a non-empty ``uncond``.
``cond`` and ``uncond`` are the backbone's conditioning dicts (``ldm.interfaces.COND_KEYS``), passed through
untouched; which conditioners ``uncond`` nulls (and which, like size conditioning, it keeps) is decided where
it is built (``ldm.conditioning.multi.MultiConditioner.guidance_pair``). Guiding the x0 estimate is equivalent
to guiding the net's output (eps, v, ...): x0 is affine in it at fixed x, sigma.

Two refinements, both off by default:
- guidance rescale (Lin et al. 2024, Sec. 3.4, eqs. 15-16): in the model's own prediction space, rescale the
  guided output to the per-sample std of the conditional one and blend: F = phi * F_cfg * std(F_c) /
  std(F_cfg)
  + (1 - phi) * F_cfg. Counters over-exposure at high scales (needed with zero-terminal-SNR schedules).
- guidance interval (Kynkaanniemi et al. 2024): guide only for sigma in [lo, hi]; elsewhere the conditional
  branch alone is used (one network call on the single batch).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ldm.interfaces import COND_KEYS
from ldm.tensors import pad_tokens

CONTEXT_KEYS = ("context", "context_mask")


def _batched_pair(cond: dict[str, Tensor], uncond: dict[str, Tensor]) -> dict[str, Tensor]:
    """Concatenate uncond (batch 1 or B) and cond (batch B) into {key: (2B, ...)} in the order [uncond; cond].

    Token tensors (context, context_mask) of different lengths are padded to the longer (masked out)."""
    if set(cond) != set(uncond) or not set(cond) <= set(COND_KEYS) or not cond:
        raise ValueError(
            f"cond and uncond must both hold the same keys among {COND_KEYS}; got {sorted(cond)} and "
            f"{sorted(uncond)}: "
            "build both with the same conditioner"
        )
    batch = next(iter(cond.values())).shape[0]
    length = max(cond["context"].shape[1], uncond["context"].shape[1]) if "context" in cond else 0
    if (
        "context" in cond
        and cond["context"].shape[1] != uncond["context"].shape[1]
        and "context_mask" not in cond
    ):
        raise ValueError(
            "cond and uncond contexts differ in length; pass context_mask so the shorter is padded."
        )
    out: dict[str, Tensor] = {}
    for key in cond:
        c, u = cond[key], uncond[key]
        if key in CONTEXT_KEYS:
            c, u = pad_tokens(c, length), pad_tokens(u, length)  # (B, L, ...), (1|B, L, ...)
        if u.shape[0] == 1 and batch > 1:
            u = u.expand(batch, *u.shape[1:])
        if u.shape != c.shape:
            raise ValueError(
                f"uncond[{key!r}] {tuple(uncond[key].shape)} does not match cond {tuple(cond[key].shape)}; "
                "give uncond batch 1 or the same batch and feature size."
            )
        out[key] = torch.cat([u, c.to(u.device)])  # (2B, L, ...)
    return out


def rescale_guidance(guided: Tensor, cond: Tensor, phi: float) -> Tensor:
    """Lin et al. 2024, eqs. 15-16: match guided's per-sample std to cond's, blend with weight phi. (B,
    ...)."""
    dims = tuple(range(1, guided.ndim))
    ratio = cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)  # (B, 1, ..., 1)
    return phi * guided * ratio + (1.0 - phi) * guided


class CFGDenoiser:
    """Wraps ``denoiser(x, sigma, **cond)`` into a guided denoiser ``(x, sigma) -> x0``.

    ``rescale`` > 0 works in the model's prediction space: pass ``to_prediction(x, sigma, x0) -> F`` and its
    inverse ``from_prediction(x, sigma, F) -> x0`` (``Denoiser.prediction_from_x0`` /
    ``Denoiser.x0_from_prediction``). ``interval`` = (lo, hi) guides only for lo <= sigma <= hi.
    """

    def __init__(
        self,
        denoiser: Callable,
        cond: dict[str, Tensor],
        uncond: dict[str, Tensor],
        scale: float,
        rescale: float = 0.0,
        interval: tuple[float, float] | None = None,
        to_prediction: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
        from_prediction: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(
                f"guidance rescale must be in [0, 1] (0 = off, 0.7 in Lin et al.), got {rescale}."
            )
        if rescale > 0 and (to_prediction is None or from_prediction is None):
            raise TypeError(
                "guidance rescale works in the model's prediction space: pass "
                "to_prediction=denoiser.prediction_from_x0 and from_prediction=denoiser.x0_from_prediction, "
                "or set rescale=0."
            )
        if interval is not None:
            lo, hi = (float(v) for v in interval)
            if not 0.0 <= lo < hi:
                raise ValueError(
                    f"guidance interval must be (lo, hi) with 0 <= lo < hi, got {tuple(interval)}."
                )
            interval = (lo, hi)
        self.denoiser = denoiser
        self.cond = dict(cond)
        self.scale = float(scale)
        self.rescale = float(rescale)
        self.interval = interval
        self.to_prediction, self.from_prediction = to_prediction, from_prediction
        self.pair = _batched_pair(self.cond, dict(uncond))  # {key: (2B, ...)}
        self.batch = next(iter(self.cond.values())).shape[0]

    def _guided_rows(self, sigma: Tensor) -> Tensor:
        """(B,) bool: which samples get guidance at this sigma."""
        if self.scale == 1.0:  # guidance is the identity: skip the unconditional branch
            return torch.zeros(sigma.shape, dtype=torch.bool, device=sigma.device)
        if self.interval is None:
            return torch.ones(sigma.shape, dtype=torch.bool, device=sigma.device)
        lo, hi = self.interval
        return (sigma >= lo) & (sigma <= hi)

    def __call__(self, x: Tensor, sigma: Tensor, **kwargs) -> Tensor:
        """x (B, ...); sigma scalar or (B,); kwargs go to the wrapped denoiser. Returns the guided x0 (B,
        ...)."""
        if x.shape[0] != self.batch:
            raise ValueError(
                f"x has batch {x.shape[0]} but cond has batch {self.batch}; build one CFGDenoiser per batch."
            )
        if set(kwargs) & set(COND_KEYS):
            raise ValueError(
                f"{sorted(set(kwargs) & set(COND_KEYS))} are held by CFGDenoiser; do not pass them again in "
                f"extra_args."
            )
        sigma = torch.as_tensor(sigma, device=x.device)
        sigma_in = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma  # (B,)
        guided_rows = self._guided_rows(sigma_in)  # (B,)
        if not bool(guided_rows.any()):
            return self.denoiser(x, sigma, **self.cond, **kwargs)
        out = self.denoiser(
            torch.cat([x, x]), torch.cat([sigma_in, sigma_in]), **self.pair, **kwargs
        )  # (2B, ...)
        uncond, cond = out.chunk(2)  # (B, ...) each
        guided = uncond + self.scale * (cond - uncond)  # Ho & Salimans 2022, eq. 6
        if self.rescale > 0:
            to_pred, to_x0 = self.to_prediction, self.from_prediction
            pred = rescale_guidance(to_pred(x, sigma_in, guided), to_pred(x, sigma_in, cond), self.rescale)
            guided = to_x0(x, sigma_in, pred)
        rows = guided_rows.reshape((-1,) + (1,) * (x.ndim - 1))  # (B, 1, ..., 1)
        return torch.where(rows, guided, cond)
