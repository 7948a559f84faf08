"""Stage-1 training: the KL autoencoder as a LightningModule (Rombach et al. 2022, sec. 3)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor

from ldm.autoencoder.kl import KLAutoencoder
from ldm.autoencoder.loss import KLAutoencoderLoss, psnr
from ldm.lit.lr_schedules import optimizers_config


class AutoencoderModule(L.LightningModule):
    """Trains a KLAutoencoder on image batches; reports reconstruction PSNR on the validation split."""

    def __init__(
        self,
        model: KLAutoencoder,
        loss: KLAutoencoderLoss,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_schedule: Callable[..., Any] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss
        self.optimizer_factory = optimizer
        self.lr_schedule_factory = lr_schedule
        self.seed = seed

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        x = batch["image"]  # (B, 3, H, W) in [-1, 1]
        g = torch.Generator(device=x.device)
        g.manual_seed((self.seed * 1_000_003 + self.global_step) * 1_009 + self.global_rank)
        recon, posterior = self.model(x, sample=True, generator=g)
        loss, logs = self.loss_fn(x, recon, posterior)
        for name, value in logs.items():
            self.log(f"train/{name}", value, prog_bar=name in ("rec", "psnr"), batch_size=x.shape[0])
        self.log("train/loss", loss, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        x = batch["image"]
        recon = self.model.decode(self.model.encode(x).mode()).clamp(-1, 1)
        value = psnr(x, recon).mean()
        self.log("val/psnr", value, prog_bar=True, batch_size=x.shape[0], sync_dist=True)
        return value

    def configure_optimizers(self) -> Any:
        return optimizers_config(self.model.parameters(), self.optimizer_factory, self.lr_schedule_factory)
