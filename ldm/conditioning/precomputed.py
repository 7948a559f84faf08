"""Caption dropout for precomputed text embeddings (latent shards that carry the frozen encoder's output).

The unconditional branch of classifier-free guidance (Ho & Salimans 2022) is the embedding of the null input (the
empty caption). With embeddings read from shards the encoder never sees the dropped captions, so the dropped rows
are replaced by the null embedding here, explicitly.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def pad_tokens(context: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Zero-pad (B, L, D) context and (B, L) mask to ``length`` tokens (padding is masked out)."""
    extra = length - context.shape[1]
    if extra <= 0:
        return context, mask
    return F.pad(context, (0, 0, 0, extra)), F.pad(mask, (0, extra), value=False)


def replace_rows(
    context: Tensor, mask: Tensor, null_context: Tensor, null_mask: Tensor, drop: Tensor
) -> tuple[Tensor, Tensor]:
    """Rows where ``drop`` (B,) is True get the null embedding (1, L0, D) / (1, L0); lengths are padded to match.

    Only the null input's real tokens are kept, so the result does not depend on how it was padded.
    """
    n_real = int(null_mask[0].sum())
    null_context, null_mask = null_context[:, :n_real], null_mask[:, :n_real]  # (1, L0, D), (1, L0)
    length = max(context.shape[1], n_real)
    context, mask = pad_tokens(context, mask, length)
    null_context, null_mask = pad_tokens(null_context.to(context), null_mask.to(mask.device), length)
    keep = ~drop.to(context.device)  # (B,)
    context = torch.where(keep[:, None, None], context, null_context)
    mask = torch.where(keep[:, None], mask, null_mask)
    return context, mask
