"""Small torch helpers shared across layers (a leaf module: it imports only torch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def work_dtype(device: torch.device | str) -> torch.dtype:
    """float64 for schedule maths and noise-level draws, except on backends without float64 (Apple MPS)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def float_dtype(x: Tensor) -> torch.dtype:
    """The dtype results keep for an input x: float64 stays float64, anything else (ints, halves, float32)
    float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def pad_tokens(t: Tensor, length: int) -> Tensor:
    """Zero (False for masks) pad dim 1, the tokens, of (B, L, ...) up to ``length`` >= L: (B, length,
    ...)."""
    pad = [0, 0] * (t.ndim - 2) + [0, length - t.shape[1]]
    return F.pad(t, pad)
