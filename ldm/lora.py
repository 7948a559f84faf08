"""Low-rank adaptation (LoRA, Hu et al. 2022) of a network's linear layers through ``peft``.

A LoRA layer computes W x + (alpha / r) B A x with W (out, in) frozen, A (r, in) and B (out, r) trained; B
starts at zero, so the adapted network starts equal to its base (Hu et al. 2022, Sec. 4.1). Our attention
layers use diffusers' names (``to_q``, ``to_k``, ``to_v``, ``to_out.0``), so the same ``target_modules``
select the same layers as a diffusers/peft LoRA of Stable Diffusion.

Plain functions over ``nn.Module``s and state dicts: no Lightning. The base weights a LoRA was trained on are
identified by ``state_sha256`` (over names, dtypes, shapes and bytes), so a LoRA checkpoint can refuse a base
that is not the one it was trained against.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
ADAPTER = "default"
LORA_MARK = (
    ".lora_"  # peft's adapter tensors: <layer>.lora_A.<adapter>.weight, <layer>.lora_B.<adapter>.weight
)
BASE_LAYER = ".base_layer"  # peft moves the wrapped layer's own tensors under <layer>.base_layer.*


@dataclass(frozen=True)
class LoraSettings:
    """``model.lora``: rank r, alpha (default r: scale 1), the layers to adapt (suffixes of module names), the
    dropout on the adapter's input, and ``base``: a train.py checkpoint whose (EMA) net weights are the base,
    when the base is not ``model.init_from``."""

    rank: int
    alpha: float | None = None
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    dropout: float = 0.0
    base: str | None = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> LoraSettings | None:
        """None (or rank 0) -> no LoRA; unknown keys and bad values are one-line errors naming the fix."""
        if cfg is None:
            return None
        cfg = dict(cfg)
        unknown = sorted(set(cfg) - {"rank", "alpha", "target_modules", "dropout", "base"})
        if unknown:
            raise ValueError(
                f"model.lora has unknown keys {unknown}: use rank, alpha, target_modules, dropout, base"
            )
        rank = cfg.get("rank", 0)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(
                f"model.lora.rank={rank!r} must be a whole number >= 1 (0 turns LoRA off): e.g. 8"
            )
        if rank == 0:
            return None
        targets = cfg.get("target_modules") or DEFAULT_TARGETS
        targets = (targets,) if isinstance(targets, str) else tuple(str(t) for t in targets)
        alpha = cfg.get("alpha")
        dropout = float(cfg.get("dropout") or 0.0)
        if alpha is not None and float(alpha) <= 0:
            raise ValueError(f"model.lora.alpha={alpha} must be > 0 (or null for alpha = rank)")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"model.lora.dropout={dropout} must be in [0, 1)")
        base = cfg.get("base")
        return cls(
            rank,
            None if alpha is None else float(alpha),
            targets,
            dropout,
            None if base is None else str(base),
        )

    @property
    def scale(self) -> float:
        """alpha / r: the factor on B A x."""
        return (self.alpha if self.alpha is not None else float(self.rank)) / self.rank

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d


def is_lora_key(name: str) -> bool:
    """True for a peft adapter tensor name (``...lora_A.default.weight``, ``...lora_B.default.weight``)."""
    return LORA_MARK in f".{name}"


def add_lora(net: nn.Module, settings: LoraSettings, seed: int = 0) -> nn.Module:
    """Wrap ``net``'s target linear layers with LoRA adapters in place; only adapter parameters keep
    requires_grad.

    A is drawn from its own generator (``seed``), so the adapter's start does not depend on, or move, the
    global random state. A target that matches no layer is a one-line error."""
    from peft import LoraConfig, inject_adapter_in_model

    names = [n for n, _ in net.named_modules()]
    for target in settings.target_modules:
        if not any(n == target or n.endswith(f".{target}") for n in names):
            raise ValueError(
                f"model.lora.target_modules: '{target}' matches no layer of {type(net).__name__}: use names "
                f"such as {list(DEFAULT_TARGETS)}"
            )
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha if settings.alpha is not None else settings.rank,
        target_modules=list(settings.target_modules),
        lora_dropout=settings.dropout,
        init_lora_weights=True,  # A: Kaiming-uniform, B: zero -> the adapted net equals the base at init
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, net, adapter_name=ADAPTER)
    for name, param in net.named_parameters():
        param.requires_grad_(is_lora_key(name))
    return net


def lora_layers(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, peft LoraLayer) pairs of ``net``."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in net.named_modules() if isinstance(m, LoraLayer)]


def has_lora(net: nn.Module) -> bool:
    return bool(lora_layers(net))


def base_key(name: str) -> str:
    """A LoRA-wrapped net's base tensor name -> the plain net's (``to_q.base_layer.weight`` ->
    ``to_q.weight``)."""
    return name.replace(BASE_LAYER + ".", ".")


def base_state_dict(net: nn.Module) -> dict[str, Tensor]:
    """The base network's tensors under the plain net's names (adapters left out); works on plain nets too."""
    return {base_key(k): v for k, v in net.state_dict().items() if not is_lora_key(k)}


def lora_state_dict(net: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors only: {``<layer>.lora_A.default.weight``: (r, in),
    ``<layer>.lora_B.default.weight``: (out, r)}."""
    return {k: v for k, v in net.state_dict().items() if is_lora_key(k)}


def state_sha256(state: Mapping[str, Tensor]) -> str:
    """sha256 over sorted names, dtypes, shapes and the raw bytes of every tensor: the identity of a set of
    weights."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@torch.no_grad()
def merge_lora(net: nn.Module, scale: float = 1.0) -> nn.Module:
    """Fold every adapter into its base layer, W <- W + scale (alpha / r) B A, and unwrap: the plain net again
    (same module names and state-dict keys as before ``add_lora``). ``scale`` is the LoRA strength (0 = the
    base)."""
    for name, layer in lora_layers(net):
        for adapter in list(layer.lora_A.keys()):
            layer.scaling[adapter] *= float(scale)
        layer.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        setattr(parent, child, layer.get_base_layer())
    return net


def lora_delta_weights(net: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """{layer name: (B * alpha / r (out, r), A (r, in))} of every adapted layer: the scale folded into B, so
    W + B' A is the merged weight at LoRA strength 1."""
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for name, layer in lora_layers(net):
        a = layer.lora_A[ADAPTER].weight.detach()
        b = layer.lora_B[ADAPTER].weight.detach() * layer.scaling[ADAPTER]
        out[name] = (b, a)
    return out
