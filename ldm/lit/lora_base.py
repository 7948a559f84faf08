"""LoRA fine-tuning glue: the base weights a LoRA trains on, where they come from, and how a LoRA checkpoint
is turned back into a full network for sampling.

A LoRA checkpoint stores only the adapter tensors (weights, EMA, optimizer state) and, under
``checkpoint["lora"]``, the settings and a reference to the base: ``{"sha256": ..., "source": {...}}`` where
the source is either ``{"kind": "init_from", "spec": "diffusers:<dir>|ldm:<file>", "ignore": [...]}``
(``model.init_from``) or ``{"kind": "checkpoint", "path": <train.py .ckpt>}`` (``model.lora.base``; its EMA
net weights, else its raw ones). Loading the base again must give the same sha256, or the LoRA is refused:
adapters trained on other weights would silently give other images.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ldm.convert.pretrained import init_unet_from
from ldm.lit.ema import EMA_KEY
from ldm.lora import LoraSettings, add_lora, base_state_dict, is_lora_key, merge_lora, state_sha256

log = logging.getLogger(__name__)

LORA_KEY = "lora"
NO_BASE = (
    "model.lora needs the base weights it adapts: set model.init_from=diffusers:<dir>|ldm:<file> or "
    "+model.lora.base=<a train.py checkpoint>"
)


def base_source(settings: LoraSettings, init_from: str | None, ignore: Sequence[str] = ()) -> dict[str, Any]:
    """Where the base weights come from (``model.lora.base`` wins over ``model.init_from``); none is an
    error."""
    if settings.base is not None:
        return {"kind": "checkpoint", "path": str(Path(settings.base).expanduser().resolve())}
    if init_from is not None:
        return {"kind": "init_from", "spec": str(init_from), "ignore": list(ignore)}
    raise ValueError(NO_BASE)


def checkpoint_net_weights(path: Path) -> dict[str, Tensor]:
    """The net weights of a train.py checkpoint: its EMA weights, or its raw ones when it has no EMA."""
    from ldm.lit.loading import CheckpointError, read_checkpoint, strip_prefix

    checkpoint = read_checkpoint(path)
    if LORA_KEY in checkpoint:
        raise CheckpointError(
            f"model.lora.base='{path}' is itself a LoRA checkpoint: merge it first (prepare.py "
            f"export-diffusers) "
            "or train the new LoRA on its base"
        )
    ema = checkpoint.get(EMA_KEY)
    state = (
        ema if isinstance(ema, dict) else strip_prefix(checkpoint.get("state_dict") or {}, "denoiser.net.")
    )
    if not state:
        raise CheckpointError(
            f"model.lora.base='{path}' holds no net weights: pass a checkpoint written by train.py"
        )
    return state


def load_base(
    net: nn.Module, source: Mapping[str, Any], *, schedule: Any = None, prediction: str | None = None
) -> None:
    """Copy the base weights of ``source`` into the plain (not yet adapted) ``net``."""
    if source["kind"] == "checkpoint":
        path = Path(source["path"])
        try:
            net.load_state_dict(checkpoint_net_weights(path), strict=True)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise ValueError(
                f"model.lora.base='{path}' does not fit the configured net ({first}): set net= to the base's"
            ) from None
    else:
        init_unet_from(
            net, source["spec"], source.get("ignore", ()), schedule=schedule, prediction=prediction
        )


def attach_lora(
    net: nn.Module,
    settings: LoraSettings,
    source: Mapping[str, Any],
    *,
    seed: int = 0,
    schedule: Any = None,
    prediction: str | None = None,
) -> dict[str, Any]:
    """Load the base into ``net``, then wrap it with fresh adapters (only they train). Returns the base
    reference ``{"sha256": ..., "source": ...}`` that LoRA checkpoints carry."""
    load_base(net, source, schedule=schedule, prediction=prediction)
    reference = {"sha256": state_sha256(base_state_dict(net)), "source": dict(source)}
    add_lora(net, settings, seed=seed)
    n_train = sum(p.numel() for p in net.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in net.parameters())
    log.info(
        "LoRA rank %d on %s: %d of %d parameters train (%.2f%%); base sha256 %s",
        settings.rank,
        list(settings.target_modules),
        n_train,
        n_all,
        100 * n_train / n_all,
        reference["sha256"][:12],
    )
    return reference


def check_same_base(saved: Mapping[str, Any], current: Mapping[str, Any], where: str) -> None:
    """Refuse a LoRA whose recorded base sha256 differs from the base loaded now."""
    if saved.get("sha256") != current.get("sha256"):
        raise ValueError(
            f"{where}: the LoRA was trained on base weights {str(saved.get('sha256'))[:12]}… "
            f"({saved.get('source')}) but the base loaded now is {str(current.get('sha256'))[:12]}… "
            f"({current.get('source')}): give the "
            "original base (sample.py lora_base=<checkpoint>) or retrain the LoRA"
        )


def frozen_net_keys(state: Mapping[str, Any], prefix: str = "denoiser.net.") -> list[str]:
    """The base tensors of an adapted net inside a module state dict (everything under ``prefix`` but
    adapters)."""
    return [k for k in state if k.startswith(prefix) and not is_lora_key(k)]


def merged_lora_net(
    net: nn.Module,
    lora: Mapping[str, Any],
    adapters: Mapping[str, Tensor],
    *,
    scale: float = 1.0,
    base_path: str | None = None,
    schedule: Any = None,
    prediction: str | None = None,
    where: str = "checkpoint",
) -> nn.Module:
    """A plain ``net`` (freshly built) -> base weights + the saved ``adapters`` merged at strength ``scale``.

    ``base_path`` replaces a checkpoint base's recorded path (a moved file); the sha256 must still match."""
    settings = LoraSettings.from_config(lora["settings"])
    source = dict(lora["base"]["source"])
    if base_path is not None:
        source = {"kind": "checkpoint", "path": str(Path(base_path).expanduser().resolve())}
    if source["kind"] == "checkpoint" and not Path(source["path"]).is_file():
        raise FileNotFoundError(
            f"{where}: the LoRA's base checkpoint '{source['path']}' is missing: pass lora_base=<its path>"
        )
    reference = attach_lora(net, settings, source, schedule=schedule, prediction=prediction)
    check_same_base(lora["base"], reference, where)
    load_adapters(net, adapters, where)
    return merge_lora(net, scale)


def load_adapters(net: nn.Module, adapters: Mapping[str, Tensor], where: str) -> None:
    """Copy saved adapter tensors into a LoRA-wrapped ``net``; every adapter must be there, nothing else."""
    missing, unexpected = net.load_state_dict(dict(adapters), strict=False)
    missing = [k for k in missing if is_lora_key(k)]
    if missing or unexpected:
        raise ValueError(
            f"{where}: the LoRA tensors do not fit the net ({len(missing)} missing, first {missing[:2]}; "
            f"{len(unexpected)} unexpected, first {unexpected[:2]}): pass an unmodified LoRA checkpoint"
        )


def adapters_from_checkpoint(path: Path, use_ema: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """A train.py LoRA checkpoint -> (its net with the saved adapters, base weights NOT loaded;
    ``checkpoint["lora"]``).

    For exporting the adapters alone (``prepare.py export-lora``): the base is only referenced, by sha256."""
    from omegaconf import OmegaConf

    from ldm.instantiate import build
    from ldm.lit.loading import CheckpointError, read_checkpoint, stored_config, strip_prefix
    from ldm.safe_config import SAMPLING_TARGETS, check_or_trust

    path = Path(path)
    checkpoint = read_checkpoint(path)
    lora = checkpoint.get(LORA_KEY)
    if lora is None:
        raise CheckpointError(
            f"'{path}' is not a LoRA checkpoint (no adapters): export it whole with prepare.py "
            f"export-diffusers"
        )
    net_cfg = stored_config(checkpoint, path)["model"]["denoiser"]["net"]
    check_or_trust({"model": {"net": net_cfg}}, SAMPLING_TARGETS, trust=False, source=f"checkpoint '{path}'")
    ema = checkpoint.get(EMA_KEY)
    if use_ema and not isinstance(ema, dict):
        raise CheckpointError(f"'{path}' has no EMA weights: pass --raw-weights")
    adapters = ema if use_ema else strip_prefix(checkpoint["state_dict"], "denoiser.net.")
    net = build(OmegaConf.create(net_cfg))
    add_lora(net, LoraSettings.from_config(lora["settings"]))
    load_adapters(net, adapters, f"'{path}'")
    return net.eval(), lora
