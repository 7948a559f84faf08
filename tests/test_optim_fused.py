"""configs/optim/adamw.yaml builds a fused AdamW: equal to torch's for-loop AdamW within float rounding, and
it leaves parameters without a gradient untouched (what callbacks.nonfinite.action=skip relies on)."""

from __future__ import annotations

import copy

import torch
from hydra.utils import instantiate

from ldm.config_utils import compose_config


def test_configured_adamw_is_fused_and_matches_the_for_loop() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.SiLU(), torch.nn.Linear(32, 4))
    frozen = torch.nn.Linear(3, 3)
    reference = copy.deepcopy(net)
    fused = instantiate(compose_config("train", ["optim.weight_decay=0.01"]).optim)(
        [*net.parameters(), *frozen.parameters()]
    )
    assert fused.defaults["fused"] is True
    loop = torch.optim.AdamW(
        reference.parameters(), lr=fused.defaults["lr"], weight_decay=0.01, foreach=False
    )
    before = [p.detach().clone() for p in frozen.parameters()]
    x = torch.randn(64, 16)
    for _ in range(5):
        for model, opt in ((net, fused), (reference, loop)):
            opt.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            opt.step()
    for a, b in zip(net.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(frozen.parameters(), before, strict=True))
