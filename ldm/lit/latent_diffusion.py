"""LatentDiffusion: thin Lightning glue around a denoiser, an objective, a conditioner and a frozen
autoencoder.

The maths lives in ``ldm.diffusion`` (schedule, denoiser, loss); this module only moves batches through it,
logs, and builds the optimiser. Latents come from latent shards (``batch["latent"]``, already scaled by the
autoencoder that wrote them) or are encoded on the fly from ``batch["image"]`` by the frozen autoencoder; with
``latent_norm`` each channel is then normalised by the training shards' statistics, and ``decode_samples``
undoes that before decoding.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from ldm.autoencoder.frozen import FrozenAutoencoder
from ldm.autoencoder.latent_norm import LatentNorm, latent_norm_from_stats
from ldm.conditioning.multi import MultiConditioner, as_multi
from ldm.conditioning.text import TextConditioner
from ldm.convert.pretrained import init_unet_from, parse_init_from
from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.loss import DiffusionLoss
from ldm.lit.lora_base import LORA_KEY, attach_lora, base_source, check_same_base, frozen_net_keys
from ldm.lit.lr_schedules import optimizers_config
from ldm.lora import LoraSettings
from ldm.nets.compile import compile_backbone
from ldm.reconstruction import encoded_channel_stats

log = logging.getLogger(__name__)


def check_compatible(net: nn.Module, conditioner: nn.Module, autoencoder: FrozenAutoencoder | None) -> None:
    """Fail early, with the fix in the message, when the parts of a model cannot work together."""
    if autoencoder is not None and autoencoder.latent_channels != net.in_channels:
        raise ValueError(
            f"autoencoder has {autoencoder.latent_channels} latent channels but the network takes "
            f"{net.in_channels}: set net.in_channels={autoencoder.latent_channels}"
        )
    multi = as_multi(conditioner)
    context_dim, width = getattr(net, "context_dim", None), multi.dims("crossattn")
    if context_dim is not None and width is not None and context_dim != width:
        raise ValueError(
            f"conditioner gives {width}-d context but net.context_dim={context_dim}: set "
            f"net.context_dim={width}"
        )
    if context_dim is not None and width is None:
        raise ValueError(
            f"net.context_dim={context_dim} but no conditioner gives cross-attention tokens: set "
            f"net.context_dim=null "
            "or add a crossattn conditioner"
        )
    for kind, attr, default in (("vector", "vector_dim", None), ("concat", "concat_channels", 0)):
        need, has = multi.dims(kind) or default, getattr(net, attr, default)
        if need != has:
            raise ValueError(
                f"the conditioners give {kind} of width {need} but net.{attr}={has}: set net.{attr}={need} "
                f"(null/0 = no {kind} input)"
            )


class LatentDiffusion(L.LightningModule):
    """Conditional latent diffusion (Rombach et al. 2022): loss = E ||target - net(z_t, t, c)||^2."""

    def __init__(
        self,
        denoiser: Denoiser,
        loss: DiffusionLoss,
        conditioner: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        autoencoder: FrozenAutoencoder | None = None,
        lr_schedule: Callable[..., Any] | None = None,
        seed: int = 0,
        val_levels: int = 10,
        latent_norm: Any = "none",
        init_from: str | None = None,
        init_ignore_keys: list[str] | None = None,
        lora: dict[str, Any] | None = None,
        compile: bool | str = False,
    ) -> None:
        super().__init__()
        check_compatible(denoiser.net, conditioner, autoencoder)
        compile_backbone(
            denoiser.net, compile
        )  # in place, lazy: state_dict keys unchanged (ldm/nets/compile.py)
        self.denoiser = denoiser
        self.loss_fn = loss
        self.conditioner = conditioner
        self.autoencoder = autoencoder
        self.optimizer_factory = optimizer
        self.lr_schedule_factory = lr_schedule
        self.seed = seed
        self.latent_norm_spec = latent_norm
        self.latent_norm = LatentNorm(denoiser.net.in_channels)
        if not isinstance(latent_norm, str):  # explicit {mean, std}: known now, also without data
            self.latent_norm.set_stats(*latent_norm_from_stats(latent_norm, None))
        elif latent_norm not in ("none", "per_channel"):
            latent_norm_from_stats(latent_norm, None)  # raises the one-line error
        if val_levels < 0:
            raise ValueError(
                f"model.val_levels={val_levels}: give the number of noise-level bins (0 turns it off)"
            )
        self.val_levels = val_levels
        if init_from is not None:
            parse_init_from(init_from)  # a malformed spec fails now, not after the data is set up
        self.init_from, self.init_ignore_keys = init_from, list(init_ignore_keys or [])
        # model.lora: only adapters train; the base comes from init_from or lora.base (ldm.lit.lora_base)
        self.lora = LoraSettings.from_config(lora)
        self.lora_source = base_source(self.lora, init_from, self.init_ignore_keys) if self.lora else None
        self.lora_base: dict[str, Any] | None = None  # {sha256, source} once the adapters are attached
        self.skipped: Counter[str] = Counter()

    @property
    def net(self) -> nn.Module:
        return self.denoiser.net

    # ------------------------------------------------------------------ data → latents
    def latents(self, batch: dict[str, Any]) -> Tensor:
        """(B, C, h, w) diffusion-space latents: a latent batch's (already scaled) or an image batch encoded,
        then normalised per channel when ``latent_norm`` is on."""
        if "latent" in batch:
            z = batch["latent"]
        elif self.autoencoder is not None:
            z = self.autoencoder.encode(batch["image"])
        else:
            raise ValueError(
                "batch has images but no autoencoder is configured: set autoencoder=... or use latent shards"
            )
        if z.shape[1] != self.net.in_channels:
            raise ValueError(
                f"latents have {z.shape[1]} channels but the network takes {self.net.in_channels}: "
                f"set net.in_channels={z.shape[1]} or re-encode the shards with the configured autoencoder"
            )
        return self.latent_norm.normalize(z)

    def decode_samples(self, x: Tensor) -> Tensor:
        """(B, C, h, w) diffusion-space latents (a sampler's output) -> images (B, 3, H, W), about [-1, 1]."""
        return self.autoencoder.decode(self.latent_norm.denormalize(x))

    def setup(self, stage: str) -> None:
        """Before fitting: ``init_from`` / LoRA weights (``init_weights``), then for
        ``latent_norm=per_channel`` the channel statistics of the training latent shards' index, or of the
        first 512 training images' latents for image shards (a resumed run then loads the checkpoint's
        own)."""
        if stage == "fit":
            self.init_weights()
        if stage != "fit" or self.latent_norm_spec != "per_channel":
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        meta = getattr(datamodule, "index_meta", None) or {}
        if "latent_stats" not in meta and getattr(datamodule, "kind", None) == "images" and self.autoencoder:
            # image shards have no index stats: those of the first images' latents, the same on every rank
            stats = encoded_channel_stats(
                datamodule.train_urls,
                self.autoencoder,
                datamodule.image_size,
                background=datamodule.alpha_background,
            )
            meta = {"latent_stats": stats}
        mean, std = latent_norm_from_stats("per_channel", meta)
        self.latent_norm.set_stats(mean, std)
        log.info(
            "latent_norm=per_channel: channel means %s, stds %s (training data)",
            [round(m, 4) for m in mean],
            [round(s, 4) for s in std],
        )

    def init_weights(self) -> None:
        """``init_from``: the net's weights from a pretrained UNet before a fresh run
        (``ldm.convert.pretrained``).

        Weights only: optimizer, step and data start fresh, and the EMA callback copies the loaded weights at
        fit start. A resumed run (``ckpt_path``) skips it: the checkpoint's weights replace these anyway."""
        if self.lora is not None:  # the base is needed on resume too: LoRA checkpoints do not hold it
            if self.lora_base is None:
                self.lora_base = attach_lora(
                    self.net,
                    self.lora,
                    self.lora_source,
                    seed=self.seed,
                    schedule=self.denoiser.schedule,
                    prediction=self.denoiser.prediction,
                )
            return
        if self.init_from is None:
            return
        if self._trainer is not None and self.trainer.ckpt_path is not None:
            log.info("init_from %s skipped: resuming from %s", self.init_from, self.trainer.ckpt_path)
            return
        init_unet_from(
            self.net,
            self.init_from,
            self.init_ignore_keys,
            schedule=self.denoiser.schedule,
            prediction=self.denoiser.prediction,
        )

    def step_generator(self, device: torch.device, step: int, stream: int, micro: int = 0) -> torch.Generator:
        """Noise, timesteps and caption dropout are a pure function of (seed, step, micro-batch, rank,
        stream).

        This makes a resumed run draw exactly what the uninterrupted run would have drawn.
        """
        g = torch.Generator(device=device)
        g.manual_seed(
            (((self.seed * 1_000_003 + step) * 1_013 + micro) * 1_009 + self.global_rank) * 7 + stream
        )
        return g

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        z = self.latents(batch)  # (B, C, h, w)
        micro = (
            batch_idx % self.trainer.accumulate_grad_batches
        )  # distinct draws for accumulated micro-batches
        g = self.step_generator(z.device, self.global_step, stream=0, micro=micro)
        cond = self.conditioning(batch, generator=g)
        loss = self.loss_fn(self.net, z, generator=g, **cond)
        self.log("train/loss", loss, prog_bar=True, batch_size=z.shape[0])
        self.count_skipped(batch)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        z = self.latents(batch)
        g = self.step_generator(z.device, batch_idx, stream=1)  # the same noise every validation run
        cond = self.conditioning(batch, generator=None)
        loss = self.loss_fn(self.net, z, generator=g, **cond)
        self.log("val/loss", loss, prog_bar=True, batch_size=z.shape[0], sync_dist=True)
        if self.val_levels > 0:
            self.stratified_validation(z, cond, batch_idx)
        return loss

    def stratified_validation(self, z: Tensor, cond: dict[str, Tensor], batch_idx: int) -> None:
        """The validation loss per noise level: sample i is noised at the centre of level bin (i + batch) mod
        K of the training distribution's fraction axis (t for DDPM), with fixed noise. Logged as
        val/loss_level_k (k = 0 least noise); the mean over levels weighs every level alike, unlike
        val/loss."""
        k = self.val_levels
        bins = (torch.arange(z.shape[0], device=z.device) + batch_idx) % k  # (B,)
        fraction = (bins.to(torch.float64) + 0.5) / k
        sigma = self.loss_fn.schedule.sigma_at_fraction(fraction)  # (B,)
        g = self.step_generator(z.device, batch_idx, stream=2)
        per_sample = self.loss_fn(self.net, z, generator=g, sigma=sigma, reduce=False, **cond)  # (B,)
        for level in range(k):
            chosen = bins == level
            n = int(chosen.sum())
            if n:
                self.log(f"val/loss_level_{level}", per_sample[chosen].mean(), batch_size=n, sync_dist=True)

    def conditioning(self, batch: dict[str, Any], generator: torch.Generator | None) -> dict[str, Tensor]:
        """The backbone's ``cond`` dict for a batch (``ldm.conditioning.multi``); with a generator (training)
        each conditioner replaces some inputs by its null input, at its own rate.

        Latent shards may carry the frozen text encoder's output ("context"/"context_mask"): then the encoder
        is skipped and dropped rows get the null input's embedding. Size conditioning not in the batch is the
        batch's own pixel size, uncropped.
        """
        return as_multi(self.conditioner)(batch, generator, image_size=self.pixel_size(batch))

    def pixel_size(self, batch: dict[str, Any]) -> tuple[int, int] | None:
        """[H, W] in pixels of the batch's images (the target size of SDXL's size conditioning), if known."""
        if "image" in batch:
            return tuple(batch["image"].shape[-2:])
        if "latent" in batch and self.autoencoder is not None:
            f = self.autoencoder.downsample_factor
            return (batch["latent"].shape[-2] * f, batch["latent"].shape[-1] * f)
        return None

    def count_skipped(self, batch: dict[str, Any]) -> None:
        """Samples the loader dropped (per reason) arrive with each batch; log the running totals per rank.

        The DataModule totals them per shard too and stops the run past ``data.max_bad_fraction``.
        """
        for reason, n in batch.get("skipped", {}).items():
            if n:
                first = reason not in self.skipped
                self.skipped[reason] += int(n)
                level = logging.WARNING if first else logging.DEBUG
                total = self.skipped[reason]
                log.log(level, "skipped %d sample(s) in the loader: %s (total %d)", n, reason, total)
        for reason, total in self.skipped.items():
            # per rank, no sync: ranks may have seen different reasons, and a collective over different keys
            # hangs
            self.log(f"data/skipped_{reason}", float(total), rank_zero_only=False)

    def on_fit_end(self) -> None:
        """The skipped-sample counts per reason, per rank, also go to the run directory (per shard: the
        DataModule's ``data_bad_shards_rank{r}.json``)."""
        path = Path(self.trainer.default_root_dir) / f"data_skipped_rank{self.global_rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict(sorted(self.skipped.items())), indent=1))

    # ------------------------------------------------------------------ optimisation
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The denoiser's and any trainable conditioner parameters; never the frozen autoencoder's."""
        params = [p for p in self.denoiser.parameters() if p.requires_grad]
        params += [p for p in self.conditioner.parameters() if p.requires_grad]
        return params

    def configure_optimizers(self) -> Any:
        return optimizers_config(
            self.trainable_parameters(), self.optimizer_factory, self.lr_schedule_factory
        )

    # ------------------------------------------------------------------ checkpoints
    def frozen_prefixes(self) -> tuple[str, ...]:
        """Sub-modules rebuilt from their own pretrained weights: kept out of checkpoints (MiniLM alone is 90
        MB)."""
        prefixes = ["autoencoder."] if self.autoencoder is not None else []
        if not any(p.requires_grad for p in self.conditioner.parameters()):
            prefixes.append("conditioner.")
        elif isinstance(self.conditioner, MultiConditioner):  # e.g. text + labels: keep only the labels
            prefixes += self.conditioner.frozen_prefixes("conditioner.")
        return tuple(prefixes)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        frozen = self.frozen_prefixes()
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(frozen)
        }
        if self.lora is not None:  # adapters only, plus the base's identity
            for key in frozen_net_keys(checkpoint["state_dict"]):
                del checkpoint["state_dict"][key]
            checkpoint[LORA_KEY] = {"settings": self.lora.to_dict(), "base": self.lora_base}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        frozen = self.frozen_prefixes()
        own = {k: v for k, v in self.state_dict().items() if k.startswith(frozen)}
        # LoRA: the base was loaded in setup; it must be the one the adapters were trained on
        if self.lora is not None:
            if LORA_KEY not in checkpoint:
                raise ValueError(
                    "resuming a LoRA run from a checkpoint without LoRA tensors: drop model.lora or "
                    "pass model.init_from/lora.base and start fresh"
                )
            check_same_base(checkpoint[LORA_KEY]["base"], self.lora_base or {}, "resume")
            state = self.state_dict()
            own.update({k: state[k] for k in frozen_net_keys(state)})
        # checkpoints from before latent_norm existed trained without it: the identity norm
        identity = LatentNorm(self.net.in_channels).to(self.device).state_dict()
        own.update(
            {
                f"latent_norm.{k}": v
                for k, v in identity.items()
                if f"latent_norm.{k}" not in checkpoint["state_dict"]
            }
        )
        checkpoint["state_dict"] = {**checkpoint["state_dict"], **own}


def check_latent_source(
    shard_meta: dict[str, Any] | None,
    autoencoder: FrozenAutoencoder | None,
    conditioner: nn.Module | None = None,
) -> None:
    """Refuse latent shards written by another autoencoder (or text encoder) than the configured one."""
    if not shard_meta or "autoencoder" not in shard_meta or autoencoder is None:
        return
    text = shard_meta.get("text_encoder")
    text_conditioner = as_multi(conditioner).find(TextConditioner) if conditioner is not None else None
    configured_text = getattr(text_conditioner, "pretrained", None)
    if text and text.get("pretrained") != configured_text:
        raise ValueError(
            f"latent shards carry embeddings of text encoder '{text.get('pretrained')}' but the configured "
            f"conditioner is '{configured_text}': re-encode with `python prepare.py latents --text-encoder "
            f"...` or set conditioner="
        )
    shard_masked, masked = (
        (text or {}).get("mask_padding", True),
        getattr(text_conditioner, "mask_padding", True),
    )
    if text and shard_masked != masked:
        raise ValueError(
            f"latent shards carry text embeddings made with mask_padding={shard_masked} but the conditioner "
            f"has mask_padding={masked}: re-encode the shards' text with the same setting, or train on "
            f"shards without "
            "embeddings (prepare.py latents --text-encoder none)"
        )
    made_by, configured = shard_meta["autoencoder"], autoencoder.identity
    keys = ("sha256", "scale_factor", "shift_factor", "latent_channels")
    if any(made_by.get(k) != configured.get(k) for k in keys):
        show = lambda d: {k: d.get(k) for k in ("name", *keys)}  # noqa: E731
        raise ValueError(
            f"latent shards were made by autoencoder {show(made_by)} but the configured one is "
            f"{show(configured)}: "
            "re-encode the shards with `python prepare.py latents ...` or set autoencoder= to the one that "
            "made them"
        )
