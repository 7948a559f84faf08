"""Score a checkpoint (or every checkpoint of a run):
`python eval.py ckpt=PATH|RUN_DIR|latest num_samples=2000`.

For each checkpoint and each CFG scale, num_samples images are generated (prompt i = caption i mod C of the
reference shards, seed = seed + i: the same for every point) and scored against reference statistics of the
images of those shards (image shards; or latent shards decoded by the checkpoint's autoencoder): FID and KID
on Inception-v3 features (``ldm.evaluation``), and the CLIP score when clip_model= is set. Writes OUT_DIR
(logs/eval by default): eval.json (every point with n, sampler, steps, CFG scale, seed, EMA, ...), eval.csv
and plots (fid_vs_cfg.png; fid_vs_clip.png with CLIP; fid_vs_step.png over several checkpoints). Finished
points in eval.json are not redone. Reference statistics are cached (ref_stats=, OUT_DIR/ref_stats.npz by
default) and refused when the shards, image size, source or extractor changed.

Checkpoints load through ``load_for_sampling`` (allowlisted configs, finite weights). Bad input ends the
command with one line on stderr and exit status 2 (``ldm.cli.exit_on_user_error``).
"""

from __future__ import annotations

import logging
import time
from numbers import Real
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from tqdm import tqdm

from ldm.cli import exit_on_user_error
from ldm.conditioning.multi import sampling_inputs
from ldm.data.rgb import parse_background
from ldm.data.urls import expand_urls
from ldm.evaluation import EXTRACTORS, ClipScorer, build_extractor
from ldm.evaluation.reference import ReferenceStats, load_or_compute
from ldm.evaluation.results import Results, plot, point_key
from ldm.generate import generate, make_grid, to_pil
from ldm.instantiate import build
from ldm.lit.loading import SamplingModel, load_for_sampling, read_checkpoint, resolve_checkpoint
from ldm.quality import reference_batches, reference_identity, score_features, shard_captions, shard_kind
from ldm.sampling.grids import sampling_sigmas
from sample import check_out_dir, positive_int

log = logging.getLogger("eval")

NAME_ORDER = ("step_", "best_", "last")  # of several files at one step, score the first kind found


# ---------------------------------------------------------------------------------------------- arguments
def cfg_scales(value: Any) -> list[float]:
    items = list(value) if isinstance(value, ListConfig | list | tuple) else [value]
    if not items or not all(isinstance(v, Real) and not isinstance(v, bool) for v in items):
        raise ValueError(f"cfg_scale={value} must be a number or a list of numbers: e.g. cfg_scale=[1,3,5,7]")
    return [float(v) for v in items]


def check_args(cfg: DictConfig) -> list[float]:
    for key in ("num_samples", "steps", "batch_size", "max_ref_images", "kid_subsets", "kid_subset_size"):
        positive_int(cfg, key)
    if cfg.num_samples < 2:
        raise ValueError(f"num_samples={cfg.num_samples}: FID needs at least 2 images, e.g. num_samples=2000")
    if cfg.extractor not in EXTRACTORS:
        raise ValueError(f"extractor={cfg.extractor!r} is unknown: use one of {sorted(EXTRACTORS)}")
    check_out_dir(Path(cfg.out_dir))
    parse_background(cfg.alpha_background)
    return cfg_scales(cfg.cfg_scale)


# ---------------------------------------------------------------------------------------------- checkpoints
def rank(path: Path) -> int:
    return next((i for i, p in enumerate(NAME_ORDER) if path.name.startswith(p)), len(NAME_ORDER))


def checkpoint_info(path: Path) -> dict[str, Any]:
    """The step and stored config of a checkpoint (its weights are read later, by load_for_sampling)."""
    checkpoint = read_checkpoint(path)
    return {
        "global_step": int(checkpoint.get("global_step", -1)),
        "ldm_config": checkpoint.get("ldm_config") or {},
    }


def find_checkpoints(spec: str, log_dir: str) -> list[tuple[Path, dict[str, Any]]]:
    """[(path, checkpoint_info)]: one file, or one per training step of a run directory, by step."""
    path = resolve_checkpoint(spec, log_dir)
    if not path.is_dir():
        return [(path, checkpoint_info(path))]
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    files = sorted(folder.glob("*.ckpt"), key=lambda p: (rank(p), p.name))
    if not files:
        raise FileNotFoundError(f"no *.ckpt in '{folder}': pass ckpt=RUN_DIR of a train.py run, or ckpt=PATH")
    by_step: dict[int, tuple[Path, dict[str, Any]]] = {}
    for file in files:
        info = checkpoint_info(file)
        by_step.setdefault(info["global_step"], (file, info))
    log.info("%d checkpoints in %s (steps %s)", len(by_step), folder, sorted(by_step))
    return [by_step[step] for step in sorted(by_step)]


def point_settings(cfg: DictConfig, path: Path, info: dict[str, Any]) -> dict[str, Any]:
    """What defines a point (besides its CFG scale): recorded with every number and used as its resume key."""
    config = info["ldm_config"]
    sampler = cfg.sampler if cfg.sampler is not None else config.get("sampler")
    if sampler is None:
        raise ValueError(f"'{path}' stores no sampler: pass sampler=ddim (or another configs/sampler/ name)")
    sampler = OmegaConf.to_container(sampler) if isinstance(sampler, DictConfig) else dict(sampler)
    shards = cfg.shards or (config.get("data") or {}).get("val_shards")
    if not shards:
        raise ValueError(f"'{path}' names no data.val_shards: pass shards=PATH to image or latent shards")
    return {
        "checkpoint": str(path.resolve()),
        "step": info["global_step"],
        "n": cfg.num_samples,
        "sampler": str(sampler["_target_"]).rsplit(".", 1)[-1].removeprefix("sample_"),
        "sampler_config": sampler,
        "steps": cfg.steps,
        "spacing": cfg.spacing,
        "seed": cfg.seed,
        "use_ema": cfg.use_ema,
        "guidance_rescale": cfg.guidance_rescale,
        "negative_prompt": cfg.negative_prompt,
        "extractor": cfg.extractor,
        "shards": str(shards),
        "ref_stats": str(ref_stats_path(cfg)),
        "kid_subsets": cfg.kid_subsets,
        "kid_subset_size": cfg.kid_subset_size,
        "clip_model": cfg.clip_model,
    }


def ref_stats_path(cfg: DictConfig) -> Path:
    return Path(cfg.ref_stats) if cfg.ref_stats else Path(cfg.out_dir) / "ref_stats.npz"


# --------------------------------------------------------------------------------------------- reference data
def reference(cfg: DictConfig, settings: dict[str, Any], model: SamplingModel, extractor) -> tuple:
    """(captions, ReferenceStats) of the shards: the prompts and the image statistics they are scored by."""
    urls = expand_urls(settings["shards"])
    kind = shard_kind(urls)
    if kind == "latents":
        log.info(
            "reference images: the autoencoder's decodings of latent shards (FID then leaves out the "
            "autoencoder's own error); pass shards=IMAGE_SHARDS to score against the real images"
        )
    size, background = int(model.config["image_size"]), parse_background(cfg.alpha_background)
    identity = reference_identity(
        urls, cfg.max_ref_images, kind, size, model.autoencoder.identity, background
    )
    device = next(model.denoiser.parameters()).device
    batches = reference_batches(
        urls,
        kind,
        size,
        cfg.max_ref_images,
        cfg.batch_size,
        background,
        decode=lambda z: model.autoencoder.decode(
            z.to(device)
        ),  # (B, C, h, w) scaled latents -> about [-1, 1]
        wrap=lambda it: tqdm(it, desc="reference", disable=not cfg.progress),
    )
    ref = load_or_compute(ref_stats_path(cfg), identity, extractor, batches)
    captions = shard_captions(urls, cfg.max_ref_images)
    log.info(
        "%d prompts (captions) and %d reference images (%s) from %s",
        len(captions),
        ref.n,
        kind,
        settings["shards"],
    )
    return captions, ref


# ---------------------------------------------------------------------------------------------- one point
def score_point(
    cfg: DictConfig,
    model: SamplingModel,
    settings: dict[str, Any],
    scale: float,
    captions: list[str],
    ref: ReferenceStats,
    extractor,
    clip: ClipScorer | None,
) -> dict[str, Any]:
    """Generate n images at one CFG scale, extract features as they come, then FID, KID (and CLIP score)."""
    sampler = build(OmegaConf.create(settings["sampler_config"]))
    sigmas = sampling_sigmas(model.denoiser.schedule, cfg.steps, spacing=cfg.spacing)
    features, clip_scores, grid = [], [], []
    sample_s = score_s = 0.0
    bar = tqdm(total=cfg.num_samples, desc=f"step {settings['step']} cfg {scale:g}", disable=not cfg.progress)
    for start in range(0, cfg.num_samples, cfg.batch_size):
        seeds = list(range(cfg.seed + start, cfg.seed + min(start + cfg.batch_size, cfg.num_samples)))
        prompts = [captions[(s - cfg.seed) % len(captions)] for s in seeds]
        negative = None if cfg.negative_prompt is None else [cfg.negative_prompt] * len(prompts)
        t0 = time.perf_counter()
        inputs = sampling_inputs(
            model.conditioner,
            prompts,
            None,
            [d * model.autoencoder.downsample_factor for d in model.latent_shape[1:]],
        )
        images = generate(
            model.denoiser,
            model.conditioner,
            model.decode_samples,
            inputs,
            sampler=sampler,
            sigmas=sigmas,
            latent_shape=model.latent_shape,
            seeds=seeds,
            cfg_scale=scale,
            guidance_rescale=cfg.guidance_rescale,
            negative_prompt=negative,
        )
        t1 = time.perf_counter()
        features.append(extractor(images).float().cpu())  # (B, D)
        if clip is not None:
            clip_scores.append(clip(images, prompts))  # (B,)
        sample_s, score_s = sample_s + t1 - t0, score_s + time.perf_counter() - t1
        grid.extend(to_pil(images[: max(0, cfg.save_grid - len(grid))]))
        bar.update(len(seeds))
    bar.close()
    t0 = time.perf_counter()
    metrics = score_features(
        torch.cat(features), ref, cfg.kid_subsets, cfg.kid_subset_size, cfg.seed, clip_scores
    )
    if grid:
        name = f"grid_step{settings['step']}_cfg{scale:g}.png"
        make_grid(grid, ncols=min(8, len(grid))).save(Path(cfg.out_dir) / name)
    return {
        **settings,
        "cfg_scale": scale,
        **metrics,
        "sample_seconds": round(sample_s, 2),
        "score_seconds": round(score_s + time.perf_counter() - t0, 2),
        "finished": time.strftime("%FT%T"),
    }


# ---------------------------------------------------------------------------------------------- the run
class Scorer:
    """Extractor, CLIP model, prompts and reference: built once, when the first point needs them."""

    def __init__(self, cfg: DictConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.extractor = self.clip = None
        self.refs: dict[str, tuple[list[str], ReferenceStats]] = {}

    def prepare(self, settings: dict[str, Any], model: SamplingModel) -> tuple[list[str], ReferenceStats]:
        if self.extractor is None:
            self.extractor = build_extractor(self.cfg.extractor, self.device)
            self.clip = ClipScorer(self.cfg.clip_model, self.device) if self.cfg.clip_model else None
        if settings["shards"] not in self.refs:
            self.refs[settings["shards"]] = reference(self.cfg, settings, model, self.extractor)
        return self.refs[settings["shards"]]


def run(cfg: DictConfig) -> list[dict[str, Any]]:
    """Scores every (checkpoint, CFG scale) not yet in OUT_DIR/eval.json; returns this call's records
    (all)."""
    scales = check_args(cfg)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    )
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)  # grids land here before eval.json is first written
    results = Results(cfg.out_dir)
    scorer = Scorer(cfg, device)
    keys: list[str] = []
    for path, info in find_checkpoints(str(cfg.ckpt), cfg.log_dir):
        settings = point_settings(cfg, path, info)
        points = [{**settings, "cfg_scale": s} for s in scales]
        keys += [point_key(p) for p in points]
        todo = [p for p in points if not results.done(p)]
        if not todo:
            log.info(
                "step %d (%s): all %d CFG scales already in %s",
                settings["step"],
                path.name,
                len(points),
                results.path,
            )
            continue
        model = load_for_sampling(
            path, cfg.use_ema, device, trust_checkpoint_config=cfg.trust_checkpoint_config
        )
        captions, ref = scorer.prepare(settings, model)
        for point in todo:
            record = score_point(
                cfg, model, settings, point["cfg_scale"], captions, ref, scorer.extractor, scorer.clip
            )
            results.add(record)
            log.info(
                "step %d cfg %g: FID %.3f  KID %.5f ± %.5f%s  (n=%d, %s %d steps, seed %d, %s)",
                record["step"],
                record["cfg_scale"],
                record["fid"],
                record["kid"],
                record["kid_std"],
                "" if record["clip_score"] is None else f"  CLIP {record['clip_score']:.2f}",
                record["n"],
                record["sampler"],
                record["steps"],
                record["seed"],
                "EMA" if record["use_ema"] else "raw",
            )
    wanted = set(keys)
    records = [r for r in results.records if point_key(r) in wanted]
    plot(records, cfg.out_dir)
    log.info("%d points in %s (eval.json, eval.csv)", len(records), cfg.out_dir)
    return records


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
