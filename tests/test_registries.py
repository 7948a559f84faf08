"""The extension points are registries, and every list that names samplers or nets is checked against them.

A sampler function without a registry entry, a registry entry without configs/sampler/<name>.yaml, a diffusers
parity test or a row in the README's sampler table, or a config naming an unregistered sampler fails here; so
does a net config whose class is not a registered backbone or whose DiT size disagrees with ``DIT_SIZES``.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import ldm.sampling
from ldm.nets import BACKBONES, DIT_SIZES
from ldm.sampling.registry import SAMPLERS, check_sampler, sampler_name

ROOT = Path(__file__).resolve().parents[1]
SAMPLER_CONFIGS = {p.stem: OmegaConf.load(p) for p in sorted((ROOT / "configs" / "sampler").glob("*.yaml"))}
NET_CONFIGS = {p.stem: OmegaConf.load(p) for p in sorted((ROOT / "configs" / "net").glob("*.yaml"))}
PARITY_TESTS = ("test_sampler_parity.py", "test_sampling.py")


def resolve(target: str):
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_every_sampler_config_names_its_registered_function() -> None:
    assert set(SAMPLER_CONFIGS) == set(SAMPLERS), (
        "configs/sampler/*.yaml and SAMPLERS must list the same names"
    )
    for name, cfg in SAMPLER_CONFIGS.items():
        assert resolve(cfg._target_) is SAMPLERS[name].fn, f"configs/sampler/{name}.yaml: {cfg._target_}"


def test_every_sampler_function_is_registered() -> None:
    registered = {spec.fn for spec in SAMPLERS.values()}
    for module in ("samplers", "solvers", "multistep"):
        mod = importlib.import_module(f"ldm.sampling.{module}")
        for name, fn in inspect.getmembers(mod, inspect.isfunction):
            if name.startswith("sample_") and fn.__module__ == mod.__name__:
                assert fn in registered, f"{name} has no entry in SAMPLERS (ldm/sampling/registry.py)"
                assert getattr(ldm.sampling, name) is fn, f"export {name} from ldm/sampling/__init__.py"


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_has_a_diffusers_parity_test(name: str) -> None:
    spec = SAMPLERS[name]
    sources = "".join((ROOT / "tests" / f).read_text() for f in PARITY_TESTS)
    assert spec.fn.__name__ in sources and spec.reference in sources, f"no parity test for {name}"


def test_check_sampler_reads_the_registry() -> None:
    class Flow:
        space = "flow"

    assert sampler_name(SAMPLERS["heun"].fn) == "heun"
    check_sampler(SAMPLERS["flow_euler"].fn, Flow())
    with pytest.raises(ValueError, match="rectified flow: use sampler=flow_euler"):
        check_sampler(SAMPLERS["heun"].fn, Flow())
    with pytest.raises(ValueError, match="not registered: add it to SAMPLERS in ldm/sampling/registry.py"):
        check_sampler(lambda d, x, s: x, Flow())


@pytest.mark.parametrize("name", NET_CONFIGS)
def test_every_net_config_builds_a_registered_backbone(name: str) -> None:
    cfg = NET_CONFIGS[name]
    family = name.split("_")[0]
    assert family in BACKBONES, (
        f"configs/net/{name}.yaml: no backbone family {family!r} in ldm.nets.BACKBONES"
    )
    assert resolve(cfg._target_) is BACKBONES[family], f"configs/net/{name}.yaml builds {cfg._target_}"
    if name in DIT_SIZES:
        assert {k: cfg[k] for k in DIT_SIZES[name]} == DIT_SIZES[name], f"{name} disagrees with DIT_SIZES"


def test_every_backbone_has_a_config() -> None:
    assert {name.split("_")[0] for name in NET_CONFIGS} == set(BACKBONES)


def test_readme_sampler_table_lists_every_registered_sampler() -> None:
    """The README's `sampler=` table names each registered sampler, and nothing that is not registered."""
    readme = (ROOT / "README.md").read_text()
    header = readme.index("| `sampler=` | kind |")
    table = readme[header : readme.index("\n\n", header)].splitlines()[2:]  # skip the header and rule rows
    named = {name for row in table for name in re.findall(r"`([a-z0-9_]+)`", row.split("|")[1])}
    assert named == set(SAMPLERS), f"README sampler table vs SAMPLERS: {sorted(named ^ set(SAMPLERS))}"
