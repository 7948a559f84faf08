"""prepare.py export-diffusers: a tiny model trained through train.py -> a StableDiffusionPipeline directory
that diffusers loads offline and that samples the same images as ours; import(export(x)) is x bit for bit."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

import prepare
import train
from ldm.autoencoder.kl import KLAutoencoder
from ldm.autoencoder.latent_norm import LatentNorm
from ldm.config_utils import compose_config
from ldm.convert import unet_from_diffusers
from ldm.convert.diffusers_vae import kl_from_diffusers_state
from ldm.convert.export_pipeline import build_sd_pipeline, folded_scaling_factor
from ldm.convert.pretrained import init_unet_from
from ldm.generate import generate, initial_noise
from ldm.lit.loading import load_for_sampling
from ldm.nets.unet import UNet
from ldm.sampling import sample_ddim
from ldm.sampling.grids import sampling_sigmas

PROMPTS = ["red apple", "blue heart"]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exported(tiny_data: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """3 steps (one epoch) of the tiny model with SD's padding behaviour, on the latent shard without stored
    embeddings."""
    out = tmp_path_factory.mktemp("export_run") / "run"
    val = f"{tiny_data['latents']}/val-000000.tar"
    extra = (
        "conditioner.mask_padding=false",
        f"data.train_shards={val}",
        "data.batch_size=2",
        "data.num_workers=0",
        "trainer.max_steps=3",
        "callbacks.sample_grid=null",
        "model.val_levels=0",
    )
    train.run(compose_config("train", tiny_overrides(tiny_data, out, *extra)))
    ckpt = out / "checkpoints" / "last.ckpt"
    target = out.parent / "sd"
    prepare.main(["export-diffusers", "--ckpt", str(ckpt), "--out", str(target)])
    return ckpt, target


def test_pipeline_loads_offline_and_samples_our_images(exported: tuple[Path, Path]) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    ckpt, target = exported
    index = json.loads((target / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "BertModel"] and index["scheduler"][1] == "DDIMScheduler"
    pipe = StableDiffusionPipeline.from_pretrained(target, local_files_only=True)
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.tokenizer.model_max_length == 32
    model = load_for_sampling(ckpt, use_ema=True, device=torch.device("cpu"))
    steps, seeds, shape = 8, [3, 4], model.latent_shape
    ours = generate(
        model.denoiser,
        model.conditioner,
        model.decode_samples,
        PROMPTS,
        sampler=functools.partial(sample_ddim),
        sigmas=sampling_sigmas(model.denoiser.schedule, steps),
        latent_shape=shape,
        seeds=seeds,
        cfg_scale=3.0,
    )
    ref = pipe(
        PROMPTS,
        num_inference_steps=steps,
        guidance_scale=3.0,
        height=32,
        width=32,
        output_type="pt",
        latents=initial_noise(seeds, shape, torch.device("cpu")),
    ).images
    assert ours.std() > 0.01
    assert (ours - ref).abs().max() <= 1e-3


def test_import_of_export_is_bitwise(exported: tuple[Path, Path]) -> None:
    from diffusers import AutoencoderKL
    from transformers import AutoModel

    ckpt, target = exported
    model = load_for_sampling(ckpt, use_ema=True, device=torch.device("cpu"))
    ema = model.denoiser.net.state_dict()
    back, report = unet_from_diffusers(target)
    assert (
        all(torch.equal(v, ema[k]) for k, v in back.state_dict().items()) and len(ema) == report.num_tensors
    )
    fresh = UNet(**report.unet_kwargs)  # the init_from path, scheduler config checked against our schedule
    init_unet_from(
        fresh, f"diffusers:{target}", schedule=model.denoiser.schedule, prediction=model.denoiser.prediction
    )
    assert all(torch.equal(v, ema[k]) for k, v in fresh.state_dict().items())
    ours_ae = model.autoencoder.model
    vae = AutoencoderKL.from_pretrained(target, subfolder="vae", local_files_only=True)
    assert vae.config.scaling_factor == model.autoencoder.scale_factor
    state = kl_from_diffusers_state(vae.state_dict(), KLAutoencoder(**ours_ae.config()))
    assert all(torch.equal(v, ours_ae.state_dict()[k]) for k, v in state.items())
    text = AutoModel.from_pretrained(target / "text_encoder", local_files_only=True).state_dict()
    assert all(torch.equal(v, text[k]) for k, v in model.conditioner.encoder.state_dict().items())


def test_what_a_pipeline_cannot_express_is_refused(exported: tuple[Path, Path]) -> None:
    ckpt, target = exported
    with pytest.raises(FileExistsError, match="choose another --out"):
        prepare.main(["export-diffusers", "--ckpt", str(ckpt), "--out", str(target)])
    model = load_for_sampling(ckpt, use_ema=True, device=torch.device("cpu"))
    parts = dict(
        denoiser=model.denoiser, conditioner=model.conditioner, autoencoder=model.autoencoder, image_size=32
    )
    model.conditioner.mask_padding = True
    with pytest.raises(ValueError, match="conditioner.mask_padding=false, or pass --allow-padding-attention"):
        build_sd_pipeline(**parts)
    assert build_sd_pipeline(**parts, allow_padding_attention=True).unet is not None
    norm = LatentNorm(4)
    norm.set_stats([0.0] * 4, [2.0] * 4)  # one std for all channels, zero means: folded into scaling_factor
    assert folded_scaling_factor(0.5, 0.0, norm) == 0.25
    norm.set_stats([0.0] * 4, [1.0, 2.0, 2.0, 2.0])
    with pytest.raises(ValueError, match="model.latent_norm=none"):
        folded_scaling_factor(0.5, 0.0, norm)
    with pytest.raises(ValueError, match="autoencoder.shift_factor=0"):
        folded_scaling_factor(0.5, 0.1, None)


def test_finetune_demo_export_import_lora_sample(
    exported: tuple[Path, Path], tiny_data: dict, tmp_path: Path
) -> None:
    """The README's CPU fine-tuning demo through the entry points: the exported tiny model is the pretrained
    pipeline of experiment=finetune_sd (UNet via model.init_from=diffusers:<dir>, its VAE, its MiniLM text
    encoder); LoRA trains 2 steps on image shards; sample.py merges the LoRA into that base."""
    import sample

    _, pipeline = exported
    run = tmp_path / "lora_run"
    overrides = [
        "experiment=finetune_sd",
        f"paths.pretrained_pipeline={pipeline}",
        "trainer=cpu",
        "image_size=32",
        *DEMO_NET,
        "diffusion=ddpm_linear_v_min_snr",
        "conditioner.model_class=auto",
        "conditioner.max_length=32",
        "data.kind=images",
        f"data.train_shards={tiny_data['images']}/train-000000.tar",
        "data.batch_size=4",
        "data.num_workers=0",
        "++model.lora.rank=4",
        "optim.lr=1e-3",
        "callbacks.ema.decay=0.5",
        "trainer.max_steps=2",
        "model.val_levels=0",
        "logger=csv",
        "callbacks.sample_grid=null",
        "callbacks.sample_quality=null",
        "trainer.enable_progress_bar=false",
        "check_autoencoder=0",
        f"paths.output_dir={run}",
        f"paths.log_dir={tmp_path}",
    ]
    assert train.run(compose_config("train", overrides))["global_step"] == 2
    ckpt = run / "checkpoints" / "last.ckpt"
    records = sample.run(
        compose_config(
            "sample",
            [
                f"ckpt={ckpt}",
                f"out_dir={tmp_path / 'samples'}",
                "steps=3",
                "prompt=red apple",
                "num_images=2",
                "lora_scale=1.0",
            ],
        )
    )
    assert len(records) == 2 and all((tmp_path / "samples" / r["file"]).is_file() for r in records)


DEMO_NET = [  # the tiny model's net (configs/net/unet_tiny.yaml) in finetune_sd's net=unet_sd
    "net.model_channels=32",
    "net.channel_mult=[1,2]",
    "net.num_res_blocks=1",
    "net.attention_resolutions=[2]",
    "net.num_heads=2",
    "net.context_dim=384",
    "net.norm_groups=8",
    "net.gradient_checkpointing=false",
]
