"""Sample a checkpoint:
`python sample.py ckpt=PATH prompt="red apple" num_images=8 steps=50 sampler=ddim cfg_scale=5`.

Class-conditional models take `label=<name or id>` (or a list, like the prompts), names resolved through the
label vocabulary stored in the checkpoint; size-conditioned models take
`size=[H,W] crop=[top,left] original_size=[h,w]` (SDXL micro-conditioning; `size` also sets the output size,
default the training image_size).

Writes one PNG per image, a grid PNG and metadata.json (file, prompt, negative prompt, seed, sampler settings,
checkpoint) to out_dir. The same seed gives byte-identical PNGs. EMA weights are used unless use_ema=false.

The checkpoint's stored config may only name the project's own classes (ldm/safe_config.py) unless
trust_checkpoint_config=true. Bad input (arguments, prompts file, checkpoint file, a full disk) ends the
command with one line on stderr and exit status 2 (ldm.cli.exit_on_user_error; LDM_TRACEBACK=1 shows the
traceback).
"""

from __future__ import annotations

import errno
import json
import logging
import re
from collections.abc import Callable
from numbers import Real
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from ldm.cli import exit_on_user_error
from ldm.conditioning.multi import sampling_inputs
from ldm.generate import generate, latent_shape, make_grid, to_pil
from ldm.img2img import check_init_inputs, keep_mask_latent, load_init_inputs
from ldm.instantiate import build
from ldm.lit.loading import SamplingModel, load_for_sampling, resolve_checkpoint
from ldm.sampling.grids import sampling_sigmas

log = logging.getLogger("sample")

WRITE_FIXES = {
    errno.ENOSPC: "the disk is full: free space or pass out_dir=DIR on another disk",
    errno.EDQUOT: "the disk quota is used up: free space or pass out_dir=DIR elsewhere",
    errno.EFBIG: "the file-size limit is too small: raise it (ulimit -f) or pass out_dir=DIR elsewhere",
    errno.EACCES: "out_dir is not writable: pass out_dir=DIR you can write to",
    errno.EROFS: "the file system is read-only: pass out_dir=DIR on a writable one",
}


def positive_int(cfg: DictConfig, key: str) -> int:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}={value!r} must be a whole number >= 1: e.g. {key}=4")
    return value


def guidance_interval(value: Any) -> list[float] | None:
    """null or [lo, hi] with 0 <= lo < hi (noise levels), else a one-line error with the expected form."""
    if value is None:
        return None
    items = list(value) if isinstance(value, ListConfig | list | tuple) else [value]
    fix = "pass guidance_interval=[lo,hi] with 0 <= lo < hi (noise levels, e.g. [0.5,20]) or null"
    if len(items) != 2 or not all(isinstance(v, Real) and not isinstance(v, bool) for v in items):
        raise ValueError(f"guidance_interval={value} is not two numbers: {fix}")
    lo, hi = (float(v) for v in items)
    if not 0 <= lo < hi:
        raise ValueError(f"guidance_interval={[lo, hi]} needs 0 <= lo < hi: {fix}")
    return [lo, hi]


def check_out_dir(out_dir: Path) -> None:
    """out_dir (or its nearest existing parent) must be a directory; nothing is created before sampling."""
    for path in (out_dir, *out_dir.parents):
        if path.exists():
            if not path.is_dir():
                raise ValueError(
                    f"out_dir={out_dir} cannot be a directory: '{path}' is a file — pass another out_dir"
                )
            return


def read_labels(cfg: DictConfig) -> list[str | int] | None:
    """label=NAME|ID or label=[a,b]: the class labels, each repeated num_images times (None when not
    given)."""
    value = cfg.get("label")
    if value is None:
        return None
    items = list(value) if isinstance(value, ListConfig | list | tuple) else [value]
    if not items or not all(isinstance(v, str | int) and not isinstance(v, bool) for v in items):
        raise ValueError(
            f"label={value!r} must be a class name or id, or a list of them: e.g. label=cat or label=3"
        )
    return [v for v in items for _ in range(cfg.num_images)]


def pair_up(
    prompts: list[str] | None, labels: list[str | int] | None
) -> tuple[list[str] | None, list | None]:
    """Prompts and labels of equal length (one of them may be a single value, or absent)."""
    if prompts is None or labels is None or len(prompts) == len(labels):
        return prompts, labels
    if len(set(prompts)) == 1:
        return prompts[:1] * len(labels), labels
    if len(set(labels)) == 1:
        return prompts, labels[:1] * len(prompts)
    raise ValueError(
        f"{len(prompts)} prompts but {len(labels)} labels: give as many of each, or one of either"
    )


def optional_pair(cfg: DictConfig, key: str) -> list[int] | None:
    """size / crop / original_size: null or two whole numbers [a, b]."""
    value = cfg.get(key)
    if value is None:
        return None
    items = list(value) if isinstance(value, ListConfig | list | tuple) else [value]
    if len(items) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in items):
        raise ValueError(f"{key}={value} is not two whole numbers >= 0: pass {key}=[a,b], e.g. {key}=[64,64]")
    return [int(v) for v in items]


def read_prompts(cfg: DictConfig) -> list[str]:
    """prompt, or prompts_file (UTF-8, one prompt per line, blank lines skipped), each repeated num_images
    times.

    A prompts file that is not UTF-8 is refused rather than guessed at: a mis-decoded prompt conditions the
    model on other text without any sign of it."""
    if cfg.prompts_file:
        path = Path(cfg.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(
                f"prompts_file not found: '{path}' — give a text file with one prompt per line"
            )
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise ValueError(
                f"prompts_file '{path}' is not UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start}): "
                f"re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8 '{path}' > prompts.txt"
            ) from None
        base = [line.strip() for line in text.splitlines() if line.strip()]
        if not base:
            raise ValueError(
                f"prompts_file '{path}' has no prompts (only blank lines): write one prompt per line"
            )
    elif cfg.prompt is not None:
        base = [str(cfg.prompt)]
    else:
        raise ValueError('no prompt given: pass prompt="red apple" or prompts_file=FILE')
    return [p for p in base for _ in range(cfg.num_images)]


def slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n] or "empty"


def write(path: Path, save: Callable[[Path], Any], cleanup: bool = True) -> None:
    """save(path); an OSError (disk full, file too large, ...) becomes one line with its cause and the fix."""
    try:
        save(path)
    except OSError as err:
        if cleanup and path.is_file():
            path.unlink()  # no half-written file left behind
        code = errno.errorcode.get(err.errno or 0, "")
        fix = WRITE_FIXES.get(err.errno or 0, "check that out_dir is writable and has space")
        cause = err.strerror or str(err)
        raise OSError(err.errno, f"could not write '{path}': {cause} ({code}) — {fix}") from None


def init_inputs(
    model: SamplingModel, images: list[str], masks: list[str], device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """init_image= / mask=: (K, C, h, w) encoded init latents and (K, 1, h, w) keep masks (or None)."""
    if not images:
        return None, None
    f = model.autoencoder.downsample_factor
    pixels, repaint = load_init_inputs(images, masks, tuple(d * f for d in model.latent_shape[1:]))
    keep = keep_mask_latent(repaint, f).to(device) if repaint is not None else None
    return model.encode_images(pixels.to(device)), keep


def run(cfg: DictConfig) -> list[dict[str, Any]]:
    # everything the arguments can get wrong fails here, before the checkpoint is read
    positive_int(cfg, "num_images")
    batch_size = positive_int(cfg, "batch_size")
    positive_int(cfg, "steps")
    interval = guidance_interval(cfg.guidance_interval)
    out_dir = Path(cfg.out_dir)
    check_out_dir(out_dir)
    labels = read_labels(cfg)
    prompts = read_prompts(cfg) if labels is None or cfg.prompt is not None or cfg.prompts_file else None
    prompts, labels = pair_up(prompts, labels)
    size, crop, original = (optional_pair(cfg, k) for k in ("size", "crop", "original_size"))
    n_images = len(prompts) if prompts is not None else len(labels or [])
    init_paths, mask_paths, strength = check_init_inputs(
        cfg.get("init_image"), cfg.get("mask"), cfg.get("strength", 0.6)
    )
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    )
    ckpt_path = resolve_checkpoint(str(cfg.ckpt), cfg.log_dir)
    trust = bool(cfg.get("trust_checkpoint_config", False))
    model = load_for_sampling(
        ckpt_path,
        cfg.use_ema,
        device,
        trust_checkpoint_config=trust,
        lora_scale=float(cfg.get("lora_scale", 1.0)),
        lora_base=cfg.get("lora_base"),
    )
    shape = (
        latent_shape(model.denoiser.net, model.autoencoder, size) if size is not None else model.latent_shape
    )
    pixels = [d * model.autoencoder.downsample_factor for d in shape[1:]]  # [H, W]
    inputs_for = lambda p, lab: sampling_inputs(model.conditioner, p, lab, pixels, original, crop)  # noqa: E731
    inputs_for(
        prompts[:1] if prompts else None, labels[:1] if labels else None
    )  # bad labels fail before sampling
    init_latents, keep = init_inputs(model, init_paths, mask_paths, device)
    sigmas = sampling_sigmas(model.denoiser.schedule, cfg.steps, spacing=cfg.spacing)
    # no sampler= given: the one the checkpoint's sample grid used in training (checked by load_for_sampling)
    if cfg.sampler is None and model.sampler_config is None:
        raise ValueError(
            f"'{ckpt_path}' stores no sampler: pass sampler=ddim (or another configs/sampler/ name)"
        )
    sampler_cfg = cfg.sampler if cfg.sampler is not None else OmegaConf.create(model.sampler_config)
    sampler = build(sampler_cfg)
    sampler_settings = {
        "sampler": OmegaConf.to_container(sampler_cfg),
        "steps": cfg.steps,
        "spacing": cfg.spacing,
        "cfg_scale": cfg.cfg_scale,
        "guidance_rescale": cfg.guidance_rescale,
        "guidance_interval": interval,
    }
    if model.lora is not None:
        sampler_settings["lora_scale"] = float(cfg.get("lora_scale", 1.0))
    write(out_dir, lambda p: p.mkdir(parents=True, exist_ok=True), cleanup=False)
    records: list[dict[str, Any]] = []
    pil_images = []
    for start in range(0, n_images, batch_size):
        stop = min(start + batch_size, n_images)
        batch = prompts[start:stop] if prompts is not None else None
        batch_labels = labels[start:stop] if labels is not None else None
        seeds = [cfg.seed + i for i in range(start, stop)]
        which = [(start + i) % len(init_paths) for i in range(len(batch))] if init_paths else []
        init = {} if init_latents is None else {"init_latents": init_latents[which], "strength": strength}
        if keep is not None:
            init["keep_mask"] = keep[which]
        images = generate(
            model.denoiser,
            model.conditioner,
            model.decode_samples,
            inputs_for(batch, batch_labels),
            sampler=sampler,
            sigmas=sigmas,
            latent_shape=shape,
            seeds=seeds,
            cfg_scale=cfg.cfg_scale,
            guidance_rescale=cfg.guidance_rescale,
            guidance_interval=interval,
            negative_prompt=[cfg.negative_prompt] * len(seeds) if batch is not None else None,
            **init,
        )
        for i, (seed, image) in enumerate(zip(seeds, to_pil(images), strict=True)):
            prompt = batch[i] if batch is not None else None
            label = batch_labels[i] if batch_labels is not None else None
            name = f"{start + i:04d}_{slug(prompt if prompt is not None else str(label))}_seed{seed}.png"
            write(out_dir / name, image.save)
            pil_images.append(image)
            records.append(
                {
                    "file": name,
                    "prompt": prompt,
                    "negative_prompt": cfg.negative_prompt,
                    **({"label": label} if label is not None else {}),
                    **({"size": pixels, "crop": crop, "original_size": original} if size is not None else {}),
                    "seed": seed,
                    **sampler_settings,
                    "use_ema": cfg.use_ema,
                    "checkpoint": str(ckpt_path.resolve()),
                }
            )
            if which:  # image-to-image: which init image (and mask) this one started from
                j = which[i]
                records[-1].update(
                    init_image=init_paths[j],
                    strength=strength,
                    mask=mask_paths[min(j, len(mask_paths) - 1)] if mask_paths else None,
                )
    write(out_dir / "grid.png", make_grid(pil_images, ncols=min(8, len(pil_images))).save)
    metadata = json.dumps({"images": records}, indent=2)
    write(out_dir / "metadata.json", lambda p: p.write_text(metadata))
    log.info("wrote %d images, grid.png and metadata.json to %s", len(records), out_dir)
    return records


@hydra.main(version_base="1.3", config_path="configs", config_name="sample")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
