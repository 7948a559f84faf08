"""Weights-only initialisation from pretrained Stable Diffusion weights (model.init_from,
experiment=finetune_sd) on a tiny random pipeline saved to tmp_path: the same UNet output as diffusers, the
same DDIM samples as diffusers' StableDiffusionPipeline, refusals that name the fix, partial loading, EMA
start."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from sd_tiny import finetune_overrides, save_tiny_sd_pipeline

from ldm.config_utils import compose_config
from ldm.convert.sd_checkpoint import unet_to_ldm_state_dict
from ldm.generate import generate, initial_noise
from ldm.instantiate import build
from ldm.lit.ema import EMA
from ldm.sampling import get_sigmas_discrete, sample_ddim

PROMPTS = ["red apple", "a blue heart on a long caption"]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="module")
def pipe(pipeline_dir: Path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(pipeline_dir, local_files_only=True)


def build_model(pipeline_dir: Path, *extra: str):
    cfg = compose_config("train", finetune_overrides(pipeline_dir, *extra))
    return build(cfg.model)


@pytest.fixture(scope="module")
def model(pipeline_dir: Path):
    model = build_model(pipeline_dir)
    model.init_weights()
    return model.eval()


def test_imported_unet_matches_diffusers(model, pipe) -> None:
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 32, generator=g)
    t = torch.tensor([5.0, 901.0])
    with torch.no_grad():
        ref = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        ours = model.net(x, t, context=ctx, context_mask=torch.ones(2, 16, dtype=torch.bool))
    assert ref.abs().mean() > 1e-2
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_conditioner_attends_to_padding_like_sd(model, pipe) -> None:
    """conditioner.mask_padding=false (set by finetune_sd): SD's prompt embeddings, every token in the
    context."""
    out = model.conditioner(PROMPTS)
    ref, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
    assert bool(out["context_mask"].all()) and out["context"].shape == ref.shape
    torch.testing.assert_close(out["context"], ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_ddim_sampling_matches_stable_diffusion_pipeline(model, pipe, cfg_scale: float) -> None:
    from diffusers import DDIMScheduler

    steps, seeds, shape = 10, [11, 12], (4, 8, 8)
    finals: list[torch.Tensor] = []
    ours = generate(
        model.denoiser,
        model.conditioner,
        lambda z: finals.append(z) or model.decode_samples(z),
        PROMPTS,
        sampler=functools.partial(sample_ddim),
        cfg_scale=cfg_scale,
        latent_shape=shape,
        seeds=seeds,
        sigmas=get_sigmas_discrete(model.denoiser.schedule, steps, "leading", steps_offset=1),
    )
    # leading timesteps, steps_offset=1, the last step to alpha 1 (x0): our grid; generate drew the same noise
    # (times sqrt(1 + sigma_max^2), VE coordinates)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    latents = initial_noise(seeds, shape, torch.device("cpu"))
    kwargs = dict(num_inference_steps=steps, guidance_scale=cfg_scale, height=16, width=16, latents=latents)
    ref_latents = pipe(PROMPTS, output_type="latent", **kwargs).images
    ref_images = pipe(PROMPTS, output_type="pt", **kwargs).images
    assert (finals[0] - ref_latents).abs().max() <= 1e-4
    assert (ours - ref_images).abs().max() <= 1e-4


def test_ema_starts_from_the_loaded_weights(model, pipeline_dir: Path) -> None:
    ema = EMA(decay=0.9)
    ema.on_fit_start(SimpleNamespace(strategy=None), model)
    state = model.net.state_dict()
    assert all(torch.equal(ema.shadow[k], v) for k, v in state.items())


def test_net_or_schedule_mismatch_is_refused(pipeline_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"channel_mult=\[1, 2\] but net.channel_mult=\[1, 2, 2\]: set net"):
        build_model(pipeline_dir, "net.channel_mult=[1,2,2]").init_weights()
    with pytest.raises(ValueError, match="num_heads=4 but net.num_heads=2"):
        build_model(pipeline_dir, "net.num_heads=2", "model.init_ignore_keys=[nothing]").init_weights()
    with pytest.raises(
        ValueError, match="prediction_type='eps' but this run has 'v': set diffusion=ddpm_scaled_linear_eps"
    ):
        build_model(pipeline_dir, "diffusion=ddpm_scaled_linear_v").init_weights()
    with pytest.raises(ValueError, match="use diffusers:<UNet or pipeline dir> or ldm:"):
        build_model(pipeline_dir, "model.init_from=hub:foo")
    with pytest.raises(ValueError, match="holds a AutoencoderKL, not a UNet2DConditionModel"):
        build_model(pipeline_dir, f"model.init_from=diffusers:{pipeline_dir / 'vae'}").init_weights()
    with pytest.raises(FileNotFoundError, match="no diffusers UNet at"):
        build_model(pipeline_dir, f"model.init_from=diffusers:{pipeline_dir / 'tokenizer'}").init_weights()


def test_partial_load_keeps_ignored_tensors_fresh(pipeline_dir: Path, model) -> None:
    """9 input channels (e.g. inpainting) on 4-channel weights: conv_in keeps its init, the rest loads."""
    fresh = build_model(
        pipeline_dir,
        "net.in_channels=9",
        "net.out_channels=4",
        "model.init_ignore_keys=[input_blocks.0.0.*]",
        "model.autoencoder=null",
    )
    before = fresh.net.input_blocks[0][0].weight.clone()
    fresh.init_weights()
    assert torch.equal(fresh.net.input_blocks[0][0].weight, before)
    loaded = {k: v for k, v in fresh.net.state_dict().items() if not k.startswith("input_blocks.0.0.")}
    assert all(torch.equal(v, model.net.state_dict()[k]) for k, v in loaded.items())


def test_single_file_checkpoint_and_resume_skip(tmp_path: Path, pipeline_dir: Path, model) -> None:
    """ldm:<file.safetensors> (model.diffusion_model.* keys) loads the same weights; a resumed run skips
    init_from."""
    path = tmp_path / "sd.safetensors"
    save_file({k: v.contiguous() for k, v in unet_to_ldm_state_dict(model.net).items()}, str(path))
    other = build_model(pipeline_dir, f"model.init_from=ldm:{path}")
    other.init_weights()
    assert all(torch.equal(v, model.net.state_dict()[k]) for k, v in other.net.state_dict().items())
    resumed = build_model(pipeline_dir, "model.init_from=ldm:/nonexistent.ckpt")
    resumed._trainer = SimpleNamespace(ckpt_path="last.ckpt")  # what Trainer.fit(ckpt_path=...) sets
    resumed.init_weights()  # skipped: the checkpoint's weights replace the init
    with pytest.raises(ValueError, match="has shape .* fix the net config, or add"):
        build_model(pipeline_dir, f"model.init_from=ldm:{path}", "net.num_res_blocks=2").init_weights()
    with pytest.raises(ValueError, match="missing from the source"):
        build_model(pipeline_dir, f"model.init_from=ldm:{path}", "net.transformer_depth=2").init_weights()


def test_init_from_hub_id_reads_the_hub_cache_offline(
    tmp_path: Path, pipeline_dir: Path, model, monkeypatch: pytest.MonkeyPatch
) -> None:
    """model.init_from=diffusers:<owner/name>: the snapshot in a Hugging Face cache (its on-disk layout, made
    by hand: refs/main -> snapshots/<commit>/), with HF_HUB_OFFLINE; an id not in the cache names the fix."""
    import shutil

    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-sd"
    shutil.copytree(pipeline_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # no local directory tiny-org/tiny-sd
    other = build_model(pipeline_dir, "model.init_from=diffusers:tiny-org/tiny-sd")
    other.init_weights()
    assert all(torch.equal(v, model.net.state_dict()[k]) for k, v in other.net.state_dict().items())
    with pytest.raises(
        FileNotFoundError, match=r"not in the Hugging Face cache .*hf download tiny-org/other"
    ):
        build_model(pipeline_dir, "model.init_from=diffusers:tiny-org/other").init_weights()
