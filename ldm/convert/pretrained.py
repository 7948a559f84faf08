"""Weights-only initialisation of our UNet from pretrained weights (``model.init_from``).

    diffusers:<dir>   a UNet2DConditionModel directory (config.json) or a whole pipeline directory (unet/; its
                      scheduler/scheduler_config.json is then checked against our schedule and prediction
                      type)
    diffusers:<id>    a Hugging Face hub id (``owner/name``, no such local directory): its UNet files through
                      the hub cache (``snapshot_download``; only the cache with HF_HUB_OFFLINE=1)
    ldm:<file>        an original single-file LDM / Stable Diffusion checkpoint (.ckpt read with
                      ``weights_only=True``, or .safetensors), ``model.diffusion_model.*`` tensors

The net config must describe the pretrained network: a diffusers config is compared field by field with ours
(one-line error naming the field, and the whole ``net`` to set); a single-file checkpoint has no config, so
its tensor names and shapes are compared (fields that change no shape, such as the head count, cannot be
checked there: set them as the checkpoint's YAML says). ``ignore`` (fnmatch patterns over our parameter names,
or the source's names for tensors we have no place for) allows partial loading: matching tensors keep their
fresh initialisation or are dropped, and the report lists them. Everything else must match exactly.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ldm.convert.diffusers_scheduler import check_schedule_matches
from ldm.convert.diffusers_unet import diffusers_config_to_unet_kwargs, unet_to_diffusers_config
from ldm.convert.sd_checkpoint import read_ldm_unet_state_dict
from ldm.convert.unet_keys import key_map
from ldm.nets.unet import UNet

log = logging.getLogger(__name__)

INIT_KINDS = ("diffusers", "ldm")
# UNet fields that change what the net computes but no tensor shape: never waived by ignore patterns.
_SHAPE_FREE = (
    "num_heads",
    "num_head_channels",
    "upcast_attention",
    "norm_eps",
    "norm_groups",
    "use_linear_projection",
)


@dataclass
class InitReport:
    """What ``init_unet_from`` did: tensors loaded, our tensors kept at their fresh init (ignored or absent
    from the source), source tensors dropped (ignored, no place in our net)."""

    source: str
    loaded: int = 0
    kept: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"init_from {self.source}: loaded {self.loaded} tensors; kept at init {len(self.kept)} "
            f"{self.kept[:8]}; dropped from the source {len(self.dropped)} {self.dropped[:8]}"
        )


def parse_init_from(spec: str) -> tuple[str, Path]:
    """'diffusers:<dir>' | 'ldm:<file>' -> (kind, path); anything else is a one-line error."""
    kind, sep, path = str(spec).partition(":")
    if not sep or kind not in INIT_KINDS or not path:
        raise ValueError(
            f"model.init_from={spec!r}: use diffusers:<UNet or pipeline dir> or ldm:<single-file "
            f".ckpt|.safetensors>"
        )
    return kind, Path(path).expanduser()


HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
# what a UNet needs from a hub repo (a UNet repo or a pipeline repo): configs and safetensors weights, no
# fp16/ ema variants, .bin files or single-file checkpoints that pipeline repos also hold
HUB_FILES = [
    f"{sub}{name}"
    for sub in ("", "unet/")
    for name in (
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.safetensors.index.json",
        "diffusion_pytorch_model-*.safetensors",
    )
] + ["model_index.json", "scheduler/scheduler_config.json"]


def resolve_diffusers_source(path: Path, spec: str) -> Path:
    """A local directory as it is; a hub id (``owner/name`` that is not a local path) -> its snapshot
    directory in the Hugging Face cache, downloaded unless HF_HUB_OFFLINE is set (then the cache only)."""
    if path.exists() or not HUB_ID.fullmatch(str(path)):
        return path
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        return Path(snapshot_download(str(path), allow_patterns=HUB_FILES, local_files_only=offline))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        where = "the Hugging Face cache (HF_HUB_OFFLINE=1)" if offline else "the hub"
        raise FileNotFoundError(
            f"model.init_from={spec}: no local directory '{path}' and the hub id is not in {where} "
            f"({type(err).__name__}): pass a local pipeline dir, or fetch it once with `hf download {path}` "
            "where the hub is reachable"
        ) from None


def diffusers_unet_dir(path: Path) -> Path:
    """The directory holding the UNet's config.json: ``path`` itself or its ``unet/`` subfolder."""
    for candidate in (path, path / "unet"):
        if (candidate / "config.json").is_file():
            kind = json.loads((candidate / "config.json").read_text()).get(
                "_class_name", "UNet2DConditionModel"
            )
            if kind != "UNet2DConditionModel":
                raise ValueError(
                    f"model.init_from: {candidate} holds a {kind}, not a UNet2DConditionModel: pass the "
                    f"pipeline "
                    "directory or its unet/ folder"
                )
            return candidate
    raise FileNotFoundError(
        f"model.init_from: no diffusers UNet at {path} (expected {path}/config.json or "
        f"{path}/unet/config.json): "
        "pass a UNet2DConditionModel or pipeline directory saved with save_pretrained"
    )


def _net_kwargs(net: nn.Module) -> dict[str, Any]:
    """Our net's configuration in the normal form of ``diffusers_config_to_unet_kwargs`` (heads compared as
    heads)."""
    if not isinstance(net, UNet):
        raise ValueError(
            f"model.init_from loads UNet weights but the net is {type(net).__name__}: set net=unet_sd"
        )
    return diffusers_config_to_unet_kwargs(unet_to_diffusers_config(net))


def check_net_matches(net: nn.Module, pretrained: Mapping[str, Any], source: str, partial: bool) -> None:
    """Refuse a net config that differs from the pretrained UNet's (``pretrained``: our UNet kwargs of it).

    With ``partial`` (ignore patterns given) only the fields that change no tensor shape are refused; the
    tensor comparison catches the rest."""
    ours = _net_kwargs(net)
    whole = " ".join(
        f"net.{k}={json.dumps(v).replace(' ', '')}" for k, v in pretrained.items() if k != "dropout"
    )
    for name, value in pretrained.items():
        if name == "dropout" or ours[name] == value:
            continue
        if partial and name not in _SHAPE_FREE:
            log.warning(
                "init_from %s: net.%s=%s differs from the pretrained %s (partial load)",
                source,
                name,
                ours[name],
                value,
            )
            continue
        raise ValueError(
            f"model.init_from={source}: the pretrained UNet has {name}={value!r} but "
            f"net.{name}={ours[name]!r}: set net.{name}={value!r} (the pretrained net is: {whole})"
        )


def _matches(key: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(key, p) for p in patterns)


def load_partial(
    net: UNet, state: Mapping[str, Tensor], layout: str, ignore: Sequence[str], source: str
) -> InitReport:
    """Load ``state`` (in ``layout``: "diffusers" or "ldm") into ``net``; ignored tensors may be
    absent/extra/other."""
    from_source = {theirs: ours for ours, theirs in key_map(net, layout).items()}
    own = net.state_dict()
    report = InitReport(source=source)
    loaded: dict[str, Tensor] = {}
    unexpected = []
    for key, value in state.items():
        ours = from_source.get(key)
        if ours is None or _matches(ours, ignore):
            (report.dropped if ours is not None or _matches(key, ignore) else unexpected).append(ours or key)
            continue
        target = own[ours].shape
        if value.shape != target:
            if value.numel() != target.numel() or not key.endswith(("proj_in.weight", "proj_out.weight")):
                raise ValueError(
                    f"model.init_from={source}: tensor {key} has shape {tuple(value.shape)} but net's {ours} "
                    f"has {tuple(target)}: fix the net config, or add '{ours}' to model.init_ignore_keys to "
                    f"keep it fresh"
                )
            value = value.reshape(target)  # 1x1 conv <-> linear projection: the same map
        loaded[ours] = value
    missing = [k for k in own if k not in loaded and not _matches(k, ignore)]
    if missing or unexpected:
        raise ValueError(
            f"model.init_from={source}: {len(missing)} net tensors missing from the source (first "
            f"{missing[:3]}), {len(unexpected)} source tensors without a place in the net (first "
            f"{unexpected[:3]}): fix the net "
            "config, or list them in model.init_ignore_keys (fnmatch patterns) to load the rest"
        )
    report.kept = [k for k in own if k not in loaded]
    net.load_state_dict({**own, **loaded}, strict=True)  # copies into the existing parameters
    report.loaded = len(loaded)
    return report


def init_unet_from(
    net: nn.Module,
    spec: str,
    ignore: Sequence[str] = (),
    *,
    schedule: Any = None,
    prediction: str | None = None,
) -> InitReport:
    """Copy pretrained weights into ``net`` (see the module docstring); checks the pipeline's scheduler config
    against ``schedule``/``prediction`` when given and present. Logs and returns the report."""
    kind, path = parse_init_from(spec)
    ignore = list(ignore or ())
    _net_kwargs(net)  # refuses a net that is not our UNet
    if kind == "diffusers":
        path = resolve_diffusers_source(path, spec)
        unet_dir = diffusers_unet_dir(path)
        config = json.loads((unet_dir / "config.json").read_text())
        check_net_matches(net, diffusers_config_to_unet_kwargs(config), spec, partial=bool(ignore))
        pipeline = path if unet_dir != path else path.parent  # <pipeline>/unet was given, or <pipeline>
        scheduler = pipeline / "scheduler" / "scheduler_config.json"
        if schedule is not None and prediction is not None and scheduler.is_file():
            check_schedule_matches(
                json.loads(scheduler.read_text()), schedule, prediction, f"model.init_from={spec}"
            )
        from diffusers import UNet2DConditionModel

        state = UNet2DConditionModel.from_pretrained(unet_dir, local_files_only=True).state_dict()
        report = load_partial(net, state, "diffusers", ignore, spec)
    else:
        report = load_partial(net, read_ldm_unet_state_dict(path), "ldm", ignore, spec)
    log.info("%s", report.summary())
    return report
