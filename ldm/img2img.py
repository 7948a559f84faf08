"""Image-to-image (SDEdit) and inpainting for ordinary text-to-image models: torch-only maths + image reading.

SDEdit (Meng et al. 2022, Sec. 3): encode the init image to z0, noise it to the level where a fraction
``strength`` of the sampler grid is left, x = forward(z0, eps, sigma_start), and run the rest of the grid.
With N steps, the last int(N * strength) steps run (diffusers' ``StableDiffusionImg2ImgPipeline`` convention):
strength 0 runs none (the init's reconstruction), strength 1 the whole grid.

Inpainting (RePaint-style, Lugmayr et al. 2022, eq. 8, without resampling): at every denoiser call the known
region of the state is replaced by the init latent noised to the current level with the same eps,
x_in = m * forward(z0, eps, sigma) + (1 - m) * x, and the known region of the x0 estimate by z0,
D'(x, sigma) = m * z0 + (1 - m) * D(x_in, sigma). Because every sampler steps through x0 estimates, the known
region then follows z0's own noising path and ends at z0 exactly (up to float error) for every sampler; the
model only ever fills the unknown region, conditioned on a consistent context.

The forward process is the schedule's own: a x = alpha z0 + s eps (``schedule.coefficients``), so x = z0 +
sigma eps for VP/EDM and x = (1 - t) z0 + t eps for rectified flow.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor


def check_strength(strength: Any) -> float:
    """strength in [0, 1] (a number), else a one-line error naming the fix."""
    fix = "pass strength= a number in [0, 1] (0 keeps the init image, 1 ignores it; e.g. strength=0.6)"
    if isinstance(strength, bool) or not isinstance(strength, int | float):
        raise ValueError(f"strength={strength!r} is not a number: {fix}")
    if not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength={strength} is outside [0, 1]: {fix}")
    return float(strength)


def truncate_sigmas(sigmas: Tensor, strength: float) -> Tensor:
    """(N + 1,) grid ending in 0 -> its last int(N * strength) + 1 entries (at least the final 0)."""
    n = sigmas.numel() - 1
    run = min(int(n * check_strength(strength)), n)
    return sigmas[n - run :]


def forward_noise(schedule: Any, z0: Tensor, noise: Tensor, sigma: Tensor | float) -> Tensor:
    """x at level sigma in the sampler's coordinates: (alpha z0 + s eps) / a. z0, noise (B, C, h, w); sigma
    scalar or (B,). Computed in float64 (the schedule's work dtype), returned in z0's dtype."""
    sigma = torch.as_tensor(sigma, device=z0.device)
    sigma = sigma.to(torch.float32) if not sigma.is_floating_point() else sigma
    sigma = sigma.reshape(-1) if sigma.ndim else sigma.reshape(1)
    a, alpha, s = (c.reshape(-1, 1, 1, 1) for c in schedule.coefficients(sigma))  # (B|1, 1, 1, 1)
    x = (alpha * z0.to(alpha.dtype) + s * noise.to(alpha.dtype)) / a
    return x.to(z0.dtype)


class InpaintDenoiser:
    """Wraps a denoiser callable D(x, sigma, **kw) -> x0: the known region (``keep`` = 1) is pinned to ``z0``.

    z0, noise (B, C, h, w); keep (B | 1, 1, h, w) in {0, 1}. See the module docstring for the update."""

    def __init__(
        self, denoiser: Callable[..., Tensor], schedule: Any, z0: Tensor, noise: Tensor, keep: Tensor
    ):
        if keep.shape[-2:] != z0.shape[-2:]:
            raise ValueError(f"mask {tuple(keep.shape)} does not match the latents {tuple(z0.shape)}")
        self.denoiser, self.schedule = denoiser, schedule
        self.z0, self.noise, self.keep = z0, noise, keep.to(z0.dtype)

    def __call__(self, x: Tensor, sigma: Tensor, **kwargs: Any) -> Tensor:
        known = forward_noise(self.schedule, self.z0, self.noise, sigma)  # (B, C, h, w)
        x_in = self.keep * known + (1 - self.keep) * x
        x0 = self.denoiser(x_in, sigma, **kwargs)  # (B, C, h, w)
        return self.keep * self.z0 + (1 - self.keep) * x0


def keep_mask_latent(repaint: Tensor, factor: int) -> Tensor:
    """(B, 1, H, W) pixel mask, 1 = repaint -> (B, 1, H/f, W/f) latent keep mask in {0, 1}: a latent pixel is
    kept only when none of its f x f pixels is to be repainted (max-pooling grows the repainted region, never
    the kept)."""
    repaint = (repaint > 0.5).to(torch.float32)
    return 1.0 - F.max_pool2d(repaint, kernel_size=factor, stride=factor)


def read_image(path: str | Path, size: tuple[int, int], what: str = "init_image") -> Tensor:
    """A picture file -> (3, H, W) in [-1, 1] at ``size`` = (H, W) (resized bicubically when it differs; alpha
    composited on white)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: '{path}' — pass {what}=PATH to an existing PNG/JPEG file")
    try:
        with Image.open(path) as im:
            im.load()
            rgba = im.convert("RGBA")
    except (OSError, Image.DecompressionBombError) as err:
        raise ValueError(f"{what} '{path}' is not a readable image ({err}): pass a PNG or JPEG") from None
    rgb = Image.new("RGB", rgba.size, (255, 255, 255))
    rgb.paste(rgba, mask=rgba.getchannel("A"))
    if rgb.size != (size[1], size[0]):
        rgb = rgb.resize((size[1], size[0]), Image.Resampling.BICUBIC)
    arr = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0)  # (H, W, 3)
    return arr.permute(2, 0, 1).contiguous()


def read_mask(path: str | Path, size: tuple[int, int], image_size: tuple[int, int] | None = None) -> Tensor:
    """A mask picture (white = repaint, black = keep, as diffusers) -> (1, H, W) in {0, 1} at ``size``.

    ``image_size`` (H, W): the init image's own size, which the mask must have."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"mask not found: '{path}' — pass mask=PATH to a PNG (white = repaint, black = keep)"
        )
    try:
        with Image.open(path) as im:
            gray = im.convert("L")
    except (OSError, Image.DecompressionBombError) as err:
        raise ValueError(f"mask '{path}' is not a readable image ({err}): pass a PNG") from None
    if image_size is not None and gray.size != (image_size[1], image_size[0]):
        raise ValueError(
            f"mask '{path}' is {gray.size[0]}x{gray.size[1]} but the init image is "
            f"{image_size[1]}x{image_size[0]}: "
            "make the mask the init image's size"
        )
    if gray.size != (size[1], size[0]):
        gray = gray.resize((size[1], size[0]), Image.Resampling.NEAREST)
    return (torch.from_numpy(np.asarray(gray, dtype=np.float32) / 255.0) > 0.5).to(torch.float32)[None]


def image_size_of(path: str | Path) -> tuple[int, int]:
    """(H, W) of a picture file; a missing or unreadable file is a one-line error naming the fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"init_image not found: '{path}' — pass init_image=PATH to an existing PNG/JPEG file"
        )
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except (OSError, Image.DecompressionBombError) as err:
        raise ValueError(f"init_image '{path}' is not a readable image ({err}): pass a PNG or JPEG") from None


def as_paths(value: Any) -> list[str]:
    """null -> [], one path -> [path], a list -> its paths (init_image=[a.png,b.png])."""
    if value is None:
        return []
    if isinstance(value, str | Path):
        return [str(value)]
    return [str(v) for v in value]


def check_init_inputs(init_image: Any, mask: Any, strength: Any) -> tuple[list[str], list[str], float]:
    """The init image paths, mask paths and strength, checked before any checkpoint is read: files exist, one
    mask or one per init image, each mask the size of its image, strength in [0, 1]."""
    images, masks = as_paths(init_image), as_paths(mask)
    strength = check_strength(strength)
    if masks and not images:
        raise ValueError(
            "mask= needs init_image=: pass the picture to inpaint, e.g. init_image=photo.png mask=mask.png"
        )
    if masks and len(masks) not in (1, len(images)):
        raise ValueError(
            f"got {len(masks)} masks for {len(images)} init images: give one mask, or one per init image"
        )
    for i, path in enumerate(images):
        size = image_size_of(path)
        if masks:
            read_mask(masks[min(i, len(masks) - 1)], (1, 1), size)  # readable, and the size of its image
    return images, masks, strength


def load_init_inputs(
    images: list[str], masks: list[str], size: tuple[int, int]
) -> tuple[Tensor, Tensor | None]:
    """(K, 3, H, W) init images in [-1, 1] and (K, 1, H, W) repaint masks (or None) at the model's
    ``size``."""
    pixels = torch.stack([read_image(p, size) for p in images])
    if not masks:
        return pixels, None
    repaint = [read_mask(masks[min(i, len(masks) - 1)], size, image_size_of(p)) for i, p in enumerate(images)]
    return pixels, torch.stack(repaint)
