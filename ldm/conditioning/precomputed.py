"""Caption dropout for precomputed text embeddings (latent shards that carry the frozen encoder's output).

The unconditional branch of classifier-free guidance (Ho & Salimans 2022) is the embedding of the null input
(the empty caption). With embeddings read from shards the encoder never sees the dropped captions, so the
dropped rows are replaced by the null embedding here, explicitly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ldm.tensors import pad_tokens


def replace_rows(
    context: Tensor, mask: Tensor, null_context: Tensor, null_mask: Tensor, drop: Tensor
) -> tuple[Tensor, Tensor]:
    """Rows where ``drop`` (B,) is True get the null embedding (1, L0, D) / (1, L0); lengths are padded to
    match.

    Only the null input's real tokens are kept, so the result does not depend on how it was padded.
    """
    n_real = int(null_mask[0].sum())
    null_context, null_mask = null_context[:, :n_real], null_mask[:, :n_real]  # (1, L0, D), (1, L0)
    length = max(context.shape[1], n_real)
    context, mask = pad_tokens(context, length), pad_tokens(mask, length)  # (B, length, D), (B, length)
    null_context = pad_tokens(null_context.to(context), length)  # (1, length, D)
    null_mask = pad_tokens(null_mask.to(mask.device), length)  # (1, length), padding False
    keep = ~drop.to(context.device)  # (B,)
    context = torch.where(keep[:, None, None], context, null_context)
    mask = torch.where(keep[:, None], mask, null_mask)
    return context, mask
