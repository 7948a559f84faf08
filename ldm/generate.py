"""Text-to-image generation: conditioner -> CFG denoiser -> sampler over a sigma schedule -> decoder.

Used by ``sample.py``, the training-time sample grid and the notebook, so all three produce the same images
for the same settings. Knows no Lightning and no concrete classes: any conditioner with
``forward``/``null_inputs``, any autoencoder with ``decode`` and any ``sample_*`` function work. A model with
several conditioners (text + labels, size conditioning, ...) takes its inputs as a dict {batch_key: inputs}
(``ldm.conditioning.multi``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from ldm.conditioning.multi import as_multi, batch_size
from ldm.img2img import InpaintDenoiser, forward_noise, truncate_sigmas
from ldm.nets.layers import cross_attention_cache
from ldm.sampling.guidance import CFGDenoiser
from ldm.sampling.registry import check_sampler


def latent_shape(
    net: nn.Module, autoencoder: nn.Module, image_size: int | Sequence[int]
) -> tuple[int, int, int]:
    """(C, h, w) of the latents the network denoises for images of ``image_size`` pixels (a side, or (H,
    W))."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    f = autoencoder.downsample_factor
    return (net.in_channels, int(height) // f, int(width) // f)


def initial_noise(seeds: Sequence[int], shape: Sequence[int], device: torch.device) -> Tensor:
    """(B, C, h, w) standard normal noise, image i drawn from its own CPU generator seeded with seeds[i].

    Drawing on the CPU makes a seed give the same noise on every device and in every batch composition.
    """
    noise = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(device)


@torch.no_grad()
def generate(
    denoiser: nn.Module,
    conditioner: nn.Module,
    decoder: Callable[[Tensor], Tensor],
    prompts: Sequence[Any] | Mapping[str, Any],
    *,
    sampler: Callable[..., Tensor],
    sigmas: Tensor,
    latent_shape: Sequence[int],
    seeds: Sequence[int],
    cfg_scale: float = 5.0,
    guidance_rescale: float = 0.0,
    guidance_interval: Sequence[float] | None = None,
    negative_prompt: Sequence[Any] | None = None,
    callback: Callable[[dict], None] | None = None,
    init_latents: Tensor | None = None,
    strength: float = 1.0,
    keep_mask: Tensor | None = None,
) -> Tensor:
    """Returns images (B, 3, H, W) in [0, 1].

    ``denoiser`` is an ``ldm.diffusion.Denoiser`` (its schedule sets the prior's scale and which samplers
    fit). ``negative_prompt`` (one per prompt) replaces the unconditional input of classifier-free guidance;
    by default the conditioner's null input (the empty caption the model saw under caption dropout) is used.
    ``guidance_rescale`` and ``guidance_interval`` are passed to ``CFGDenoiser``.

    ``prompts`` is a list (one conditioner: captions, or label ids) or a dict {batch_key: inputs} for several
    (e.g. {"txt": captions, "cls": (B,) ids, "original_size": (B, 2), ...}); then the unconditional branch
    nulls the conditioners marked for guidance and keeps the others (``MultiConditioner.guidance_pair``), and
    ``negative_prompt`` replaces the null input of the "txt" conditioner(s).

    Image-to-image (``ldm.img2img``): ``init_latents`` (B, C, h, w) are noised with the seeds' noise to the
    level where the last int(N * ``strength``) steps of the grid remain, and only those run (strength 0: the
    latents as given). ``keep_mask`` (B | 1, 1, h, w), 1 = keep: inpainting, the kept region pinned to
    ``init_latents``.
    """
    n = batch_size(prompts) if isinstance(prompts, Mapping) else len(prompts)
    if len(seeds) != n:
        raise ValueError(f"got {n} prompts but {len(seeds)} seeds: give one seed per prompt")
    check_sampler(sampler, denoiser.schedule)
    device = next(denoiser.parameters()).device
    if isinstance(prompts, Mapping):  # several conditioners
        negatives = {"txt": list(negative_prompt)} if negative_prompt is not None else None
        cond, uncond = as_multi(conditioner).guidance_pair(prompts, negatives)
        cond, uncond = ({k: v.to(device) for k, v in d.items()} for d in (cond, uncond))
    else:  # one conditioner, one input per image
        negatives = list(negative_prompt) if negative_prompt is not None else conditioner.null_inputs(n)
        cond = conditioner(list(prompts))
        uncond = conditioner(negatives)
    interval = tuple(guidance_interval) if guidance_interval is not None else None
    guided = CFGDenoiser(
        denoiser,
        cond,
        uncond,
        cfg_scale,
        rescale=guidance_rescale,
        interval=interval,
        to_prediction=denoiser.prediction_from_x0,
        from_prediction=denoiser.x0_from_prediction,
    )
    sigmas = sigmas.to(device)
    noise = initial_noise(seeds, latent_shape, device)  # (B, C, h, w)
    generator = torch.Generator().manual_seed(int(seeds[0]))  # noise injected by stochastic samplers
    if init_latents is None and keep_mask is not None:
        raise ValueError("keep_mask (inpainting) needs init_latents: pass the init image")
    if init_latents is None:
        x = noise * denoiser.schedule.init_noise_scale(float(sigmas[0]))
    else:
        z0 = init_latents.to(device=device, dtype=noise.dtype)  # (B, C, h, w)
        sigmas = truncate_sigmas(sigmas, strength)
        if keep_mask is not None:
            guided = InpaintDenoiser(guided, denoiser.schedule, z0, noise, keep_mask.to(device))
        x = forward_noise(denoiser.schedule, z0, noise, sigmas[0])
    if init_latents is not None and sigmas.numel() == 1:  # strength 0: nothing to denoise
        z = z0
    else:
        with cross_attention_cache(denoiser):  # the context is fixed: its keys/values once, not every step
            z = sampler(guided, x, sigmas, callback=callback, generator=generator)
    images = decoder(z)  # (B, 3, H, W) in about [-1, 1]
    return ((images.float() + 1) / 2).clamp(0, 1)


def to_pil(images: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> PIL images (8-bit, rounded the same way every time)."""
    arr = (images.detach().cpu().permute(0, 2, 3, 1).numpy() * 255.0 + 0.5).astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def make_grid(images: Sequence[Image.Image], ncols: int | None = None, pad: int = 2) -> Image.Image:
    """Tile equally sized PIL images into one grid image with a white border."""
    n = len(images)
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    w, h = images[0].size
    grid = Image.new("RGB", (ncols * (w + pad) + pad, nrows * (h + pad) + pad), (255, 255, 255))
    for i, im in enumerate(images):
        r, c = divmod(i, ncols)
        grid.paste(im, (pad + c * (w + pad), pad + r * (h + pad)))
    return grid
