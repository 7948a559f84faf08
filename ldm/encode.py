"""Image shards -> latent shards with a frozen autoencoder (and optionally a frozen text encoder): precompute
once, train many times.

Layout: the i-th image shard of a pattern becomes ``{prefix}-{i:06d}.tar`` (``KEY.latent.npy`` fp16 scaled
latents, ``KEY.txt``, ``[KEY.emb.npy]`` fp16 embeddings of the real tokens, ``[KEY.json|cls]``), written
through a ``.tmp`` file and renamed, then a sidecar ``{prefix}-{i:06d}.tar.done.json``: the image shard (path,
size, mtime), the settings (autoencoder identity, image size, text encoder, latent shape), count, skipped
samples per reason and the shard's latent moments. A shard is finished when both files exist and the sidecar
matches the current image shard and settings, so a restarted encode only does the rest. Shards go round-robin
to ranks x local worker processes; the process that finds every shard finished writes the index
``{prefix}.json`` (``ldm.data.shards.read_index`` format) with the moments summed in shard order, so 1 or N
processes, or an interrupted run, give the same bytes.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ldm.autoencoder.frozen import FrozenAutoencoder
from ldm.autoencoder.loaders import LatentMoments
from ldm.conditioning.text import TextConditioner
from ldm.data.buckets import Bucket, bucket_name, check_buckets, crop_rng, parse_buckets
from ldm.data.image_batches import image_batches
from ldm.data.labels import carried_label_meta
from ldm.data.overwrite import check_latent_outputs
from ldm.data.rgb import parse_background
from ldm.data.shards import SkipCounter, write_index, write_json_atomic, write_shard
from ldm.data.urls import expand_urls

__all__ = ["encode_settings", "encode_shards", "image_batches", "merge_latent_index"]

log = logging.getLogger(__name__)

SIDECAR = ".done.json"  # train-000003.tar -> train-000003.tar.done.json
SHARD_FORMAT = "ldm.latent_shard/1"


# -------------------------------------------------------------------------------------------- what a shard is
def encode_settings(
    ae: FrozenAutoencoder,
    image_size: int,
    text: TextConditioner | None,
    buckets: Sequence[Bucket] | None = None,
    bucket_crop: str = "center",
    bucket_seed: int = 0,
    alpha_background: str | Sequence[int] = "white",
) -> dict[str, Any]:
    """What a latent shard depends on besides its image shard (batch size and device are not part of it),
    including the colour behind transparent pixels ("alpha_background" [r, g, b]).

    With ``buckets`` (H, W): "buckets", "bucket_crop" [, "bucket_seed"], "latent_shapes" (one (C, h, w) per
    bucket); "latent_shape" is the single bucket's shape, or None for several, and "image_size" is None.
    """
    f = ae.downsample_factor
    settings: dict[str, Any] = {
        "autoencoder": ae.identity,
        "image_size": image_size,
        "text_encoder": None
        if text is None
        else {
            "pretrained": text.pretrained,
            "max_length": text.max_length,
            **({} if text.mask_padding else {"mask_padding": False}),
        },
        "latent_shape": [ae.latent_channels, image_size // f, image_size // f],
        "alpha_background": list(parse_background(alpha_background)),
    }
    if buckets is not None:
        check_buckets(buckets, f)
        crop_rng(bucket_crop, bucket_seed, "")  # checks the crop mode
        shapes = [[ae.latent_channels, h // f, w // f] for h, w in buckets]
        settings.update(image_size=None, latent_shape=shapes[0] if len(shapes) == 1 else None)
        settings.update(buckets=[list(b) for b in buckets], bucket_crop=bucket_crop, latent_shapes=shapes)
        if bucket_crop == "random":
            settings["bucket_seed"] = bucket_seed
    return json.loads(json.dumps(settings))  # as a sidecar reads back: lists, plain floats


def describe(settings: dict[str, Any]) -> str:
    """Settings in one line, for errors that show two of them."""
    ae, text = settings.get("autoencoder") or {}, settings.get("text_encoder") or {}
    return (
        f"(autoencoder {ae.get('name')} sha256 {str(ae.get('sha256'))[:12]} scale {ae.get('scale_factor')} "
        f"shift {ae.get('shift_factor')}, latents "
        f"{settings.get('latent_shapes') or settings.get('latent_shape')} from "
        f"{settings.get('image_size') or settings.get('buckets')} px, text encoder {text.get('pretrained')})"
    )


@dataclass(frozen=True)
class ShardJob:
    url: str  # the image shard
    name: str  # the latent shard written for it: {prefix}-{i:06d}.tar for the i-th image shard
    source: dict[str, Any]  # the image shard's identity: path, size and mtime for local files


def plan_jobs(pattern: str, prefix: str) -> list[ShardJob]:
    """One latent shard per image shard, named by its position in the expanded pattern; a missing local image
    shard raises (dropping it would renumber every later one, and ranks seeing other files would clash)."""
    jobs = []
    for i, url in enumerate(expand_urls(pattern, require_all=True)):
        path = Path(url.removeprefix("file://"))
        source: dict[str, Any] = {"url": url}
        if path.is_file():
            st = path.stat()
            source = {"url": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        jobs.append(ShardJob(url, f"{prefix}-{i:06d}.tar", source))
    return jobs


def read_sidecar(out: Path, name: str) -> dict[str, Any] | None:
    """The sidecar of a complete latent shard, or None (no shard, no sidecar, unreadable, size mismatch)."""
    shard, sidecar = out / name, out / f"{name}{SIDECAR}"
    if not (shard.is_file() and sidecar.is_file()):
        return None
    try:
        side = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    ok = side.get("format") == SHARD_FORMAT and side.get("bytes") == shard.stat().st_size
    return side if ok else None


def is_finished(side: dict[str, Any] | None, job: ShardJob, settings: dict[str, Any]) -> bool:
    return side is not None and side.get("source") == job.source and side.get("settings") == settings


# ---------------------------------------------------------------------------------------------- encoding
def encode_one(
    job: ShardJob,
    out: Path,
    ae: FrozenAutoencoder,
    text: TextConditioner | None,
    settings: dict[str, Any],
    batch_size: int,
    device: torch.device,
) -> dict[str, Any]:
    """One image shard -> one latent shard + its sidecar (written last: from then on the shard counts as
    done)."""
    counter = SkipCounter(f"encode {Path(job.url).name}")
    moments = LatentMoments()  # of the fp16 latents as stored
    buckets: Counter[str] = Counter()
    bucketing = (
        settings.get("buckets"),
        settings.get("bucket_crop", "center"),
        settings.get("bucket_seed", 0),
        parse_background(settings["alpha_background"]),
    )

    def samples() -> Iterator[dict]:
        for batch in image_batches([job.url], settings["image_size"], batch_size, counter, *bucketing):
            images = torch.stack([s["image"] for s in batch]).to(device)  # (B, 3, H, W), one bucket
            z = ae.encode(images).half()  # (B, C, h, w), scaled
            moments.update(z)
            buckets[bucket_name(images.shape[2:])] += len(batch)
            embs = (
                text.token_embeddings([s["txt"] for s in batch]) if text is not None else [None] * len(batch)
            )
            for s, zi, emb in zip(batch, z.cpu().numpy(), embs, strict=True):
                extra = {k: s[k] for k in ("json", "cls") if k in s}
                if "size" in s:  # original_size, crop_top_left, target_size (the bucket)
                    extra["size.json"] = s["size"]
                if emb is not None:
                    extra["emb.npy"] = emb
                yield {"__key__": s["__key__"], "latent.npy": zi, "txt": s["txt"], **extra}

    count = write_shard(samples(), out / job.name)
    side = {
        "format": SHARD_FORMAT,
        "shard": job.name,
        "source": job.source,
        "settings": settings,
        "count": count,
        "bytes": (out / job.name).stat().st_size,
        "skipped": counter.as_dict(),
        "moments": moments.state(),
        "latent_stats": moments.result() if moments.count >= 2 else None,
    }
    if "buckets" in settings:
        side["bucket_counts"] = {bucket_name(b): buckets[bucket_name(b)] for b in settings["buckets"]}
    write_json_atomic(out / f"{job.name}{SIDECAR}", side)
    log.info("latents %s <- %s: %d samples, skipped %s", job.name, job.url, count, counter.as_dict())
    return side


def encode_worker(
    jobs: list[ShardJob],
    out_dir: str,
    ae: FrozenAutoencoder,
    text: TextConditioner | None,
    settings: dict[str, Any],
    batch_size: int,
    device: str,
    threads: int | None = None,
) -> list[str]:
    """Encodes the unfinished shards among ``jobs`` on one device; returns the names it wrote."""
    if threads is not None:
        torch.set_num_threads(threads)
    out = Path(out_dir)
    todo = [j for j in jobs if not is_finished(read_sidecar(out, j.name), j, settings)]
    if todo:
        dev = torch.device(device)
        ae, text = ae.to(dev), (text.to(dev) if text is not None else None)
        for job in todo:
            encode_one(job, out, ae, text, settings, batch_size, dev)
    return [j.name for j in todo]


def _worker_logging(level: int) -> None:
    """A spawned worker starts without logging configured: log at the parent's level."""
    logging.basicConfig(level=level, format="[%(asctime)s][%(name)s][pid %(process)d] - %(message)s")


def dist_env(rank: int | None, world_size: int | None) -> tuple[int, int, int]:
    """(rank, world size, local rank) from the arguments, else torchrun's or SLURM's variables, else (0, 1,
    0)."""

    def env(*names: str, default: int) -> int:
        return int(next((os.environ[n] for n in names if n in os.environ), default))

    rank = env("RANK", "SLURM_PROCID", default=0) if rank is None else rank
    world_size = env("WORLD_SIZE", "SLURM_NTASKS", default=1) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}: pass 0 <= --rank < --world-size")
    return rank, world_size, env("LOCAL_RANK", "SLURM_LOCALID", default=0)


def _device_list(device: torch.device | str | Sequence[str]) -> list[str]:
    if isinstance(device, torch.device):
        return [str(device)]
    names = device.split(",") if isinstance(device, str) else list(device)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError("no device given: pass e.g. device='cpu' or a comma list of devices")
    return names


def check_out_dir(out: Path, jobs: list[ShardJob], settings: dict[str, Any], overwrite: bool) -> None:
    """Refuse to mix latents made with other settings (another autoencoder...) into ``out`` unless
    ``overwrite``."""
    for job in jobs:
        side = read_sidecar(out, job.name)
        if side is not None and side.get("settings") != settings:
            if not overwrite:
                raise ValueError(
                    f"{out / job.name} was encoded with {describe(side['settings'])} but this run uses "
                    f"{describe(settings)}: pass --overwrite to re-encode, or choose another --out"
                )
            log.warning("re-encoding shards in %s made with %s", out, describe(side["settings"]))
            return


def encode_in_processes(
    todo: list[ShardJob],
    out_dir: str,
    ae: FrozenAutoencoder,
    text: TextConditioner | None,
    settings: dict[str, Any],
    batch_size: int,
    devices: list[str],
    threads: int,
) -> list[str]:
    """``encode_worker`` in one spawned process per device entry, shard j of ``todo`` to process j % n."""
    ctx = multiprocessing.get_context("spawn")  # CUDA-safe; workers re-import, nothing is forked
    level = logging.getLogger().getEffectiveLevel()
    n = len(devices)
    with ProcessPoolExecutor(n, mp_context=ctx, initializer=_worker_logging, initargs=(level,)) as pool:
        futures = [
            pool.submit(
                encode_worker, todo[j::n], out_dir, ae, text, settings, batch_size, devices[j], threads
            )
            for j in range(n)
        ]
        return sorted(name for fut in futures for name in fut.result())


def encode_shards(
    pattern: str,
    out_dir: str,
    prefix: str,
    ae: FrozenAutoencoder,
    image_size: int,
    batch_size: int,
    device: torch.device | str | Sequence[str] = "cpu",
    text: TextConditioner | None = None,
    *,
    num_procs: int = 1,
    rank: int | None = None,
    world_size: int | None = None,
    overwrite: bool = False,
    threads: int | None = None,
    buckets: str | Sequence[Sequence[int]] | None = None,
    bucket_crop: str = "center",
    bucket_seed: int = 0,
    latent_multiple: int = 1,
    alpha_background: str | Sequence[int] = "white",
) -> dict[str, Any]:
    """Image shards -> latent shards (resumable, split over ranks and processes), then the index.

    ``buckets`` ("HxW,..." or [(H, W), ...], see ``ldm.data.buckets``): each image is resized and cropped into
    its nearest bucket (``bucket_crop`` "center" or "random" with ``bucket_seed``) instead of image_size
    squared; every bucket side must be a multiple of the autoencoder factor x ``latent_multiple`` (the UNet's
    2**(levels - 1)). Each sample then also stores ``KEY.size.json`` and the index counts samples per bucket.

    ``alpha_background`` (white, black, #rrggbb, r,g,b): the colour behind transparent pixels, part of the
    settings.

    ``device``: one device, or several (a comma list) that the local workers take in turn. Shard i goes to
    global worker i % (world_size * num_procs); ``num_procs`` > 1 spawns processes (each gets the autoencoder
    and text encoder pickled, and ``threads`` CPU threads, by default 1/num_procs of this process's). The
    bytes are the same for any split when the device and the threads per process are (CPU float sums depend on
    the thread count). Finished shards are skipped; shards made with other settings raise unless
    ``overwrite``. Returns {"encoded": shard names this call wrote, "meta": the index meta, or None while
    shards of other ranks are unfinished}.
    """
    if num_procs < 1:
        raise ValueError(f"num_procs={num_procs}: pass 1 or more")
    out = Path(out_dir)
    fixed = None if buckets is None else parse_buckets(buckets)
    if fixed is not None:
        check_buckets(fixed, ae.downsample_factor * latent_multiple)
    settings = encode_settings(ae, image_size, text, fixed, bucket_crop, bucket_seed, alpha_background)
    jobs = plan_jobs(pattern, prefix)
    unfinished = [j.name for j in jobs if read_sidecar(out, j.name) is None]
    check_latent_outputs(out, prefix, [j.name for j in jobs], [j.url for j in jobs], unfinished, SIDECAR)
    check_out_dir(out, jobs, settings, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    rank, world_size, local_rank = dist_env(rank, world_size)
    mine = jobs[rank::world_size]
    todo = [j for j in mine if not is_finished(read_sidecar(out, j.name), j, settings)]
    log.info(
        "latents %s rank %d/%d: %d shards, %d finished before, %d to encode",
        prefix,
        rank,
        world_size,
        len(mine),
        len(mine) - len(todo),
        len(todo),
    )
    names = _device_list(device)
    devices = [names[(local_rank * num_procs + j) % len(names)] for j in range(num_procs)]
    if num_procs == 1:
        encoded = encode_worker(todo, out_dir, ae, text, settings, batch_size, devices[0], threads)
    else:
        threads = threads or max(1, torch.get_num_threads() // num_procs)
        encoded = encode_in_processes(todo, out_dir, ae, text, settings, batch_size, devices, threads)
    return {"encoded": encoded, "meta": merge_latent_index(pattern, out_dir, prefix, settings)}


def merge_latent_index(
    pattern: str, out_dir: str, prefix: str, settings: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """Writes ``{prefix}.json`` from the sidecars once every shard is finished (None before).

    Counts, total, skipped per reason, and the latent moments summed in shard order: the result does not
    depend on how the shards were split. Without ``settings`` those of the first sidecar are used, and all
    must agree.
    """
    out = Path(out_dir)
    jobs = plan_jobs(pattern, prefix)
    check_latent_outputs(out, prefix, [], [j.url for j in jobs], [], SIDECAR)  # the index only
    sides = [read_sidecar(out, j.name) for j in jobs]
    settings = settings or next((s["settings"] for s in sides if s is not None), None)
    waiting = [
        j.name
        for j, s in zip(jobs, sides, strict=True)
        if settings is None or not is_finished(s, j, settings)
    ]
    if waiting:
        log.info(
            "latents %s: %d of %d shards unfinished (%s ...); the last process to finish writes the index, "
            "or run `prepare.py latents-merge`",
            prefix,
            len(waiting),
            len(jobs),
            waiting[0],
        )
        return None
    done = [s for s in sides if s is not None]
    moments, skipped, buckets = LatentMoments(), Counter(), Counter()
    for side in done:
        moments.merge(LatentMoments.from_state(side["moments"]))
        skipped.update(side["skipped"])
        buckets.update(side.get("bucket_counts", {}))
    meta: dict[str, Any] = {
        **(settings or {}),  # autoencoder (identity), image_size, text_encoder, latent_shape
        "source": pattern,
        "image_shards": [j.source["url"] for j in jobs],
        "latent_stats": moments.result(),  # per-channel and overall mean/std of the stored latents
        "moments": moments.state(),  # the raw sums, to merge with other shard sets
        "skipped": dict(sorted(skipped.items())),
        **carried_label_meta([j.url for j in jobs]),  # labels, label_level of labelled image shards
    }
    if "buckets" in meta:  # samples per bucket, in bucket order
        meta["bucket_counts"] = {bucket_name(b): buckets[bucket_name(b)] for b in meta["buckets"]}
    current = {j.name for j in jobs}
    stale = sorted(p.name for p in out.glob(f"{prefix}-*.tar") if p.name not in current)
    if stale:
        log.warning(
            "latents %s: %d shards beyond the current image shards are not in the index (%s ...)",
            prefix,
            len(stale),
            stale[0],
        )
    write_index(out, prefix, [j.name for j in jobs], [s["count"] for s in done], meta)
    log.info(
        "latents %s: index of %d samples in %d shards, skipped %s, stats %s",
        prefix,
        sum(s["count"] for s in done),
        len(jobs),
        meta["skipped"],
        meta["latent_stats"],
    )
    return meta
