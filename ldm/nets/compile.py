"""``torch.compile`` of a backbone, in place: the whole net, or each repeated block ("regional" compilation).

``nn.Module.compile`` compiles a module's ``__call__`` in place, so the module tree, its parameters and its
``state_dict`` keys stay exactly as in eager mode (no ``_orig_mod.`` prefix): checkpoints, the EMA copy,
``load_state_dict`` and the diffusers converters see the same net whether it is compiled or not.

- ``full``: one graph for the whole backbone; the fastest steady state, the longest first step.
- ``regional``: each ResBlock / SpatialTransformer / DiT block is compiled on its own; blocks of one shape
  share a compiled graph, so the first step is shorter on deep nets (SD: 16 ResBlocks, 16 transformers), at
  the cost of graph breaks between blocks.

Shapes are static (``dynamic=False``): a new batch size or latent size compiles once more (CFG doubles the
batch at sampling). Compilation happens at the first call, not here.
"""

from __future__ import annotations

from torch import nn

from ldm.nets.dit import DiTBlock
from ldm.nets.layers import ResBlock, SpatialTransformer

COMPILE_MODES = ("none", "regional", "full")
REGIONS: tuple[type[nn.Module], ...] = (ResBlock, SpatialTransformer, DiTBlock)


def compile_mode(value: bool | str | None) -> str:
    """``model.compile``: true -> full, false/null -> none, or one of COMPILE_MODES by name."""
    if value is None or value is False:
        return "none"
    if value is True:
        return "full"
    if value not in COMPILE_MODES:
        raise ValueError(f"model.compile={value!r}: choose true, false or one of {', '.join(COMPILE_MODES)}")
    return value


def compile_backbone(net: nn.Module, mode: bool | str | None, backend: str = "inductor") -> nn.Module:
    """Compile ``net`` in place (see the module docstring) and return it; ``none`` leaves it eager.
    ``backend`` is torch.compile's (tests use ``aot_eager``: the same tracing, no code generation)."""
    mode = compile_mode(mode)
    if mode == "full":
        net.compile(dynamic=False, backend=backend)
    elif mode == "regional":
        regions = [m for m in net.modules() if isinstance(m, REGIONS)]
        if not regions:
            raise ValueError(
                f"model.compile=regional: {type(net).__name__} has no "
                f"{', '.join(r.__name__ for r in REGIONS)} "
                "blocks; use model.compile=full"
            )
        for module in regions:
            module.compile(dynamic=False, backend=backend)
    return net


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` or any sub-module was compiled in place by ``compile_backbone``."""
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())
