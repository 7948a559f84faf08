"""SDXL size and crop micro-conditioning (Podell et al. 2023, "SDXL", Sec. 2.2) as a vector conditioner.

Each of ``original_size`` [h, w] (the image before resizing), ``crop_top_left`` [y, x] (the crop in the
resized image) and ``target_size`` [H, W] (the bucket / output size) is a pair of integers; each integer gets
a Fourier (sinusoidal) embedding of ``embed_dim`` channels and the embeddings are concatenated into one vector
of ``2 * len(keys) * embed_dim`` channels (SDXL: 6 x 256 = 1536). The backbone adds it to the timestep
embedding through a zero-initialised projection (``ldm.nets.layers.vector_embedding``), so the conditioning
starts as a no-op.

Aspect-ratio-bucketed shards give ``batch["original_size"]`` and ``batch["crop_top_left"]`` as (B, 2) long
(``ldm.data.buckets.size_conditioning``); ``target_size`` is the batch's own image size. Data without them
counts as uncropped at its own size (original = target, crop = [0, 0]), which is also what sampling asks for
by default. Classifier-free guidance keeps this conditioner in both branches (``guidance=False``), as SDXL
does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ldm.conditioning.labels import check_dropout_prob, dropout_mask

SIZE_KEYS = ("original_size", "crop_top_left", "target_size")


def fourier_embedding(values: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """(N,) numbers -> (N, dim) ``[cos(v * f), sin(v * f)]``, f_i = max_period^(-i / (dim/2)) (Vaswani et al.
    2017; SDXL embeds its size conditioning with the timestep embedding's formula)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half
    )
    angles = values.float()[:, None] * freqs[None, :]  # (N, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)  # (N, dim)


def size_inputs(
    n: int,
    target_size: Sequence[int],
    original_size: Sequence[int] | None = None,
    crop_top_left: Sequence[int] | None = None,
) -> dict[str, Tensor]:
    """The size conditioning of ``n`` images as (n, 2) long tensors; defaults: original = target, crop = [0,
    0]."""
    pairs = {
        "original_size": target_size if original_size is None else original_size,
        "crop_top_left": (0, 0) if crop_top_left is None else crop_top_left,
        "target_size": target_size,
    }
    out = {}
    for key, pair in pairs.items():
        values = [int(v) for v in pair]
        if len(values) != 2 or min(values) < 0:
            raise ValueError(
                f"{key}={list(pair)} must be two whole numbers >= 0 ([h, w] or [top, left]), e.g. [64,64]"
            )
        out[key] = torch.tensor([values] * n, dtype=torch.long)  # (n, 2)
    return out


class SizeConditioner(nn.Module):
    """``forward({key: (B, 2)}) -> {"vector": (B, 2 * len(keys) * embed_dim)}``; no parameters."""

    output: str = "vector"

    def __init__(
        self,
        keys: Sequence[str] = SIZE_KEYS,
        embed_dim: int = 256,
        dropout_prob: float = 0.0,
        guidance: bool = False,
    ) -> None:
        super().__init__()
        unknown = sorted(set(keys) - set(SIZE_KEYS))
        if not keys or unknown or embed_dim < 2 or embed_dim % 2:
            raise ValueError(
                f"SizeConditioner(keys={list(keys)}, embed_dim={embed_dim}): keys must be among "
                f"{list(SIZE_KEYS)} "
                "and embed_dim an even number >= 2"
            )
        self.batch_key = tuple(keys)
        self.embed_dim = int(embed_dim)
        self.output_dim = 2 * len(self.batch_key) * self.embed_dim
        self.dropout_prob = check_dropout_prob(dropout_prob)
        self.guidance = bool(guidance)

    def inputs(self, batch: Mapping[str, object], n: int, image_size: Sequence[int]) -> dict[str, Tensor]:
        """This conditioner's fields of ``batch``; missing ones default to an uncropped ``image_size`` [H,
        W]."""
        defaults = size_inputs(n, image_size)
        return {k: batch[k] if k in batch else defaults[k] for k in self.batch_key}  # type: ignore[misc]

    def forward(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        missing = [k for k in self.batch_key if k not in inputs]
        if missing:
            raise ValueError(
                f"size conditioning needs {missing}: pass them as (B, 2) tensors (see size_inputs)"
            )
        pairs = torch.stack(
            [torch.as_tensor(inputs[k]).reshape(-1, 2) for k in self.batch_key], 1
        )  # (B, K, 2)
        b = pairs.shape[0]
        emb = fourier_embedding(pairs.reshape(-1), self.embed_dim)  # (B * K * 2, embed_dim)
        return {"vector": emb.reshape(b, self.output_dim)}  # (B, 2 * K * embed_dim)

    def drop(
        self, inputs: Mapping[str, Tensor], generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """Zero each sample's sizes with probability ``dropout_prob`` (SDXL trains without; 0 by default)."""
        b = torch.as_tensor(inputs[self.batch_key[0]]).shape[0]
        drop = dropout_mask(b, self.dropout_prob, generator)  # (B,)
        out = {}
        for k in self.batch_key:
            value = torch.as_tensor(inputs[k])  # (B, 2)
            out[k] = torch.where(drop.to(value.device)[:, None], torch.zeros_like(value), value)
        return out

    def null_inputs(self, n: int) -> dict[str, Tensor]:
        """All-zero sizes (only used with ``guidance=True``)."""
        return {k: torch.zeros(n, 2, dtype=torch.long) for k in self.batch_key}
