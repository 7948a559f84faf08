"""Feature extractors for FID/KID: a protocol, a tiny random one for tests, and a name registry for eval.py.

An extractor maps images (B, 3, H, W) in [0, 1] to features (B, D). Its ``name`` and ``sha`` identify the
features: reference statistics cached on disk record both and are refused under another extractor.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.evaluation.inception import InceptionV3Features, to_uint8_levels


@runtime_checkable
class FeatureExtractor(Protocol):
    name: str  # e.g. "inception_v3_tf"
    sha: str  # identity of the weights (and so of the features)
    dim: int  # D

    def __call__(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, D) float32."""
        ...


class TinyFeatures(nn.Module):
    """A fixed random two-layer conv net (seeded, nothing loaded): 64-d features in milliseconds.

    Only for tests and smoke runs: its numbers are not comparable with any published FID. Images are rounded
    to 8-bit levels like the Inception extractor's input, so in-memory and PNG images score the same.
    """

    name = "tiny_random_conv"
    dim = 64

    def __init__(self, seed: int = 0, device: str | torch.device = "cpu") -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=generator) * 0.3
        weights = torch.cat([p.detach().flatten() for p in self.parameters()]).numpy().tobytes()
        self.sha = hashlib.sha1(weights).hexdigest()
        self.to(device).eval()

    @torch.inference_mode()
    def forward(self, images: Tensor) -> Tensor:
        x = to_uint8_levels(images.to(self.conv1.weight.device)) / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
        x = F.relu(self.conv2(F.relu(self.conv1(x))))  # (B, 16, H/4, W/4)
        return F.adaptive_avg_pool2d(x, 2).flatten(1)  # (B, 64)


EXTRACTORS: dict[str, Callable[[torch.device], FeatureExtractor]] = {
    "inception": lambda device: InceptionV3Features(device=device),
    "tiny": lambda device: TinyFeatures(device=device),
}


def build_extractor(name: str, device: str | torch.device = "cpu") -> FeatureExtractor:
    """An extractor by registry name (``inception`` = the standard FID network, ``tiny`` = tests only)."""
    if name not in EXTRACTORS:
        raise ValueError(f"extractor={name!r} is unknown: use one of {sorted(EXTRACTORS)}")
    return EXTRACTORS[name](torch.device(device))


@torch.no_grad()
def extract(extractor: FeatureExtractor, images: Tensor, batch_size: int = 64) -> Tensor:
    """(N, 3, H, W) in [0, 1] -> (N, D) float32 on the CPU, in batches."""
    parts = [extractor(images[i : i + batch_size]).float().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0, extractor.dim)
