"""Weight/config conversion between diffusers' UNet2DConditionModel, the original single-file LDM layout
and our UNet (ldm/convert). Tiny random models saved to tmp_path; no hub."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ldm.convert import (
    convert_state_dict,
    diffusers_config_to_unet_kwargs,
    unet_from_diffusers,
    unet_to_diffusers,
    unet_to_diffusers_config,
)
from ldm.convert.sd_checkpoint import (
    LDM_UNET_PREFIX,
    ldm_unet_params_to_kwargs,
    read_ldm_unet_state_dict,
    unet_from_ldm_checkpoint,
    unet_to_ldm_state_dict,
)
from ldm.convert.unet_keys import meta_unet
from ldm.nets import UNet
from ldm.nets.layers import Attention

CTX = 12
REPO = Path(__file__).resolve().parents[1]

SD1_LIKE = dict(  # SD 1.x layout: 3 cross-attention levels of 4, int attention_head_dim (= heads), conv proj
    sample_size=8,
    block_out_channels=(16, 32, 32),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=CTX,
    attention_head_dim=4,
    norm_num_groups=8,
)
SD2_LIKE = dict(  # SD 2.x layout: linear proj, heads per block at a fixed head width (8), upcast attention
    sample_size=8,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=CTX,
    attention_head_dim=[2, 4, 8],
    use_linear_projection=True,
    upcast_attention=True,
    transformer_layers_per_block=2,
    norm_num_groups=8,
)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (two threads on a busy 2-core machine spend seconds syncing)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def jitter(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random offsets on every parameter (zero-initialised convs included) so every tensor matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def inputs(ctx_dim: int = CTX, side: int = 8) -> tuple[torch.Tensor, ...]:
    """x_t (2, 4, side, side); t (2,) fractional timesteps; context (2, 5, D); mask (2, 5) with padding."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, side, side, generator=g)
    t = torch.tensor([3.0, 871.25])
    ctx = torch.randn(2, 5, ctx_dim, generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    return x, t, ctx, mask


def assert_same_output(ours: UNet, theirs: torch.nn.Module, ctx_dim: int = CTX) -> None:
    """ours(x_t, t, context, mask) == unet(x_t, t, encoder_hidden_states, encoder_attention_mask).sample."""
    x, t, ctx, mask = inputs(ctx_dim)
    with torch.no_grad():
        ref = theirs(x, t, encoder_hidden_states=ctx, encoder_attention_mask=mask.long()).sample
        out = ours(x, t, context=ctx, context_mask=mask)
    assert ref.abs().mean() > 1e-2
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def saved_diffusers_unet(tmp_path: Path, config: dict, subfolder: str | None = None) -> UNet2DConditionModel:
    torch.manual_seed(0)
    model = jitter(UNet2DConditionModel(**config))
    model.save_pretrained(tmp_path / subfolder if subfolder else tmp_path)
    return model


def test_sd1_like_from_directory_matches(tmp_path: Path) -> None:
    reference = saved_diffusers_unet(tmp_path, SD1_LIKE)
    ours, report = unet_from_diffusers(tmp_path)
    kw = report.unet_kwargs
    assert (kw["model_channels"], kw["channel_mult"], kw["num_res_blocks"]) == (16, [1, 2, 2], 2)
    assert (kw["attention_resolutions"], kw["num_heads"], kw["num_head_channels"]) == ([1, 2], 4, None)
    assert report.num_tensors == len(reference.state_dict()) and report.ignored_fields["sample_size"] == 8
    assert_same_output(ours, UNet2DConditionModel.from_pretrained(tmp_path).eval())


def test_sd2_like_from_pipeline_directory_matches(tmp_path: Path) -> None:
    saved_diffusers_unet(tmp_path, SD2_LIKE, subfolder="unet")  # pipeline layout: <dir>/unet/config.json
    ours, report = unet_from_diffusers(tmp_path)
    kw = report.unet_kwargs
    assert (kw["num_head_channels"], kw["transformer_depth"]) == (8, 2)
    assert kw["use_linear_projection"] and kw["upcast_attention"]
    assert_same_output(ours, UNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet").eval())


def test_ours_to_diffusers_to_ours_is_bitwise() -> None:
    torch.manual_seed(0)
    net = jitter(UNet(**diffusers_config_to_unet_kwargs(SD2_LIKE)))
    theirs = unet_to_diffusers(net)
    assert_same_output(net, theirs)
    back, _ = unet_from_diffusers(theirs)
    a, b = net.state_dict(), back.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    cfg = unet_to_diffusers_config(net)
    assert diffusers_config_to_unet_kwargs(cfg)["num_head_channels"] == 8


def test_default_emoji_unet_to_diffusers_matches() -> None:
    node = OmegaConf.load(REPO / "configs/net/unet_small.yaml")
    kwargs = OmegaConf.to_container(OmegaConf.create({"net": node}).net, resolve=True)
    kwargs.pop("_target_")
    # the default has one GroupNorm group count (16) at every width, as diffusers' norm_num_groups: it
    # converts exactly; with gcd(32, width) groups (16 at 48 channels, 32 at 96) it is refused in one line
    assert kwargs["norm_groups"] == 16
    with pytest.raises(ValueError, match="norm_groups=32 does not divide the 48 channels"):
        unet_to_diffusers(UNet(**{**kwargs, "norm_groups": 32}), sample_size=8)
    torch.manual_seed(0)
    net = jitter(UNet(**kwargs))
    theirs = unet_to_diffusers(net, sample_size=8)
    assert theirs.config.sample_size == 8 and theirs.config.cross_attention_dim == 384
    assert_same_output(net, theirs, ctx_dim=384)


def test_ldm_single_file_matches_diffusers_own_converter(tmp_path: Path) -> None:
    """ours -> model.diffusion_model.* (.safetensors and .ckpt) -> ours is bitwise; diffusers' own
    single-file converter turns our LDM layout into exactly the diffusers weights."""
    torch.manual_seed(0)
    net = jitter(UNet(**diffusers_config_to_unet_kwargs(SD1_LIKE)))
    flat = unet_to_ldm_state_dict(net)
    assert "model.diffusion_model.input_blocks.1.0.in_layers.0.weight" in flat
    assert "model.diffusion_model.input_blocks.3.0.op.weight" in flat
    assert "model.diffusion_model.middle_block.1.transformer_blocks.0.ff.net.0.proj.weight" in flat
    save_file({k: v.contiguous() for k, v in flat.items()}, tmp_path / "sd.safetensors")
    torch.save({"state_dict": flat}, tmp_path / "sd.ckpt")
    kwargs = diffusers_config_to_unet_kwargs(SD1_LIKE)
    for name in ("sd.safetensors", "sd.ckpt"):
        back = unet_from_ldm_checkpoint(tmp_path / name, kwargs).state_dict()
        assert all(torch.equal(v, back[k]) for k, v in net.state_dict().items())
    theirs = convert_ldm_unet_checkpoint(flat, unet_to_diffusers_config(net))
    ours_as_diffusers = convert_state_dict(net.state_dict(), net, "ours", "diffusers")
    assert sorted(theirs) == sorted(ours_as_diffusers)
    assert all(torch.equal(theirs[k], ours_as_diffusers[k]) for k in theirs)
    params = dict(
        in_channels=4,
        out_channels=4,
        model_channels=16,
        channel_mult=[1, 2, 2],
        num_res_blocks=2,
        attention_resolutions=[1, 2],
        num_heads=4,
        context_dim=CTX,
        use_spatial_transformer=True,
        legacy=False,
        image_size=8,
        use_checkpoint=True,
    )
    from_yaml = ldm_unet_params_to_kwargs(params)  # the YAML's unet_config.params: same net (norms aside)
    assert from_yaml == {k: kwargs[k] for k in from_yaml}
    assert read_ldm_unet_state_dict(tmp_path / "sd.ckpt").keys() == {k[len(LDM_UNET_PREFIX) :] for k in flat}
    with pytest.raises(ValueError, match="field use_scale_shift_norm=True"):
        ldm_unet_params_to_kwargs({**params, "use_scale_shift_norm": True})


SD15_CONFIG = dict(  # the published SD 1.5 / SD 2.1 UNet config.json values that matter
    block_out_channels=[320, 640, 1280, 1280],
    cross_attention_dim=768,
    layers_per_block=2,
    attention_head_dim=8,
    sample_size=64,
)


@pytest.mark.parametrize(
    ("config", "params"),
    [
        (SD15_CONFIG, 859_520_964),
        (
            {
                **SD15_CONFIG,
                "attention_head_dim": [5, 10, 20, 20],
                "cross_attention_dim": 1024,
                "use_linear_projection": True,
                "upcast_attention": True,
            },
            865_910_724,
        ),
    ],
)
def test_real_sd_configs_give_the_published_parameter_counts(config: dict, params: int) -> None:
    net = meta_unet(diffusers_config_to_unet_kwargs(config))  # meta device: no memory, no init
    assert sum(p.numel() for p in net.parameters()) == params


def test_upcast_attention_runs_in_bfloat16() -> None:
    torch.manual_seed(0)
    attn = Attention(32, 16, 4, 0.0, upcast=True).eval()
    x, ctx = torch.randn(2, 6, 32), torch.randn(2, 5, 16)
    with torch.no_grad():
        ref = attn(x, ctx)
        out = attn.to(torch.bfloat16)(x.bfloat16(), ctx.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("flip_sin_to_cos", False),
        ("freq_shift", 1),
        ("act_fn", "gelu"),
        ("addition_embed_type", "text_time"),
        ("class_embed_type", "timestep"),
        ("resnet_time_scale_shift", "scale_shift"),
        ("only_cross_attention", True),
        ("mid_block_type", "UNetMidBlock2D"),
        ("time_cond_proj_dim", 256),
        ("norm_num_groups", None),
        ("block_out_channels", (16, 24, 32)),
        ("up_block_types", ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D")),
        ("attention_head_dim", [2, 3, 5]),
        ("transformer_layers_per_block", [1, 2, 1]),
        ("layers_per_block", [1, 2, 2]),
        ("a_future_field", 7),
    ],
)
def test_unsupported_diffusers_fields_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"field {field}=") as err:
        diffusers_config_to_unet_kwargs({**SD1_LIKE, field: value})
    assert "\n" not in str(err.value)


def test_unexportable_unets_are_refused() -> None:
    with pytest.raises(ValueError, match="context_dim=None"):
        unet_to_diffusers_config(UNet(model_channels=16, context_dim=None, norm_groups=8))
    with pytest.raises(ValueError, match="norm_groups=32 does not divide"):
        unet_to_diffusers_config(UNet(model_channels=48, num_heads=4, context_dim=CTX))
    with pytest.raises(ValueError, match="1 missing keys"):
        net = UNet(model_channels=16, context_dim=CTX, norm_groups=8)
        sd = convert_state_dict(net.state_dict(), net, "ours", "diffusers")
        convert_state_dict({k: v for k, v in sd.items() if k != "conv_in.bias"}, net, "diffusers", "ours")
