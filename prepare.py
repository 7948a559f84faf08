"""Data preparation: images -> image shards -> latent shards, and exporting a trained stage-1 autoencoder.

    # built-in emoji: image shards + latent shards
    python prepare.py emoji
    # ... whose samples carry a class id (cls): emoji category (9) or subcategory (99), into
    # data/emoji32_<level> (ldm/data/labels.py)
    python prepare.py emoji --labels category
    # a folder of images with same-named .txt captions (image bytes kept as they are; captions that are not
    # UTF-8 skipped, counted); --val-fraction also writes val-*.tar by a stable, seeded hash split
    python prepare.py images --input DIR --out data/mine/images [--val-fraction 0.05 --split-seed 0]
    python prepare.py latents --shards 'data/mine/images/train-{000000..000003}.tar' --out data/mine/latents \
        --autoencoder emoji-kl-f4 | PATH.safetensors | diffusers:stabilityai/sd-vae-ft-mse [--subfolder vae]
    # resumable; or one job per rank under torchrun/SLURM (--rank/--world-size from the env)
    python prepare.py latents ... --num-procs 4 --devices cuda:0,cuda:1,cuda:2,cuda:3
    python prepare.py latents ... --buckets 256x256,192x320,320x192   # aspect-ratio buckets (HxW)
    python prepare.py latents ... --bucket-area 256 --bucket-step 32   # SDXL-style buckets of ~256x256 px
    python prepare.py latents ... --alpha-background black   # behind transparent pixels (default white)
    python prepare.py latents-merge --shards '...' --out data/mine/latents   # the index, if none was written
    python prepare.py export-autoencoder --ckpt logs/autoencoder/runs/<run>/checkpoints/last.ckpt \
        --shards 'data/emoji32/images/train-{000000..000007}.tar' --out ldm/autoencoder/weights/emoji_kl_f4
    # a StableDiffusionPipeline directory (EMA weights; ldm/convert/export_pipeline.py)
    python prepare.py export-diffusers --ckpt logs/train/runs/<run>/checkpoints/last.ckpt --out exported/sd
    # pytorch_lora_weights.safetensors for pipe.load_lora_weights (ldm/convert/diffusers_lora.py)
    python prepare.py export-lora --ckpt logs/train/runs/<lora run>/checkpoints/last.ckpt --out exported/lora

No command writes over its input: an --out (and --prefix) whose files would be, or resolve to, an input shard,
shard index or image is refused before anything is written (ldm/data/overwrite.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ldm import encode
from ldm.autoencoder.frozen import FrozenAutoencoder
from ldm.autoencoder.loaders import (
    SHIPPED_AUTOENCODER,
    LatentMoments,
    kl_autoencoder_from_checkpoint,
    load_diffusers_autoencoder,
    load_kl_autoencoder,
    save_kl_autoencoder,
)
from ldm.conditioning.text import TextConditioner
from ldm.data.buckets import Bucket, buckets_for_area, parse_buckets
from ldm.data.emoji import emoji_samples, is_validation_key
from ldm.data.emoji_labels import LEVELS, label_names
from ldm.data.folder import folder_samples, hash_split, image_files
from ldm.data.labels import label_meta
from ldm.data.overwrite import input_files, refuse_outputs_among, refuse_overwrite, tmp_of
from ldm.data.rgb import parse_background
from ldm.data.shards import SkipCounter, read_index, write_shards, write_split_shards
from ldm.data.urls import expand_urls
from ldm.encode import image_batches, merge_latent_index
from ldm.reconstruction import MIN_PSNR_DB, reconstruction_check

__all__ = ["main", "split_samples"]

log = logging.getLogger("prepare")


# ---------------------------------------------------------------------------------------------- image shards
def split_samples(
    samples: Iterator[dict],
    out_dir: str,
    max_per_shard: int,
    is_validation: Callable[[str], bool],
    prefixes: tuple[str, str] = ("train", "val"),
    labels: tuple[list[str], str] | None = None,
) -> dict[str, int]:
    """Streams samples into train-*.tar and val-*.tar by the source's own split, ``is_validation(key)``.

    ``labels`` (class names, level): each index meta names the classes and counts the samples per class.
    """
    ids: dict[str, list[int]] = {p: [] for p in prefixes}

    def split(key: str) -> str:
        return prefixes[1] if is_validation(key) else prefixes[0]

    def tallied() -> Iterator[dict]:
        for s in samples:
            if "cls" in s:
                ids[split(s["__key__"])].append(s["cls"])
            yield s

    meta = None if labels is None else (lambda prefix: label_meta(*labels, ids[prefix]))
    return write_split_shards(tallied(), out_dir, split, prefixes, max_per_shard, meta)


def cmd_images(args: argparse.Namespace) -> None:
    root = Path(args.input)
    prefixes = (args.prefix, args.val_prefix) if args.val_fraction > 0 else (args.prefix,)
    if len(set(prefixes)) < len(prefixes):
        raise SystemExit(f"--prefix and --val-prefix are both '{args.prefix}': name --val-prefix apart")
    is_validation = hash_split(args.val_fraction, args.split_seed)  # checks the fraction first
    if root.is_dir():  # folder_samples names the fix when it is not
        inputs = [q for p in image_files(root) for q in (p, p.with_suffix(".txt"))]
        alternatives = "|".join(map(re.escape, prefixes))
        names = re.compile(rf"({alternatives})(-\d{{6}}\.tar|\.json)(\.tmp)?")
        refuse_outputs_among(inputs, Path(args.out), names, "choose another --out (or --prefix)")
    counter = SkipCounter("folder")
    samples = folder_samples(args.input, counter)  # keys from the paths, each once (duplicate_key)
    if len(prefixes) == 1:
        write_shards(samples, args.out, prefix=args.prefix, max_per_shard=args.max_per_shard)  # streamed
        split = ""
    else:
        counts = split_samples(samples, args.out, args.max_per_shard, is_validation, prefixes)
        split = " (" + ", ".join(f"{p} {n}" for p, n in counts.items()) + ")"
    total = sum(read_index(str(Path(args.out) / f"{p}.json"))["total"] for p in prefixes)
    log.info(
        "images: %d samples written to %s%s, %d skipped: %s",
        total,
        args.out,
        split,
        counter.total(),
        dict(sorted(counter.as_dict().items())),
    )


# ---------------------------------------------------------------------------------------------- latent shards
def load_autoencoder(spec: str, subfolder: str | None, scale_factor: float | None) -> FrozenAutoencoder:
    """``emoji-kl-f4`` | PATH.safetensors (our stage-1 export) | ``diffusers:<hub id or local dir>``."""
    if spec.startswith("diffusers:"):
        return load_diffusers_autoencoder(
            spec.removeprefix("diffusers:"), subfolder=subfolder, scale_factor=scale_factor
        )
    return load_kl_autoencoder(spec, scale_factor=scale_factor)


def auto_devices(spec: str | torch.device) -> str | torch.device:
    """``auto``: every local GPU (the workers take them in turn), else the CPU; anything else as given."""
    if str(spec) != "auto":
        return spec
    n = torch.cuda.device_count()
    return ",".join(f"cuda:{i}" for i in range(n)) if n else "cpu"


def text_encoder(name: str | None, max_length: int) -> TextConditioner | None:
    """The frozen text encoder whose output is stored with the latents (``none`` to store captions only)."""
    if name in (None, "", "none"):
        return None
    return TextConditioner(pretrained=name, max_length=max_length, dropout_prob=0.0)


def bucket_args(args: argparse.Namespace) -> list[Bucket] | None:
    """``--buckets HxW,...`` or ``--bucket-area S --bucket-step N``; None (one image_size square) without
    either."""
    if args.buckets and args.bucket_area:
        raise SystemExit("give --buckets or --bucket-area, not both")
    if args.bucket_area:
        return buckets_for_area(args.bucket_area, args.bucket_step, args.bucket_max_ratio)
    return parse_buckets(args.buckets) if args.buckets else None


def cmd_latents(args: argparse.Namespace) -> None:
    if args.max_per_shard is not None:
        raise SystemExit(
            "--max-per-shard does not apply to latents: latent shard i mirrors image shard i; reshard the "
            "images with `prepare.py images --max-per-shard N`, then encode those"
        )
    buckets = bucket_args(args)
    ae = load_autoencoder(args.autoencoder, args.subfolder, args.scale_factor)
    check = None
    if args.check_images > 0 and args.rank in (None, 0):  # measured first, kept once encoding may write
        check = reconstruction_check(
            args.shards,
            ae,
            args.image_size,
            args.check_images,
            args.min_psnr,
            background=args.alpha_background,
        )
    text = text_encoder(args.text_encoder, args.max_length)
    encode.encode_shards(
        args.shards,
        args.out,
        args.prefix,
        ae,
        args.image_size,
        args.batch_size,
        device=auto_devices(args.device),
        text=text,
        num_procs=args.num_procs,
        rank=args.rank,
        world_size=args.world_size,
        overwrite=args.overwrite,
        threads=args.threads,
        buckets=buckets,
        bucket_crop=args.bucket_crop,
        bucket_seed=args.bucket_seed,
        latent_multiple=args.latent_multiple,
        alpha_background=args.alpha_background,
    )
    if check is not None:
        write_reconstruction(check, ae, Path(args.out), args.prefix)


def cmd_latents_merge(args: argparse.Namespace) -> None:
    if merge_latent_index(args.shards, args.out, args.prefix) is None:
        raise SystemExit(
            f"some latent shards in {args.out} are missing or stale (see above): rerun `prepare.py latents` "
            "with the same arguments to encode them (finished shards are skipped)"
        )


def cmd_emoji(args: argparse.Namespace) -> None:
    root = Path(args.out or ("data/emoji32" if args.labels is None else f"data/emoji32_{args.labels}"))
    labels = None if args.labels is None else (label_names(args.labels), args.labels)
    samples = emoji_samples(size=args.size, limit=args.limit, labels=args.labels)
    images = root / "images"
    counts = split_samples(samples, str(images), args.max_per_shard, is_validation_key, labels=labels)
    log.info("emoji image shards: %s", counts)
    if labels is not None:
        log_label_counts(images)
    if args.images_only:
        return
    ae = load_autoencoder(args.autoencoder, None, None)
    text = text_encoder(args.text_encoder, args.max_length)
    for prefix in ("train", "val"):
        pattern = ",".join(read_index(str(root / "images" / f"{prefix}.json"))["paths"])
        encode.encode_shards(
            pattern,
            str(root / "latents"),
            prefix,
            ae,
            args.size,
            128,
            device=auto_devices(args.device),
            text=text,
            overwrite=True,
        )  # (the image shards were just rewritten: every shard is re-encoded)
        if prefix == "val":  # the shipped autoencoder on held-out emoji
            write_reconstruction(
                reconstruction_check(pattern, ae, args.size, 64), ae, root / "latents", prefix
            )


def log_label_counts(images: Path) -> None:
    """Samples per class of each split, from the image index meta (how balanced the classes are)."""
    for prefix in ("train", "val"):
        meta = read_index(str(images / f"{prefix}.json"))["meta"]
        counts = dict(zip(meta["labels"], meta["label_counts"], strict=True))
        level = meta["label_level"]
        log.info("emoji %s: %d classes (%s), samples per class %s", prefix, len(counts), level, counts)


def write_reconstruction(result: dict, ae: FrozenAutoencoder, out: Path, prefix: str) -> None:
    """The reconstruction check's result beside the latents it concerns (written once encoding was
    allowed)."""
    text = json.dumps({"autoencoder": ae.identity, **result}, indent=1)
    (out / f"reconstruction_{prefix}.json").write_text(text)


# ---------------------------------------------------------------------------------------------- export
@torch.no_grad()
def cmd_export(args: argparse.Namespace) -> None:
    """Stage-1 Lightning checkpoint -> PATH.safetensors + PATH.json, with scale_factor = 1 / std of the
    latents."""
    stem = Path(args.out)  # the files save_kl_autoencoder writes: STEM.safetensors, STEM.json (via .tmp)
    stem = stem.with_suffix("") if stem.suffix in (".safetensors", ".json") else stem
    outputs = [stem.with_suffix(".safetensors"), stem.with_suffix(".json")]
    refuse_overwrite(
        [*outputs, *map(tmp_of, outputs)],
        [Path(args.ckpt), *input_files(expand_urls(args.shards))],
        "choose another --out for the exported autoencoder",
    )
    model = kl_autoencoder_from_checkpoint(args.ckpt).eval()
    counter = SkipCounter("export")
    moments, num_images = LatentMoments(), 0  # streamed: memory stays flat however many shards
    background = parse_background(args.alpha_background)
    for batch in image_batches(
        expand_urls(args.shards), args.image_size, 256, counter, background=background
    ):
        moments.update(model.encode(torch.stack([s["image"] for s in batch])).mode())  # (B, C, h, w)
        num_images += len(batch)
    stats = moments.result()
    scale = 1.0 / stats["std"]  # Rombach et al. 2022, sec. 4.3.2: unit-variance latents
    extra = {
        "recipe": args.recipe,
        "source_checkpoint": Path(args.ckpt).name,
        "latent_channel_mean": stats["channel_mean"],
        "latent_channel_std": stats["channel_std"],
        "num_images": num_images,
        "alpha_background": list(background),
    }
    save_kl_autoencoder(model, args.out, scale_factor=scale, extra=extra)
    log.info(
        "exported %s(.safetensors|.json) with scale_factor %.5f from %d images", args.out, scale, num_images
    )


def cmd_export_diffusers(args: argparse.Namespace) -> None:
    """Latent-diffusion checkpoint -> a StableDiffusionPipeline directory
    (``ldm.convert.export_pipeline``)."""
    from ldm.convert.export_pipeline import export_sd_pipeline
    from ldm.lit.loading import load_for_sampling

    model = load_for_sampling(Path(args.ckpt), use_ema=not args.raw_weights, device=torch.device("cpu"))
    export_sd_pipeline(
        args.out,
        denoiser=model.denoiser,
        conditioner=model.conditioner,
        autoencoder=model.autoencoder,
        image_size=int(model.config["image_size"]),
        latent_norm=model.latent_norm,
        allow_padding_attention=args.allow_padding_attention,
    )


def cmd_export_lora(args: argparse.Namespace) -> None:
    """LoRA checkpoint -> diffusers/peft LoRA weights for ``pipe.load_lora_weights``
    (``ldm.convert.diffusers_lora``)."""
    from ldm.convert.diffusers_lora import save_diffusers_lora
    from ldm.lit.lora_base import adapters_from_checkpoint

    net, lora = adapters_from_checkpoint(Path(args.ckpt), use_ema=not args.raw_weights)
    info = {
        **lora,
        "checkpoint": str(Path(args.ckpt).resolve()),
        "weights": "raw" if args.raw_weights else "EMA",
        "load": "pipe = StableDiffusionPipeline.from_pretrained(<export-diffusers of the base>); "
        "pipe.load_lora_weights(<this dir>); alpha/rank is folded into lora_B (strength 1)",
    }
    path = save_diffusers_lora(args.out, net, info)
    log.info(
        "exported LoRA weights to %s (base sha256 %s, %s)",
        path,
        lora["base"]["sha256"][:12],
        lora["base"]["source"],
    )


def add_text_encoder_args(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument(
        "--text-encoder",
        default=default,
        help="store this frozen encoder's caption embeddings (minilm | dir | hub id | none)",
    )
    p.add_argument(
        "--max-length", type=int, default=32, help="tokenizer max length (as conditioner.max_length)"
    )


def background_arg(spec: str) -> tuple[int, int, int]:
    try:
        return parse_background(spec)
    except ValueError as exn:  # argparse shows this message (and not "invalid value") for ArgumentTypeError
        raise argparse.ArgumentTypeError(str(exn)) from None


def add_background_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--alpha-background",
        default="white",
        type=background_arg,
        help="colour behind transparent pixels: white (default), black, #rrggbb or r,g,b (ldm/data/rgb.py)",
    )


def add_bucket_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("aspect-ratio buckets (ldm/data/buckets.py; default: one --image-size square)")
    g.add_argument(
        "--buckets", default=None, help="image sizes HxW, comma separated, e.g. 256x256,192x320,320x192"
    )
    g.add_argument(
        "--bucket-area", type=int, default=None, help="SDXL-style buckets of about this side squared"
    )
    g.add_argument("--bucket-step", type=int, default=32, help="--bucket-area: sides are multiples of this")
    g.add_argument("--bucket-max-ratio", type=float, default=2.0, help="--bucket-area: longest/shortest side")
    g.add_argument(
        "--bucket-crop", choices=("center", "random"), default="center", help="crop into the bucket"
    )
    g.add_argument("--bucket-seed", type=int, default=0, help="seed of random crops (per sample key)")
    g.add_argument(
        "--latent-multiple",
        type=int,
        default=1,
        help="bucket sides must be multiples of the autoencoder factor x this: the UNet's 2**(levels-1), "
        "e.g. 8",
    )


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "emoji", help="render the built-in emoji dataset and encode it with the shipped autoencoder"
    )
    p.add_argument("--out", default=None, help="default data/emoji32, with --labels data/emoji32_<level>")
    p.add_argument("--size", type=int, default=32)
    p.add_argument(
        "--labels",
        choices=LEVELS,
        default=None,
        help="store each emoji's class id (cls) at this level; emoji without one are skipped and counted",
    )
    p.add_argument("--limit", type=int, default=None, help="only the first N emoji (tests)")
    p.add_argument(
        "--images-only",
        action="store_true",
        help="write the image shards only (e.g. to train the autoencoder)",
    )
    p.add_argument("--max-per-shard", type=int, default=500)
    p.add_argument("--autoencoder", default=SHIPPED_AUTOENCODER)
    add_text_encoder_args(p, default="minilm")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_emoji)

    p = sub.add_parser("images", help="a folder of images with same-named .txt captions -> image shards")
    p.add_argument("--input", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--prefix", default="train")
    p.add_argument("--max-per-shard", type=int, default=1000)
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="hold out about this fraction as --val-prefix shards (a seeded hash of each key: stable as "
        "files change)",
    )
    p.add_argument("--val-prefix", default="val")
    p.add_argument("--split-seed", type=int, default=0, help="--val-fraction: which keys are held out")
    p.set_defaults(func=cmd_images)

    p = sub.add_parser("latents", help="image shards -> latent shards with a frozen autoencoder")
    p.add_argument("--shards", required=True, help="e.g. '/data/part-{00000..00099}.tar'")
    p.add_argument("--out", required=True)
    p.add_argument("--prefix", default="train")
    p.add_argument(
        "--autoencoder",
        default=SHIPPED_AUTOENCODER,
        help="emoji-kl-f4 | PATH.safetensors | diffusers:<hub id or dir>",
    )
    p.add_argument("--subfolder", default=None, help="diffusers subfolder, e.g. vae")
    p.add_argument("--scale-factor", type=float, default=None, help="override the autoencoder's latent scale")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--check-images",
        type=int,
        default=64,
        help="reconstruct this many images first and report the autoencoder's PSNR (0: skip)",
    )
    p.add_argument(
        "--min-psnr",
        type=float,
        default=MIN_PSNR_DB,
        help="warn loudly when the autoencoder reconstructs these images below this PSNR (dB)",
    )
    p.add_argument(
        "--max-per-shard",
        type=int,
        default=None,
        help="refused: latent shard i holds image shard i's samples (reshard with `prepare.py images`)",
    )
    add_text_encoder_args(p, default="none")
    p.add_argument(
        "--device",
        "--devices",
        dest="device",
        default="auto",
        help="auto (this node's GPUs in turn, else cpu) or a comma list used in turn by the workers, e.g. "
        "cuda:0,cuda:1",
    )
    p.add_argument("--num-procs", type=int, default=1, help="spawned local workers, one device each")
    p.add_argument(
        "--rank", type=int, default=None, help="this job's rank (default: $RANK or $SLURM_PROCID, else 0)"
    )
    p.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="number of jobs (default: $WORLD_SIZE or $SLURM_NTASKS, else 1)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="re-encode shards made with another autoencoder or settings"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads per worker (default: all, split among --num-procs)",
    )
    add_bucket_args(p)
    add_background_arg(p)
    p.set_defaults(func=cmd_latents)

    p = sub.add_parser(
        "latents-merge",
        help="write the latent index from the shard sidecars (the last encode process does it too)",
    )
    p.add_argument("--shards", required=True, help="the image shards given to `latents`")
    p.add_argument("--out", required=True)
    p.add_argument("--prefix", default="train")
    p.set_defaults(func=cmd_latents_merge)

    p = sub.add_parser(
        "export-autoencoder", help="stage-1 checkpoint -> safetensors + json with its latent scale"
    )
    p.add_argument("--ckpt", required=True)
    p.add_argument("--shards", required=True, help="training image shards, to measure the latent std")
    p.add_argument("--out", required=True, help="output path without extension")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--recipe", default="python train.py experiment=autoencoder_emoji")
    add_background_arg(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "export-diffusers", help="latent-diffusion checkpoint -> StableDiffusionPipeline directory"
    )
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True, help="a new (or empty) directory")
    p.add_argument("--raw-weights", action="store_true", help="the raw weights instead of the EMA weights")
    p.add_argument(
        "--allow-padding-attention",
        action="store_true",
        help="export a model trained with conditioner.mask_padding=true anyway (its images will differ)",
    )
    p.set_defaults(func=cmd_export_diffusers)

    p = sub.add_parser(
        "export-lora",
        help="LoRA checkpoint -> diffusers LoRA weights (pipe.load_lora_weights) of its adapters",
    )
    p.add_argument("--ckpt", required=True, help="a train.py checkpoint of a model.lora run")
    p.add_argument("--out", required=True, help="a new (or empty) directory")
    p.add_argument("--raw-weights", action="store_true", help="the raw adapters instead of their EMA")
    p.set_defaults(func=cmd_export_lora)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
