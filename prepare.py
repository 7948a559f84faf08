"""Data preparation: images -> image shards -> latent shards, and exporting a trained stage-1 autoencoder.

    python prepare.py emoji                                   # built-in emoji: image shards + latent shards
    python prepare.py images --input DIR --out data/mine/images  # folder of images with same-named .txt captions
    python prepare.py latents --shards 'data/mine/images/train-{000000..000003}.tar' --out data/mine/latents \
        --autoencoder emoji-kl-f4 | PATH.safetensors | diffusers:stabilityai/sd-vae-ft-mse [--subfolder vae]
    python prepare.py export-autoencoder --ckpt logs/autoencoder/runs/<run>/checkpoints/last.ckpt \
        --shards 'data/emoji32/images/train-{000000..000007}.tar' --out ldm/autoencoder/weights/emoji_kl_f4
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
from ldm.data.emoji import emoji_samples, is_validation_key
from ldm.data.folder import folder_samples
from ldm.data.pipeline import IMAGE_EXTS, decode_image, expand_urls, raw_samples
from ldm.data.shards import SkipCounter, read_index, write_shards

log = logging.getLogger("prepare")


# ---------------------------------------------------------------------------------------------- image shards
def split_samples(samples: Iterator[dict], out_dir: str, max_per_shard: int) -> dict[str, int]:
    """Writes train-*.tar and val-*.tar (the fixed held-out split of ``is_validation_key``)."""
    train, val = [], []
    for s in samples:
        (val if is_validation_key(s["__key__"]) else train).append(s)
    write_shards(train, out_dir, prefix="train", max_per_shard=max_per_shard)
    write_shards(val, out_dir, prefix="val", max_per_shard=max_per_shard)
    return {"train": len(train), "val": len(val)}


def cmd_images(args: argparse.Namespace) -> None:
    counter = SkipCounter("folder")
    samples = ({**s, "__key__": f"{i:06d}"} for i, s in enumerate(folder_samples(args.input, counter)))
    write_shards(samples, args.out, prefix=args.prefix, max_per_shard=args.max_per_shard)  # streamed
    log.info("images: skipped %s", counter.as_dict())


# ---------------------------------------------------------------------------------------------- latent shards
def load_autoencoder(spec: str, subfolder: str | None, scale_factor: float | None) -> FrozenAutoencoder:
    """``emoji-kl-f4`` | PATH.safetensors (our stage-1 export) | ``diffusers:<hub id or local dir>``."""
    if spec.startswith("diffusers:"):
        return load_diffusers_autoencoder(
            spec.removeprefix("diffusers:"), subfolder=subfolder, scale_factor=scale_factor
        )
    return load_kl_autoencoder(spec, scale_factor=scale_factor)


def image_batches(urls: list[str], size: int, batch_size: int, counter: SkipCounter) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for raw in raw_samples(urls, counter):
        ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if "txt" not in raw:
            counter.add("missing_caption", detail=f"(key {raw['__key__']}) ")
            continue
        if ext is None:
            counter.add("missing_image", detail=f"(key {raw['__key__']}) ")
            continue
        try:
            image = decode_image(raw[ext], size)
        except (OSError, ValueError):
            counter.add("decode_error", detail=f"(key {raw['__key__']}) ")
            continue
        extra = {k: raw[k] for k in ("json", "cls") if k in raw}
        batch.append({"__key__": raw["__key__"], "image": image, "txt": raw["txt"].decode("utf-8"), **extra})
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def caption_embeddings(text: TextConditioner, captions: list[str]) -> list[np.ndarray]:
    """The frozen encoder's output for each caption, real tokens only: [(L_i, D) fp16]."""
    out = text(captions)
    lengths = out["context_mask"].sum(dim=1).tolist()
    context = out["context"].float().cpu().numpy().astype(np.float16)  # (B, L, D)
    return [context[i, : int(n)] for i, n in enumerate(lengths)]


def encode_shards(
    pattern: str,
    out_dir: str,
    prefix: str,
    ae: FrozenAutoencoder,
    image_size: int,
    batch_size: int,
    max_per_shard: int,
    device: torch.device,
    text: TextConditioner | None = None,
) -> dict[str, Any]:
    """Image shards -> latent shards (fp16 scaled latents, caption, [frozen text embeddings]) + index with identity."""
    counter = SkipCounter("encode")
    moments = LatentMoments()  # of the scaled latents written
    ae = ae.to(device)
    text = text.to(device) if text is not None else None

    def samples() -> Iterator[dict]:
        for batch in image_batches(expand_urls(pattern), image_size, batch_size, counter):
            z = ae.encode(torch.stack([s["image"] for s in batch]).to(device)).float()  # (B, C, h, w), scaled
            moments.update(z)
            embs = (
                caption_embeddings(text, [s["txt"] for s in batch])
                if text is not None
                else [None] * len(batch)
            )
            for s, zi, emb in zip(batch, z.cpu().numpy().astype(np.float16), embs, strict=True):
                extra = {k: s[k] for k in ("json", "cls") if k in s}
                if emb is not None:
                    extra["emb.npy"] = emb
                yield {"__key__": s["__key__"], "latent.npy": zi, "txt": s["txt"], **extra}

    write_shards(samples(), out_dir, prefix=prefix, max_per_shard=max_per_shard)
    meta = {
        "autoencoder": ae.identity,
        "image_size": image_size,
        "source": pattern,
        "text_encoder": {"pretrained": text.pretrained, "max_length": text.max_length}
        if text is not None
        else None,
        "latent_shape": [
            ae.latent_channels,
            image_size // ae.downsample_factor,
            image_size // ae.downsample_factor,
        ],
        "latent_stats": moments.result(),
        "skipped": counter.as_dict(),
    }
    index_path = Path(out_dir) / f"{prefix}.json"
    index = json.loads(index_path.read_text())
    index["meta"] = meta
    tmp = index_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, index_path)
    log.info(
        "latents %s: %d samples, skipped %s, stats %s",
        prefix,
        index["total"],
        counter.as_dict(),
        meta["latent_stats"],
    )
    return meta


def device_of(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def text_encoder(name: str | None, max_length: int) -> TextConditioner | None:
    """The frozen text encoder whose output is stored with the latents (``none`` to store captions only)."""
    if name in (None, "", "none"):
        return None
    return TextConditioner(pretrained=name, max_length=max_length, dropout_prob=0.0)


def cmd_latents(args: argparse.Namespace) -> None:
    ae = load_autoencoder(args.autoencoder, args.subfolder, args.scale_factor)
    encode_shards(
        args.shards,
        args.out,
        args.prefix,
        ae,
        args.image_size,
        args.batch_size,
        args.max_per_shard,
        device_of(args.device),
        text_encoder(args.text_encoder, args.max_length),
    )


def cmd_emoji(args: argparse.Namespace) -> None:
    root = Path(args.out)
    counts = split_samples(
        emoji_samples(size=args.size, limit=args.limit), str(root / "images"), args.max_per_shard
    )
    log.info("emoji image shards: %s", counts)
    if args.images_only:
        return
    ae = load_autoencoder(args.autoencoder, None, None)
    text = text_encoder(args.text_encoder, args.max_length)
    for prefix in ("train", "val"):
        index = read_index(str(root / "images" / f"{prefix}.json"))
        pattern = ",".join(index["paths"])
        encode_shards(
            pattern,
            str(root / "latents"),
            prefix,
            ae,
            args.size,
            128,
            args.max_per_shard,
            device_of(args.device),
            text,
        )


# ---------------------------------------------------------------------------------------------- export
@torch.no_grad()
def cmd_export(args: argparse.Namespace) -> None:
    """Stage-1 Lightning checkpoint -> PATH.safetensors + PATH.json, with scale_factor = 1 / std of the latents."""
    model = kl_autoencoder_from_checkpoint(args.ckpt).eval()
    counter = SkipCounter("export")
    moments, num_images = LatentMoments(), 0  # streamed: memory stays flat however many shards
    for batch in image_batches(expand_urls(args.shards), args.image_size, 256, counter):
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
    }
    save_kl_autoencoder(model, args.out, scale_factor=scale, extra=extra)
    log.info(
        "exported %s(.safetensors|.json) with scale_factor %.5f from %d images", args.out, scale, num_images
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


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "emoji", help="render the built-in emoji dataset and encode it with the shipped autoencoder"
    )
    p.add_argument("--out", default="data/emoji32")
    p.add_argument("--size", type=int, default=32)
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
    p.add_argument("--max-per-shard", type=int, default=1000)
    add_text_encoder_args(p, default="none")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_latents)

    p = sub.add_parser(
        "export-autoencoder", help="stage-1 checkpoint -> safetensors + json with its latent scale"
    )
    p.add_argument("--ckpt", required=True)
    p.add_argument("--shards", required=True, help="training image shards, to measure the latent std")
    p.add_argument("--out", required=True, help="output path without extension")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--recipe", default="python train.py experiment=autoencoder_emoji")
    p.set_defaults(func=cmd_export)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
