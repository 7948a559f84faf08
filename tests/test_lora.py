"""LoRA via peft (model.lora): equal to the base at init, only adapters train, merged == unmerged, small
exact-resume checkpoints that reference their base by sha256, sample.py merging at lora_scale, diffusers LoRA
export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from safetensors.torch import save_file

import prepare
import sample
import train
from ldm.config_utils import compose_config
from ldm.convert.sd_checkpoint import unet_to_ldm_state_dict
from ldm.lit.checkpoint_io import load_checkpoint_file
from ldm.lit.loading import load_for_sampling
from ldm.lit.lora_base import attach_lora, checkpoint_net_weights
from ldm.lora import (
    LoraSettings,
    add_lora,
    base_state_dict,
    is_lora_key,
    lora_state_dict,
    merge_lora,
    state_sha256,
)
from ldm.nets.unet import UNet

LORA = ("++model.lora.rank=4", "++model.lora.alpha=8")


def tiny_unet() -> UNet:
    """configs/net/unet_tiny with its zero-initialised layers made random, so that every layer matters."""
    torch.manual_seed(0)
    net = UNet(
        in_channels=4,
        out_channels=4,
        model_channels=32,
        channel_mult=[1, 2],
        num_res_blocks=1,
        attention_resolutions=[2],
        num_heads=2,
        context_dim=384,
        norm_groups=8,
    )
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return net


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.tensor([10.0, 700.0]),
        torch.randn(2, 5, 384, generator=g),
    )


def test_lora_starts_as_the_base_and_only_adapters_change() -> None:
    net = tiny_unet()
    x, t, ctx = inputs()
    base_out, base_state = net(x, t, context=ctx), {k: v.clone() for k, v in net.state_dict().items()}
    add_lora(net, LoraSettings(rank=4))
    assert torch.equal(net(x, t, context=ctx), base_out)  # B = 0 at init: bitwise the base
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable and all(is_lora_key(n) for n in trainable)
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in trainable} == {"to_q", "to_k", "to_v", "0"}
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    net(x, t, context=ctx).square().mean().backward()
    opt.step()
    after = net.state_dict()
    changed = {
        k for k in after if not torch.equal(after[k], base_state.get(k.replace(".base_layer", ""), after[k]))
    }
    assert base_state_dict(net).keys() == base_state.keys()
    assert all(
        torch.equal(v, base_state[k]) for k, v in base_state_dict(net).items()
    )  # the base is untouched
    assert not changed - set(lora_state_dict(net))
    assert any("lora_B" in k for k in lora_state_dict(net) if after[k].any())  # B moved off zero


def test_merged_equals_unmerged_and_scale_zero_is_the_base() -> None:
    net = tiny_unet()
    x, t, ctx = inputs()
    base_out, keys = net(x, t, context=ctx), list(net.state_dict())
    add_lora(net, LoraSettings(rank=4, alpha=2.0))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    adapters = {k: v.clone() for k, v in lora_state_dict(net).items()}
    unmerged = net(x, t, context=ctx)
    assert (unmerged - base_out).abs().max() > 1e-2  # the adapters do something
    merged = merge_lora(net)
    assert list(merged.state_dict()) == keys  # the plain net again
    assert torch.allclose(merged(x, t, context=ctx), unmerged, atol=1e-5, rtol=0)
    zero = add_lora(tiny_unet(), LoraSettings(rank=4, alpha=2.0))
    zero.load_state_dict(adapters, strict=False)
    assert torch.allclose(merge_lora(zero, scale=0.0)(x, t, context=ctx), base_out, atol=1e-6, rtol=0)


def test_bad_lora_settings_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match="unknown keys"):
        LoraSettings.from_config({"rank": 4, "rnak": 2})
    with pytest.raises(ValueError, match="whole number"):
        LoraSettings.from_config({"rank": -1})
    assert LoraSettings.from_config({"rank": 0}) is None and LoraSettings.from_config(None) is None
    with pytest.raises(ValueError, match="matches no layer"):
        add_lora(tiny_unet(), LoraSettings(rank=2, target_modules=("to_qq",)))


def test_init_from_base_is_referenced_by_sha256(tmp_path: Path) -> None:
    """model.init_from=ldm:<file> as the base: the reference is the sha256 of exactly those weights."""
    base = tiny_unet()
    save_file(unet_to_ldm_state_dict(base), tmp_path / "base.safetensors")
    fresh = UNet(
        in_channels=4,
        out_channels=4,
        model_channels=32,
        channel_mult=[1, 2],
        num_res_blocks=1,
        attention_resolutions=[2],
        num_heads=2,
        context_dim=384,
        norm_groups=8,
    )
    source = {"kind": "init_from", "spec": f"ldm:{tmp_path / 'base.safetensors'}", "ignore": []}
    ref = attach_lora(fresh, LoraSettings(rank=2), source)
    assert ref["sha256"] == state_sha256(base.state_dict()) and ref["source"] == source
    x, t, ctx = inputs()
    assert torch.equal(fresh(x, t, context=ctx), base(x, t, context=ctx))


@pytest.fixture(scope="module")
def lora_run(tiny_data: dict, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 LoRA steps on the tiny checkpoint, checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("lora") / "run"
    extra = (
        *LORA,
        f"++model.lora.base={tiny_checkpoint}",
        "trainer.max_steps=4",
        "optim.lr=1e-2",
        "callbacks.model_checkpoint.every_n_train_steps=2",
    )
    assert train.run(compose_config("train", tiny_overrides(tiny_data, out, *extra)))["global_step"] == 4
    return out


def test_lora_checkpoint_holds_adapters_and_base_reference(lora_run: Path, tiny_checkpoint: Path) -> None:
    ckpt = load_checkpoint_file(lora_run / "checkpoints" / "last.ckpt")
    net_keys = [k for k in ckpt["state_dict"] if k.startswith("denoiser.net.")]
    assert net_keys and all(is_lora_key(k) for k in net_keys)
    assert set(ckpt["ema_state_dict"]) == {k.removeprefix("denoiser.net.") for k in net_keys}
    assert len(ckpt["optimizer_states"][0]["state"]) == len(net_keys)  # the optimizer holds only the adapters
    base = checkpoint_net_weights(tiny_checkpoint)
    assert ckpt["lora"]["base"]["sha256"] == state_sha256(base)
    assert ckpt["lora"]["settings"]["rank"] == 4 and ckpt["lora"]["settings"]["alpha"] == 8
    lora_bytes = (lora_run / "checkpoints" / "last.ckpt").stat().st_size
    full_bytes = tiny_checkpoint.stat().st_size
    assert lora_bytes < 0.1 * full_bytes, (lora_bytes, full_bytes)


def test_lora_resume_is_exact(lora_run: Path, tiny_data: dict, tiny_checkpoint: Path, tmp_path: Path) -> None:
    extra = (
        *LORA,
        f"++model.lora.base={tiny_checkpoint}",
        "trainer.max_steps=4",
        "optim.lr=1e-2",
        f"ckpt_path={lora_run / 'checkpoints' / 'step_000002.ckpt'}",
    )
    train.run(compose_config("train", tiny_overrides(tiny_data, tmp_path / "resumed", *extra)))
    a = load_checkpoint_file(lora_run / "checkpoints" / "last.ckpt")
    b = load_checkpoint_file(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert b["global_step"] == 4
    for key in ("state_dict", "ema_state_dict"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def _sample(ckpt: Path, out: Path, *extra: str) -> bytes:
    records = sample.run(
        compose_config(
            "sample",
            [
                f"ckpt={ckpt}",
                f"out_dir={out}",
                "prompt=red apple",
                "num_images=1",
                "steps=3",
                "seed=3",
                *extra,
            ],
        )
    )
    return (out / records[0]["file"]).read_bytes()


def test_sample_merges_lora_at_lora_scale(lora_run: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    lora_ckpt = lora_run / "checkpoints" / "last.ckpt"
    base = _sample(tiny_checkpoint, tmp_path / "base")
    assert _sample(lora_ckpt, tmp_path / "zero", "lora_scale=0") == base  # strength 0: the base exactly
    # at strength 1 the merged weights move (a 4-step LoRA on a 3-step base moves the 8-bit image too little)
    base_net = load_for_sampling(tiny_checkpoint, True, torch.device("cpu")).denoiser.net.state_dict()
    merged = load_for_sampling(
        lora_ckpt, False, torch.device("cpu"), lora_scale=1.0
    ).denoiser.net.state_dict()
    changed = {k for k in base_net if not torch.equal(base_net[k], merged[k])}
    assert changed and all(k.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v", "0") for k in changed), changed
    moved = tmp_path / "moved.ckpt"
    with pytest.raises(FileNotFoundError, match="lora_base="):
        _sample(lora_ckpt, tmp_path / "x", f"lora_base={moved}")


def test_other_base_is_refused() -> None:
    from ldm.lit.lora_base import check_same_base

    with pytest.raises(ValueError, match="trained on base weights"):
        check_same_base({"sha256": "a" * 64, "source": {}}, {"sha256": "b" * 64, "source": {}}, "x.ckpt")


def test_diffusers_lora_equals_our_merged_lora(tmp_path: Path) -> None:
    """Random base and random adapters (every layer matters): save_diffusers_lora -> pipe.load_lora_weights;
    the pipeline's UNet equals our merged net at strength 1 and 0.4 (diffusers' cross_attention_kwargs
    scale)."""
    from diffusers import StableDiffusionPipeline

    from ldm.convert import unet_to_diffusers
    from ldm.convert.diffusers_lora import save_diffusers_lora

    net = add_lora(tiny_unet(), LoraSettings(rank=4, alpha=8.0))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    save_diffusers_lora(tmp_path / "lora", net)
    x, t, ctx = inputs()
    for scale in (1.0, 0.4):
        pipe = StableDiffusionPipeline(
            vae=None,
            text_encoder=None,
            tokenizer=None,
            unet=unet_to_diffusers(tiny_unet()).eval(),
            scheduler=None,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.load_lora_weights(tmp_path / "lora")
        ours = add_lora(tiny_unet(), LoraSettings(rank=4, alpha=8.0))
        ours.load_state_dict(lora_state_dict(net), strict=False)
        merged = merge_lora(ours, scale)
        with torch.no_grad():
            out = merged(x, t, context=ctx)
            ref = pipe.unet(x, t, encoder_hidden_states=ctx, cross_attention_kwargs={"scale": scale}).sample
        assert (out - tiny_unet()(x, t, context=ctx)).abs().max() > 1e-2  # the adapters matter
        torch.testing.assert_close(ref, out, rtol=0, atol=1e-5)


def test_export_lora_loads_into_a_diffusers_pipeline(
    lora_run: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """prepare.py export-diffusers (the base) + export-lora of a train.py LoRA run -> pipe.load_lora_weights:
    every adapter loads, and the pipeline's UNet equals our merged LoRA net (this base's zero-initialised
    output layers keep outputs small: the exact check with random weights is the test above)."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from ldm.convert.diffusers_lora import INFO_NAME, WEIGHT_NAME

    lora_ckpt = lora_run / "checkpoints" / "last.ckpt"
    prepare.main(
        [
            "export-diffusers",
            "--ckpt",
            str(tiny_checkpoint),
            "--out",
            str(tmp_path / "sd"),
            "--allow-padding-attention",
        ]
    )
    prepare.main(["export-lora", "--ckpt", str(lora_ckpt), "--out", str(tmp_path / "lora"), "--raw-weights"])
    assert (tmp_path / "lora" / INFO_NAME).is_file()
    exported = load_file(str(tmp_path / "lora" / WEIGHT_NAME))
    adapters = load_checkpoint_file(lora_ckpt)["ema_state_dict"]
    assert len(exported) == len(adapters) and all(k.startswith("unet.") for k in exported)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "sd", local_files_only=True)
    pipe.load_lora_weights(tmp_path / "lora")
    x, t, ctx = inputs()
    ours = load_for_sampling(lora_ckpt, False, torch.device("cpu"), lora_scale=1.0).denoiser.net
    with torch.no_grad():
        out = ours(x, t, context=ctx, context_mask=torch.ones(ctx.shape[:2], dtype=torch.bool))
        ref = pipe.unet(x, t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(ref, out, rtol=0, atol=1e-5)
    with pytest.raises(FileExistsError, match="choose another --out"):
        prepare.main(["export-lora", "--ckpt", str(lora_ckpt), "--out", str(tmp_path / "lora")])
    with pytest.raises(ValueError, match="not a LoRA checkpoint .* export-diffusers"):
        prepare.main(["export-lora", "--ckpt", str(tiny_checkpoint), "--out", str(tmp_path / "x")])
