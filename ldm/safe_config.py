"""A checkpoint's stored config is data, not code: check it against the project's allowlist before building
it.

``train.py`` stores the resolved run config in every checkpoint (``checkpoint["ldm_config"]``) and sampling
rebuilds the model from it with Hydra. Hydra's ``instantiate`` calls whatever ``_target_`` names, so a crafted
checkpoint could reach any importable callable (``pathlib.Path.write_text``, a helper that runs a command,
...). ``check_config`` walks the whole node before anything is built and refuses:

- a ``_target_`` (plain, ``_partial_``, nested in a dict value, a list element or ``_args_``) not in the
  allowlist below: exactly the ``_target_``s of the project's own configs/ (a test keeps the two equal);
- a ``_target_`` that is not a string, and any other ``_key_``-style special key than ``_target_``,
  ``_partial_``, ``_args_``, ``_convert_`` and ``_recursive_`` (the last two only change how arguments are
  passed);
- any string holding an OmegaConf interpolation ``${...}``: ``train.py`` stores the config resolved, so a
  genuine checkpoint has none, and resolvers are not all read-only (``oc.create``/``oc.decode`` turn a string
  into a ``_target_`` node after this check; ``oc.env`` would copy secrets into paths and metadata).

``trust_checkpoint_config=true`` skips the check (after a warning) for checkpoints whose config you wrote.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

log = logging.getLogger(__name__)

TRUST_FLAG = "trust_checkpoint_config"

# what sampling builds: model.denoiser (net, schedule), model.conditioner, model.autoencoder ...
MODEL_PART_TARGETS = (
    "ldm.nets.unet.UNet",
    "ldm.nets.dit.DiT",
    "ldm.diffusion.denoiser.Denoiser",
    "ldm.diffusion.schedules.DiscreteSchedule",
    "ldm.diffusion.continuous.EDMSchedule",
    "ldm.diffusion.continuous.FlowSchedule",
    "ldm.conditioning.text.TextConditioner",
    "ldm.conditioning.labels.ClassConditioner",
    "ldm.conditioning.multi.MultiConditioner",
    "ldm.conditioning.size.SizeConditioner",
    "ldm.autoencoder.loaders.load_kl_autoencoder",
    "ldm.autoencoder.loaders.load_diffusers_autoencoder",
)
# ... and the sampler (configs/sampler/, always `_partial_: true`)
SAMPLER_TARGETS = (
    "ldm.sampling.sample_ddim",
    "ldm.sampling.sample_ddpm",
    "ldm.sampling.sample_dpmpp_2m",
    "ldm.sampling.sample_dpmpp_2m_sde",
    "ldm.sampling.sample_euler",
    "ldm.sampling.sample_euler_ancestral",
    "ldm.sampling.sample_flow_euler",
    "ldm.sampling.sample_heun",
    "ldm.sampling.sample_plms",
    "ldm.sampling.sample_unipc",
)
# the rest of configs/: training only (loss, Lightning modules, data, optimiser, trainer, callbacks, loggers)
TRAINING_TARGETS = (
    "ldm.diffusion.loss.DiffusionLoss",
    "ldm.diffusion.weighting.EDMWeighting",
    "ldm.diffusion.timesteps.LogNormalSigmas",
    "ldm.diffusion.timesteps.LogitNormalTimesteps",
    "ldm.diffusion.weighting.MinSNRWeighting",
    "ldm.diffusion.timesteps.UniformTimesteps",
    "ldm.diffusion.weighting.UniformWeighting",
    "ldm.autoencoder.kl.KLAutoencoder",
    "ldm.autoencoder.loss.KLAutoencoderLoss",
    "ldm.lit.latent_diffusion.LatentDiffusion",
    "ldm.lit.autoencoder_module.AutoencoderModule",
    "ldm.data.datamodule.ShardDataModule",
    "ldm.lit.callbacks.RNGState",
    "ldm.lit.callbacks.SampleGrid",
    "ldm.lit.callbacks.Throughput",
    "ldm.lit.ema.EMA",
    "ldm.lit.guards.NonFiniteGuard",
    "ldm.lit.preemption.GracefulStop",
    "ldm.lit.sample_quality.SampleQuality",
    "ldm.lit.optuna_pruning.OptunaPruning",
    "optuna.pruners.MedianPruner",
    "optuna.samplers.TPESampler",
    "ldm.lit.loggers.wandb_logger",
    "ldm.lit.lr_schedules.warmup_constant",
    "ldm.lit.lr_schedules.warmup_cosine",
    "torch.optim.AdamW",
    "lightning.Trainer",
    "lightning.pytorch.callbacks.LearningRateMonitor",
    "lightning.pytorch.callbacks.ModelCheckpoint",
    "lightning.pytorch.loggers.CSVLogger",
    "lightning.pytorch.loggers.TensorBoardLogger",
    "lightning.pytorch.strategies.DDPStrategy",
    "ldm.lit.sharded.FSDPStrategy",
)
SAMPLING_TARGETS: frozenset[str] = frozenset(MODEL_PART_TARGETS + SAMPLER_TARGETS)
ALLOWED_TARGETS: frozenset[str] = SAMPLING_TARGETS | frozenset(TRAINING_TARGETS)

# Hydra's special keys (hydra._internal.instantiate._Keys) other than _target_: they shape the call, call
# nothing
HARMLESS_SPECIAL_KEYS = frozenset({"_partial_", "_args_", "_convert_", "_recursive_"})


class UntrustedConfigError(ValueError):
    """A stored config names code outside the allowlist; the message names it, where it is, and the flag."""


def _is_special(key: Any) -> bool:
    return isinstance(key, str) and len(key) > 2 and key.startswith("_") and key.endswith("_")


def _refuse(problem: str, where: str, source: str) -> UntrustedConfigError:
    return UntrustedConfigError(
        f"{source} {problem} at {where or '<root>'}, which this project never builds from a stored config "
        f"(allowlist: ldm/safe_config.py): it may run code — if you trust this file, pass {TRUST_FLAG}=true"
    )


def check_config(node: Any, allowed: Collection[str], where: str = "", source: str = "the config") -> None:
    """Raise UntrustedConfigError at the first disallowed ``_target_``, special key or interpolation in
    ``node`` (plain dicts/lists as stored in a checkpoint, or an unresolved DictConfig), depth first, before
    anything is built."""
    if isinstance(node, DictConfig | ListConfig):
        node = OmegaConf.to_container(node, resolve=False)
    if isinstance(node, str):
        if "${" in node:
            shown = node if len(node) <= 60 else node[:57] + "..."
            raise _refuse(f"holds the interpolation {shown!r}", where, source)
        return
    if isinstance(node, list | tuple):
        for i, item in enumerate(node):
            check_config(item, allowed, f"{where}[{i}]", source)
        return
    if not isinstance(node, dict):
        return
    if "_target_" in node:
        target = node["_target_"]
        if not isinstance(target, str):
            raise _refuse(f"has a _target_ that must be a string, got {type(target).__name__}", where, source)
        if target not in allowed:
            raise _refuse(f"names the callable '{target}'", where, source)
    for key, value in node.items():
        path = f"{where}.{key}" if where else str(key)
        if _is_special(key) and key != "_target_" and key not in HARMLESS_SPECIAL_KEYS:
            raise _refuse(f"has the unknown special key '{key}'", path, source)
        check_config(value, allowed, path, source)


def check_or_trust(
    node: Any, allowed: Collection[str], *, trust: bool, where: str = "", source: str = "the config"
) -> None:
    """check_config, or with ``trust`` a one-line warning that the stored config is built as it is."""
    if trust:
        log.warning(
            "%s=true: building %s (%s) as stored, without the allowlist check — its _target_s can run any "
            "code",
            TRUST_FLAG,
            where or "the config",
            source,
        )
        return
    check_config(node, allowed, where, source)
