"""Channels concatenated to the latent input: e.g. the masked-image latent and the mask of an inpainting model
(Rombach et al. 2022, Sec. 4.5; SD-inpainting: 4 + 4 + 1 = 9 input channels).

The batch carries the extra channels at the latent size under ``batch_key``; the backbone joins them to x
before its first layer (``net.concat_channels = channels``; ``net.in_channels`` stays the latent channels).
The null input is all zeros (the "nothing known" inpainting input). By default guidance keeps it in both
branches, as the SD inpainting pipeline does: only the text is guided.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ldm.conditioning.labels import check_dropout_prob, dropout_mask


class ConcatConditioner(nn.Module):
    """``forward((B, channels, h, w)) -> {"concat": (B, channels, h, w)}``; no parameters."""

    output: str = "concat"

    def __init__(
        self, channels: int, batch_key: str = "concat", dropout_prob: float = 0.0, guidance: bool = False
    ) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(
                f"ConcatConditioner needs channels >= 1, got {channels}: set conditioner.channels"
            )
        self.batch_key = batch_key
        self.output_dim = int(channels)
        self.dropout_prob = check_dropout_prob(dropout_prob)
        self.guidance = bool(guidance)

    def forward(self, inputs: Tensor) -> dict[str, Tensor]:
        if inputs.ndim != 4 or inputs.shape[1] != self.output_dim:
            raise ValueError(
                f"batch[{self.batch_key!r}] must be (B, {self.output_dim}, h, w), got {tuple(inputs.shape)}: "
                "set conditioner.channels to its channel count"
            )
        return {"concat": inputs}

    def drop(self, inputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Zero each sample's channels with probability ``dropout_prob``."""
        drop = dropout_mask(inputs.shape[0], self.dropout_prob, generator).to(inputs.device)  # (B,)
        return torch.where(drop[:, None, None, None], torch.zeros_like(inputs), inputs)

    def null_inputs(self, n: int) -> Tensor:
        raise ValueError(
            "a concat conditioner has no batch-free null input: pass its inputs for every image "
            "(guidance keeps them unless conditioner.guidance=true, then the null is zeros of that shape)"
        )
