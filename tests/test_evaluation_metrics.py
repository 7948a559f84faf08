"""FID / KID maths: agreement with a plain scipy/numpy computation, zero on identical sets, monotone in noise
and blur, and a same-data split far below another data set (tiny random extractor: fast, no weights)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import scipy.linalg
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw

from ldm.evaluation import TinyFeatures, extract, frechet_distance, gaussian_stats, kernel_distance
from ldm.evaluation.metrics import polynomial_mmd2


def plain_fid(x: np.ndarray, y: np.ndarray) -> float:
    """Heusel et al. 2017 as usually written: sqrtm of the product (scipy), real part."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def plain_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² with k(a, b) = (a.b/d + 1)^3, written with explicit masks over i != j."""
    m, d = x.shape
    k = lambda a, b: (np.einsum("id,jd->ij", a, b) / d + 1) ** 3  # noqa: E731
    off = ~np.eye(m, dtype=bool)
    return float(k(x, x)[off].mean() + k(y, y)[off].mean() - 2 * k(x, y).mean())


def random_features(seed: int, n: int = 600, d: int = 48) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3
    b = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + rng.normal(size=d) * 0.5
    return a, b


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frechet_distance_equals_scipy_sqrtm(seed: int) -> None:
    x, y = random_features(seed)
    ours = frechet_distance(gaussian_stats(x), gaussian_stats(y))
    assert ours == pytest.approx(plain_fid(x, y), rel=1e-6)
    assert frechet_distance(gaussian_stats(y), gaussian_stats(x)) == pytest.approx(ours, rel=1e-6)
    # torch input (float32) is promoted to float64 the same way
    assert frechet_distance(gaussian_stats(torch.from_numpy(x)), gaussian_stats(y)) == pytest.approx(
        ours, rel=1e-9
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_kid_equals_plain_numpy(seed: int) -> None:
    x, y = random_features(seed, n=300)
    assert polynomial_mmd2(x, y) == pytest.approx(plain_mmd2(x, y), rel=1e-6)
    # one subset as large as the sets is the whole sets in another order: MMD² does not depend on the order
    mean, std = kernel_distance(x, y, num_subsets=1, subset_size=10_000)
    assert mean == pytest.approx(plain_mmd2(x, y), rel=1e-6) and std == 0.0
    # subsets: the mean of the per-subset estimates, each an unbiased MMD² of a random subset
    rng = np.random.default_rng(3)
    subsets = [(rng.choice(300, 50, replace=False), rng.choice(300, 50, replace=False)) for _ in range(20)]
    mean, std = kernel_distance(x, y, num_subsets=20, subset_size=50, seed=3)
    values = [plain_mmd2(x[i], y[j]) for i, j in subsets]
    assert mean == pytest.approx(np.mean(values), rel=1e-6) and std == pytest.approx(np.std(values), rel=1e-6)


def test_identical_sets_score_zero() -> None:
    x, y = random_features(0)
    assert frechet_distance(gaussian_stats(x), gaussian_stats(x)) < 1e-9 * np.trace(np.cov(x, rowvar=False))
    # KID's estimator is unbiased for independent samples: two draws of one distribution score ~0
    rng = np.random.default_rng(5)
    mix = rng.normal(size=(48, 48)) * 0.3
    draw1, draw2 = rng.normal(size=(600, 48)) @ mix, rng.normal(size=(600, 48)) @ mix
    kid_same, kid_std = kernel_distance(draw1, draw2, num_subsets=20, subset_size=200)
    assert abs(kid_same) < 3 * kid_std and abs(kid_same) < 0.01 * kernel_distance(draw1, y, num_subsets=5)[0]
    # fewer samples than dimensions (singular covariances): still finite, still ~0 against itself
    few = x[:20]
    assert frechet_distance(gaussian_stats(few), gaussian_stats(few)) < 1e-9 * np.trace(
        np.cov(few, rowvar=False)
    )


def test_bad_features_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 2 images"):
        gaussian_stats(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="NaN/Inf"):
        gaussian_stats(np.full((3, 4), np.nan))
    with pytest.raises(ValueError, match="feature sizes differ"):
        frechet_distance(gaussian_stats(np.random.rand(5, 4)), gaussian_stats(np.random.rand(5, 3)))


# ---------------------------------------------------------------------------------------------- images
@pytest.fixture(scope="module")
def emoji() -> torch.Tensor:
    """(240, 3, 32, 32) in [0, 1]: the first 240 emoji, rendered as in the data set."""
    from ldm.data.emoji import emoji_samples
    from ldm.data.rgb import open_rgb

    images = []
    for sample in emoji_samples(size=32, limit=240):
        with open_rgb(sample["png"]) as im:
            images.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1))
    return torch.stack(images)


def shapes(n: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, 32, 32) in [0, 1]: another data set, random coloured ellipses and boxes on coloured ground."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        im = Image.new("RGB", (32, 32), tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(im)
        for _ in range(3):
            x0, y0 = rng.integers(0, 24, 2)
            box = [int(x0), int(y0), int(x0 + rng.integers(4, 16)), int(y0 + rng.integers(4, 16))]
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        buf = io.BytesIO()
        im.save(buf, "PNG")
        images.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1))
    return torch.stack(images)


def scores(extractor: TinyFeatures, a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    fa, fb = extract(extractor, a), extract(extractor, b)
    fid = frechet_distance(gaussian_stats(fa), gaussian_stats(fb))
    return fid, kernel_distance(fa, fb, num_subsets=20, subset_size=100)[0]


def test_fid_kid_rise_with_noise_and_blur(emoji: torch.Tensor) -> None:
    extractor = TinyFeatures()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(emoji.shape, generator=g)
    noisy = [scores(extractor, emoji, (emoji + s * noise).clamp(0, 1)) for s in (0.0, 0.05, 0.1, 0.2, 0.4)]
    blurred = [scores(extractor, emoji, TF.gaussian_blur(emoji, 9, s)) for s in (0.3, 0.7, 1.2, 2.0)]
    for series in (noisy, blurred):
        fids, kids = zip(*series, strict=True)
        assert all(a < b for a, b in zip(fids, fids[1:], strict=False)), fids
        assert all(a < b for a, b in zip(kids, kids[1:], strict=False)), kids
    assert noisy[0][0] < 1e-6  # the images against themselves


def test_two_halves_of_one_data_set_score_far_below_another(emoji: torch.Tensor) -> None:
    extractor = TinyFeatures()
    half_a, half_b = emoji[0::2], emoji[1::2]
    fid_same, kid_same = scores(extractor, half_a, half_b)
    fid_other, kid_other = scores(extractor, half_a, shapes(len(half_b)))
    assert fid_same < 0.2 * fid_other, (fid_same, fid_other)
    assert kid_same < 0.1 * kid_other, (kid_same, kid_other)


def test_tiny_extractor_is_fixed_and_rounds_like_a_png(emoji: torch.Tensor) -> None:
    a, b = TinyFeatures(), TinyFeatures()
    assert a.sha == b.sha and a.sha != TinyFeatures(seed=1).sha
    x = emoji[:4]
    assert torch.equal(a(x), b(x)) and a(x).shape == (4, 64)
    assert torch.equal(a(x), a(x + 0.4 / 255))  # below half an 8-bit level: the same stored image
