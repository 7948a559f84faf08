"""Load frozen autoencoders: our own KL autoencoder (safetensors + json), a Lightning stage-1 checkpoint,
or a diffusers ``AutoencoderKL`` (local directory or hub id); and measure latent statistics for the
scale factor (Rombach et al. 2022, sec. 4.3.2: "we rescale the latents by the component-wise std")."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ldm.autoencoder.frozen import DiffusersAutoencoderAdaptor, FrozenAutoencoder, weights_sha256
from ldm.autoencoder.kl import KLAutoencoder

__all__ = [
    "SHIPPED_AUTOENCODER",
    "LatentMoments",
    "kl_autoencoder_from_checkpoint",
    "latent_stats",
    "load_diffusers_autoencoder",
    "load_kl_autoencoder",
    "save_kl_autoencoder",
]

log = logging.getLogger(__name__)

SHIPPED_AUTOENCODER = "emoji-kl-f4"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
_ALIASES = {SHIPPED_AUTOENCODER: WEIGHTS_DIR / "emoji_kl_f4.safetensors"}
_FORMAT = "ldm.kl_autoencoder/1"


def _stem(path: str | os.PathLike) -> Path:
    """'dir/name' or 'dir/name.safetensors' -> Path('dir/name')."""
    p = Path(path).expanduser()
    return p.with_suffix("") if p.suffix in (".safetensors", ".json") else p


def save_kl_autoencoder(
    model: KLAutoencoder,
    path: str,
    scale_factor: float,
    shift_factor: float = 0.0,
    extra: dict | None = None,
) -> None:
    """Write PATH.safetensors (weights) and PATH.json (config, scale/shift, sha256, extra), each
    atomically (temporary file in the same directory, then rename)."""
    stem = _stem(path)
    stem.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {
        "format": _FORMAT,
        "config": model.config(),
        "scale_factor": float(scale_factor),
        "shift_factor": float(shift_factor),
        "sha256": weights_sha256(model),
        "extra": extra or {},
    }
    weights, config = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    tmp_w, tmp_c = Path(f"{weights}.tmp"), Path(f"{config}.tmp")
    save_file(state, str(tmp_w), metadata={"format": _FORMAT})
    tmp_c.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp_w, weights)
    os.replace(tmp_c, config)
    log.info("saved KL autoencoder to %s (+ .json)", weights)


def _resolve(path: str) -> tuple[str, Path]:
    """Alias or path -> (identity name, weights file); raise FileNotFoundError naming the fix."""
    if path in _ALIASES:
        weights, name = _ALIASES[path], path
        fix = "train stage 1 and save it there with ldm.autoencoder.save_kl_autoencoder, or pass path="
    else:
        weights, name = _stem(path).with_suffix(".safetensors"), _stem(path).name
        fix = f"check the path (aliases: {sorted(_ALIASES)}) or save one with save_kl_autoencoder"
    for f in (weights, weights.with_suffix(".json")):
        if not f.is_file():
            raise FileNotFoundError(f"autoencoder file {f} not found: {fix}")
    return name, weights


def _load_strict(model: torch.nn.Module, state: dict[str, Tensor], source: str) -> None:
    expected, got = set(model.state_dict()), set(state)
    if expected != got:
        raise ValueError(
            f"{source} does not match the architecture: missing {sorted(expected - got)[:5]}, unexpected "
            f"{sorted(got - expected)[:5]}; re-save the weights together with their config"
        )
    model.load_state_dict(state, strict=True)


def load_kl_autoencoder(
    path: str = SHIPPED_AUTOENCODER,
    scale_factor: float | None = None,
    shift_factor: float | None = None,
) -> FrozenAutoencoder:
    """Alias or PATH.safetensors (with PATH.json beside it) -> FrozenAutoencoder (strict load, on CPU).
    scale/shift come from the json unless given."""
    name, weights = _resolve(path)
    meta = json.loads(weights.with_suffix(".json").read_text())
    if meta.get("format") != _FORMAT:
        raise ValueError(
            f"{weights.with_suffix('.json')} is not a {_FORMAT} file; save with save_kl_autoencoder"
        )
    model = KLAutoencoder(**meta["config"])
    _load_strict(model, load_file(str(weights)), str(weights))
    sha = weights_sha256(model)
    if meta.get("sha256") not in (None, sha):
        raise ValueError(f"{weights} does not match the sha256 in its .json; re-save both files together")
    return FrozenAutoencoder(
        model,
        scale_factor=meta["scale_factor"] if scale_factor is None else scale_factor,
        shift_factor=meta.get("shift_factor", 0.0) if shift_factor is None else shift_factor,
        latent_channels=model.latent_channels,
        downsample_factor=model.downsample_factor,
        identity={"name": name, "sha256": sha},
    )


def kl_autoencoder_from_checkpoint(ckpt_path: str) -> KLAutoencoder:
    """Lightning checkpoint of the stage-1 module -> KLAutoencoder (weights under "model.", kwargs in
    checkpoint["ldm_config"]["model"]["model"] with a "_target_" key that is ignored)."""
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(
            f"checkpoint {ckpt_path} not found; pass the .ckpt written by stage-1 training"
        )
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    kwargs = {k: v for k, v in dict(ckpt["ldm_config"]["model"]["model"]).items() if k != "_target_"}
    model = KLAutoencoder(**kwargs)
    prefix = "model."
    state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    _load_strict(model, state, ckpt_path)
    return model


def _diffusers_local_dir(pretrained: str, subfolder: str | None) -> bool:
    """True for an existing local directory; raise for a path-like string that does not exist."""
    if Path(pretrained).expanduser().is_dir():
        config = Path(pretrained).expanduser() / (subfolder or "") / "config.json"
        if not config.is_file():
            raise FileNotFoundError(
                f"{config} not found; point at the AutoencoderKL directory or pass subfolder="
            )
        return True
    if pretrained.startswith(("/", ".", "~")) or pretrained.count("/") > 1:
        raise FileNotFoundError(f"diffusers autoencoder directory {pretrained} not found; check the path")
    return False


def load_diffusers_autoencoder(
    pretrained: str,
    subfolder: str | None = None,
    scale_factor: float | None = None,
    shift_factor: float | None = None,
) -> FrozenAutoencoder:
    """diffusers AutoencoderKL from a local directory or a hub id (e.g. "stabilityai/sd-vae-ft-mse").
    scale/shift come from its config (scaling_factor, shift_factor) unless given."""
    from diffusers import AutoencoderKL

    local = _diffusers_local_dir(pretrained, subfolder)
    try:
        vae = AutoencoderKL.from_pretrained(pretrained, subfolder=subfolder, local_files_only=local)
    except OSError as err:
        raise FileNotFoundError(
            f"could not load AutoencoderKL {pretrained!r} (subfolder={subfolder!r}): {err}; "
            "download it to a local directory and pass that path"
        ) from err
    cfg = vae.config
    name = pretrained if subfolder is None else f"{pretrained}:{subfolder}"
    return FrozenAutoencoder(
        DiffusersAutoencoderAdaptor(vae),
        scale_factor=cfg.scaling_factor if scale_factor is None else scale_factor,
        shift_factor=(cfg.shift_factor or 0.0) if shift_factor is None else shift_factor,
        latent_channels=cfg.latent_channels,
        downsample_factor=2 ** (len(cfg.block_out_channels) - 1),
        identity={"name": name, "sha256": weights_sha256(vae)},
    )


class LatentMoments:
    """Running per-channel first and second moments of latents (B, C, h, w), in float64."""

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.total_sq: Tensor | None = None
        self.count = 0

    @torch.no_grad()
    def update(self, z: Tensor) -> None:
        flat = z.detach().double().transpose(0, 1).flatten(1)  # (C, B h w)
        s, sq = flat.sum(1).cpu(), flat.pow(2).sum(1).cpu()
        self.total = s if self.total is None else self.total + s
        self.total_sq = sq if self.total_sq is None else self.total_sq + sq
        self.count += flat.shape[1]

    def merge(self, other: LatentMoments) -> None:
        """Adds another accumulator's sums (e.g. of another shard or process); empty ones change nothing."""
        if other.total is None or other.total_sq is None:
            return
        self.total = other.total.clone() if self.total is None else self.total + other.total
        self.total_sq = other.total_sq.clone() if self.total_sq is None else self.total_sq + other.total_sq
        self.count += other.count

    def state(self) -> dict:
        """The raw sums as JSON-safe floats ({"count", "sum", "sum_sq"}): merging states gives the same
        numbers whatever the split, as float64 values survive a JSON round trip exactly."""
        as_list = lambda t: None if t is None else t.tolist()  # noqa: E731
        return {"count": self.count, "sum": as_list(self.total), "sum_sq": as_list(self.total_sq)}

    @classmethod
    def from_state(cls, state: dict) -> LatentMoments:
        moments = cls()
        if state.get("sum") is not None and state.get("sum_sq") is not None:
            moments.total = torch.tensor(state["sum"], dtype=torch.float64)
            moments.total_sq = torch.tensor(state["sum_sq"], dtype=torch.float64)
            moments.count = int(state["count"])
        return moments

    def result(self) -> dict:
        """Per-channel "channel_mean"/"channel_std", overall "mean"/"std" (unbiased), "count" (latent
        elements)."""
        if self.total is None or self.total_sq is None or self.count < 2:
            raise ValueError("latent statistics need at least one non-empty batch of images")
        count = self.count
        ch_mean = self.total / count  # (C,)
        ch_var = (self.total_sq / count - ch_mean.pow(2)) * count / (count - 1)  # unbiased, (C,)
        n_all = count * ch_mean.numel()
        mean = self.total.sum() / n_all
        var = (self.total_sq.sum() / n_all - mean.pow(2)) * n_all / (n_all - 1)
        return {
            "channel_mean": ch_mean.tolist(),
            "channel_std": ch_var.clamp_min(0).sqrt().tolist(),
            "mean": float(mean),
            "std": float(var.clamp_min(0).sqrt()),
            "count": int(n_all),
        }


def latent_stats(autoencoder: FrozenAutoencoder, images: Iterable[Tensor]) -> dict:
    """Statistics of the unscaled latents (posterior modes) over image batches (B, 3, H, W) in [-1, 1].

    Returns LatentMoments' fields plus the suggested "scale_factor" = 1 / std (Rombach et al. 2022, sec.
    4.3.2) and "shift_factor" = mean (only SD3/Flux-style autoencoders use a shift; keep 0.0 to follow Rombach
    et al.).
    """
    device = next(autoencoder.parameters()).device
    moments = LatentMoments()
    for x in images:
        moments.update(autoencoder.encode_unscaled(x.to(device)))  # (B, C, h, w)
    stats = moments.result()
    return {**stats, "scale_factor": 1.0 / stats["std"], "shift_factor": stats["mean"]}
