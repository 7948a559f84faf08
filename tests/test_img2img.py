"""Image-to-image (SDEdit) and inpainting through ``ldm.generate.generate`` and ``sample.py``: strength 0 is
the init's reconstruction, strength 1 is text-to-image, the kept region of an inpainting ends at the init
latent for every sampler, bad input is a one-line error naming the fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

import sample
from ldm.config_utils import compose_config
from ldm.diffusion.continuous import FlowSchedule
from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.schedules import DiscreteSchedule
from ldm.generate import generate, to_pil
from ldm.img2img import check_init_inputs, keep_mask_latent, truncate_sigmas
from ldm.lit.loading import load_for_sampling
from ldm.nets.unet import UNet
from ldm.sampling.grids import sampling_sigmas
from ldm.sampling.registry import SAMPLERS, samplers_for

SHAPE = (4, 8, 8)


class Prompts(nn.Module):
    """A stand-in text conditioner: a fixed random context per prompt string."""

    def forward(self, prompts: list[str]) -> dict[str, Tensor]:
        ctx = [torch.randn(3, 384, generator=torch.Generator().manual_seed(len(p))) for p in prompts]
        return {"context": torch.stack(ctx)}

    def null_inputs(self, n: int) -> list[str]:
        return [""] * n


def denoiser(schedule=None, prediction: str = "eps") -> Denoiser:
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
    return Denoiser(net, schedule or DiscreteSchedule(beta_schedule="linear"), prediction).eval()


def latents(d: Denoiser, sampler: str, steps: int = 4, **kw) -> Tensor:
    """generate with the identity decoder: the images are the first 3 latent channels, shifted to [0, 1]."""
    seen: list[Tensor] = []

    def decoder(z: Tensor) -> Tensor:
        seen.append(z)
        return z[:, :3]

    sigmas = sampling_sigmas(d.schedule, steps)
    generate(
        d,
        Prompts(),
        decoder,
        ["red apple", "blue heart"],
        sampler=SAMPLERS[sampler].fn,
        sigmas=sigmas,
        latent_shape=SHAPE,
        seeds=[1, 2],
        cfg_scale=2.0,
        **kw,
    )
    return seen[0]


def test_strength_zero_returns_the_init_and_steps_follow_the_strength() -> None:
    d, z0 = denoiser(), torch.randn(2, *SHAPE)
    assert torch.equal(latents(d, "ddim", init_latents=z0, strength=0.0), z0)
    sigmas = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.0])
    assert truncate_sigmas(sigmas, 0.6).tolist() == [1.0, 0.5, 0.0]  # int(4 * 0.6) = 2 of 4 steps run
    assert truncate_sigmas(sigmas, 1.0).tolist() == sigmas.tolist()
    assert truncate_sigmas(sigmas, 0.0).tolist() == [0.0]
    half = latents(d, "ddim", init_latents=z0, strength=0.5)
    assert 0 < (half - z0).abs().mean() < (latents(d, "ddim") - z0).abs().mean()


def test_strength_one_is_text_to_image() -> None:
    """A grid that starts at the max sigma: rectified flow's t = 1 is pure noise, so bitwise text-to-image;
    DDPM's largest sigma keeps a trace of z0 (x = z0 + sigma_max eps against sqrt(1 + sigma_max^2) eps):
    close."""
    flow = denoiser(FlowSchedule(), "flow")
    z0 = torch.randn(2, *SHAPE)
    assert torch.equal(
        latents(flow, "flow_euler", init_latents=z0, strength=1.0), latents(flow, "flow_euler")
    )
    vp = denoiser()
    txt2img = latents(vp, "ddim")
    diff = (latents(vp, "ddim", init_latents=z0, strength=1.0) - txt2img).abs().max()
    assert diff < 0.05 * txt2img.abs().max(), diff


@pytest.mark.parametrize("space", ["ve", "flow"])
def test_inpainting_keeps_the_known_region_for_every_sampler(space: str) -> None:
    d = denoiser() if space == "ve" else denoiser(FlowSchedule(), "flow")
    z0 = torch.randn(2, *SHAPE)
    keep = torch.ones(2, 1, 8, 8)
    keep[:, :, 2:6, 3:7] = 0  # repaint the middle
    for name in samplers_for(space):
        out = latents(d, name, init_latents=z0, strength=1.0, keep_mask=keep)
        assert torch.allclose(out * keep, z0 * keep, atol=1e-5), name  # the kept region: the init latent
        assert ((out - z0) * (1 - keep)).abs().max() > 1e-2, name  # the repainted region: new content
    all_keep = latents(d, name, init_latents=z0, strength=0.7, keep_mask=torch.ones(1, 1, 8, 8))
    assert torch.allclose(all_keep, z0, atol=1e-5)


def test_mask_pooling_never_keeps_a_repainted_pixel() -> None:
    repaint = torch.zeros(1, 1, 8, 8)
    repaint[0, 0, 3, 3] = 1.0
    keep = keep_mask_latent(repaint, 4)
    assert keep.shape == (1, 1, 2, 2) and keep.tolist() == [[[[0.0, 1.0], [1.0, 1.0]]]]


def write_png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


@pytest.fixture
def pictures(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255  # white = repaint
    return {
        "a": write_png(tmp_path / "a.png", rng.integers(0, 256, (32, 32, 3))),
        "b": write_png(tmp_path / "b.png", np.full((32, 32, 3), 200)),
        "mask": write_png(tmp_path / "mask.png", mask),
        "small_mask": write_png(tmp_path / "small.png", mask[:16, :16]),
    }


def test_bad_init_inputs_are_one_line_errors(pictures: dict[str, Path], tmp_path: Path) -> None:
    for strength in (1.5, -0.1, "strong"):
        with pytest.raises(ValueError, match=r"strength=.*\[0, 1\]|pass strength="):
            check_init_inputs(str(pictures["a"]), None, strength)
    with pytest.raises(FileNotFoundError, match="pass init_image=PATH"):
        check_init_inputs(str(tmp_path / "nope.png"), None, 0.5)
    with pytest.raises(ValueError, match="make the mask the init image's size"):
        check_init_inputs(str(pictures["a"]), str(pictures["small_mask"]), 0.5)
    with pytest.raises(ValueError, match="mask= needs init_image="):
        check_init_inputs(None, str(pictures["mask"]), 0.5)
    with pytest.raises(FileNotFoundError, match="pass mask=PATH"):
        check_init_inputs(str(pictures["a"]), str(tmp_path / "nomask.png"), 0.5)


def run_sample(ckpt: Path, out: Path, *extra: str) -> list[dict]:
    return sample.run(
        compose_config(
            "sample",
            [
                f"ckpt={ckpt}",
                f"out_dir={out}",
                "prompt=red apple",
                "steps=4",
                "num_images=2",
                "seed=5",
                "sampler=ddim",
                *extra,
            ],
        )
    )


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.float64)


def test_sample_py_img2img_and_inpainting(
    tiny_checkpoint: Path, pictures: dict[str, Path], tmp_path: Path
) -> None:
    both = f"init_image=[{pictures['a']},{pictures['b']}]"
    records = run_sample(tiny_checkpoint, tmp_path / "s0", both, "strength=0")
    assert [r["init_image"] for r in records] == [str(pictures["a"]), str(pictures["b"])]
    assert all(r["strength"] == 0 and r["mask"] is None for r in records)
    # strength 0: exactly the autoencoder's reconstruction of the init image
    model = load_for_sampling(tiny_checkpoint, True, torch.device("cpu"))
    image = torch.from_numpy(pixels(pictures["a"]) / 127.5 - 1).permute(2, 0, 1)[None].float()
    recon = ((model.decode_samples(model.encode_images(image)).float() + 1) / 2).clamp(0, 1)
    assert np.array_equal(np.asarray(to_pil(recon)[0]), pixels(tmp_path / "s0" / records[0]["file"]))

    # inpainting: the kept region is the reconstruction (up to the decoder's reach across the mask border)
    records = run_sample(
        tiny_checkpoint,
        tmp_path / "in",
        f"init_image={pictures['a']}",
        f"mask={pictures['mask']}",
        "strength=1",
    )
    out = pixels(tmp_path / "in" / records[0]["file"])
    rec = np.asarray(to_pil(recon)[0], dtype=np.float64)
    keep = np.ones((32, 32), bool)
    keep[4:28, 4:28] = False  # the repainted square grown by one latent pixel (f = 4)
    kept_err = np.abs(out - rec)[keep].mean()
    new_err = np.abs(out - rec)[8:24, 8:24].mean()
    # the latents of the kept region are exactly the init's (test above); in pixels the tiny decoder carries
    # the new content across the border, so only "closer to the reconstruction than the repainted region"
    # holds here
    assert kept_err < 0.6 * new_err, (kept_err, new_err)
    assert records[0]["mask"] == str(pictures["mask"])
    # an all-keep mask: the reconstruction (to 8-bit rounding)
    write_png(tmp_path / "black.png", np.zeros((32, 32)))
    records = run_sample(
        tiny_checkpoint, tmp_path / "k", f"init_image={pictures['a']}", f"mask={tmp_path / 'black.png'}"
    )
    assert np.abs(pixels(tmp_path / "k" / records[0]["file"]) - rec).max() <= 1


def test_sample_py_refuses_bad_input_before_loading(pictures: dict[str, Path], tmp_path: Path) -> None:
    missing_ckpt = tmp_path / "no.ckpt"  # never read: the arguments fail first
    with pytest.raises(ValueError, match="strength"):
        run_sample(missing_ckpt, tmp_path / "o", f"init_image={pictures['a']}", "strength=2")
    with pytest.raises(ValueError, match="mask"):
        run_sample(
            missing_ckpt, tmp_path / "o", f"init_image={pictures['a']}", f"mask={pictures['small_mask']}"
        )
