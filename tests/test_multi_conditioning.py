"""Several conditioners per model (ldm/conditioning/multi.py): the proofs of issue 10, section 2.

- at init, a zero-initialised vector input leaves the outputs of the UNet and the DiT unchanged;
- after a few training steps, changing the size conditioning changes the output;
- guidance with a per-conditioner drop equals its formula (size kept, label nulled);
- a single conditioner is a list of one: the same cond dict as the conditioner alone;
- concat channels reach the net, text + label together merge into one context.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ldm.conditioning import (
    ClassConditioner,
    ConcatConditioner,
    MultiConditioner,
    SizeConditioner,
    size_inputs,
)
from ldm.conditioning.multi import as_multi, sampling_inputs
from ldm.diffusion import Denoiser, DiffusionLoss, DiscreteSchedule
from ldm.nets.dit import DiT
from ldm.nets.unet import UNet
from ldm.sampling import CFGDenoiser

UNET = dict(
    in_channels=4,
    model_channels=16,
    channel_mult=(1, 2),
    attention_resolutions=(2,),
    num_heads=2,
    context_dim=8,
    norm_groups=8,
)
DIT = dict(in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=2, context_dim=8)


def build(cls: type[nn.Module], kwargs: dict, **extra) -> nn.Module:
    torch.manual_seed(0)
    net = cls(**kwargs, **extra)
    with torch.no_grad():  # non-zero outputs everywhere, except the new vector input's zero-initialised layer
        for name, p in net.named_parameters():
            if not name.startswith("vector_embed.2") and not p.any():
                p.normal_(0, 0.05)
    return net


@pytest.mark.parametrize("cls, kwargs", [(UNet, UNET), (DiT, DIT)], ids=["unet", "dit"])
def test_a_zero_initialised_vector_input_leaves_the_outputs_unchanged(
    cls: type[nn.Module], kwargs: dict
) -> None:
    plain, with_vector = build(cls, kwargs), build(cls, kwargs, vector_dim=48)
    missing, unexpected = with_vector.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("vector_embed.") for k in missing)
    g = torch.Generator().manual_seed(1)
    x, t, ctx = (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.tensor([10.0, 700.0]),
        torch.randn(2, 3, 8, generator=g),
    )
    size = SizeConditioner(embed_dim=8)(size_inputs(2, (64, 32), (300, 100), (5, 7)))["vector"]  # (2, 48)
    assert torch.equal(with_vector(x, t, ctx, vector=size), plain(x, t, ctx))


def test_after_a_few_steps_the_size_conditioning_changes_the_output() -> None:
    sizes = SizeConditioner(embed_dim=8)
    net = build(UNet, UNET, vector_dim=sizes.output_dim)
    schedule = DiscreteSchedule(beta_schedule="linear")
    loss_fn, opt = DiffusionLoss(schedule), torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(4, 3, 8, generator=g)
    for step in range(4):  # latents whose brightness follows original_size
        original = torch.randint(16, 512, (4, 2), generator=g)
        x0 = torch.randn(4, 4, 8, 8, generator=g) + (original[:, :1, None, None] / 256.0)
        vector = sizes(
            {
                "original_size": original,
                **{k: v for k, v in size_inputs(4, (32, 32)).items() if k != "original_size"},
            }
        )["vector"]
        loss = loss_fn(net, x0, context=ctx, generator=torch.Generator().manual_seed(step), vector=vector)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, t = torch.randn(4, 4, 8, 8, generator=g), torch.full((4,), 500.0)
    small, large = (sizes(size_inputs(4, (32, 32), (s, s)))["vector"] for s in (32, 480))
    with torch.no_grad():
        assert (net(x, t, ctx, vector=small) - net(x, t, ctx, vector=large)).abs().max() > 1e-4


def test_guidance_drops_the_guided_conditioners_and_keeps_the_others() -> None:
    """CFG = D(x | null label, size) + s (D(x | label, size) - D(x | null label, size)): the size stays on."""
    labels, sizes = ClassConditioner(3, 8, dropout_prob=0.0), SizeConditioner(embed_dim=8)
    multi = MultiConditioner([labels, sizes])
    den = Denoiser(
        build(UNet, UNET, vector_dim=sizes.output_dim), DiscreteSchedule(beta_schedule="linear")
    ).eval()
    batch = {"cls": torch.tensor([0, 2]), **size_inputs(2, (32, 32), (200, 120), (4, 0))}
    cond, uncond = multi.guidance_pair(batch)
    assert torch.equal(uncond["vector"], cond["vector"])  # size conditioning in both branches
    null = labels(labels.null_inputs(2))["context"]
    assert torch.equal(uncond["context"], null) and not torch.equal(cond["context"], null)
    x, sigma = (
        torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * 4,
        torch.tensor([3.0, 3.0]),
    )
    with torch.no_grad():
        guided = CFGDenoiser(den, cond, uncond, scale=4.0)(x, sigma)
        d_cond = den(x, sigma, **multi(batch))
        d_uncond = den(x, sigma, **multi({**batch, "cls": torch.tensor([3, 3])}))
    torch.testing.assert_close(guided, d_uncond + 4.0 * (d_cond - d_uncond), rtol=1e-5, atol=1e-5)


def test_per_conditioner_dropout_draws_each_at_its_own_rate() -> None:
    labels, sizes = ClassConditioner(3, 8, dropout_prob=1.0), SizeConditioner(embed_dim=8, dropout_prob=0.0)
    batch = {"cls": torch.tensor([0, 1, 2, 1]), **size_inputs(4, (32, 32), (64, 64))}
    out = MultiConditioner([labels, sizes])(batch, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out["context"], labels(labels.null_inputs(4))["context"])  # p = 1: every label dropped
    assert torch.equal(out["vector"], sizes(batch)["vector"])  # p = 0: every size kept


def test_a_single_conditioner_is_a_list_of_one() -> None:
    labels = ClassConditioner(5, 8)
    alone = labels(torch.tensor([1, 4]))
    via = as_multi(labels)({"cls": torch.tensor([1, 4])})
    assert alone.keys() == via.keys() and all(torch.equal(alone[k], via[k]) for k in alone)
    assert sampling_inputs(labels, None, ["1", 4]) == [1, 4]  # the old generate() path: a list of ids


def test_text_and_label_tokens_and_concat_channels_merge() -> None:
    a, b = ClassConditioner(3, 8), ClassConditioner(4, 8, labels=["w", "x", "y", "z"])
    concat = ConcatConditioner(5, batch_key="masked")
    multi = MultiConditioner([a, b, concat])
    extra = torch.randn(2, 5, 8, 8)
    cond = multi({"cls": torch.tensor([0, 1]), "masked": extra})  # both label conditioners read "cls"
    assert cond["context"].shape == (2, 2, 8) and cond["context_mask"].all()
    assert torch.equal(cond["concat"], extra)
    _, uncond = multi.guidance_pair({"cls": torch.tensor([0, 1]), "masked": extra})
    assert torch.equal(uncond["concat"], extra)  # inpainting input kept, as the SD inpainting pipeline does
    net = build(UNet, UNET, concat_channels=5)
    out = net(
        torch.randn(2, 4, 8, 8),
        torch.tensor([1.0, 2.0]),
        cond["context"],
        cond["context_mask"],
        concat=cond["concat"],
    )
    assert out.shape == (2, 4, 8, 8)
    assert b.label_id("y") == 2 and b.label_id("3") == 3
    with pytest.raises(ValueError, match="not in the model's vocabulary"):
        b.label_id("q")


def test_wrong_vector_width_names_the_fix() -> None:
    net = build(UNet, UNET, vector_dim=12)
    with pytest.raises(ValueError, match="set net.vector_dim"):
        net(torch.randn(1, 4, 8, 8), torch.tensor([1.0]), torch.randn(1, 2, 8), vector=torch.randn(1, 7))
    with pytest.raises(ValueError, match="set net.vector_dim"):
        net(torch.randn(1, 4, 8, 8), torch.tensor([1.0]), torch.randn(1, 2, 8))
