"""Our discrete DDPM schedule + prediction type <-> a diffusers scheduler config (``scheduler_config.json``).

Only ``DiscreteSchedule`` has a diffusers counterpart (the DDPM-family schedulers: DDIM, DDPM, PNDM, Euler,
DPM-Solver, UniPC all share ``num_train_timesteps``, ``beta_schedule``, ``beta_start``/``beta_end``,
``prediction_type`` and ``rescale_betas_zero_snr``). The betas agree: diffusers'
"linear"/"scaled_linear"/"squaredcos_cap_v2" are our "linear"/"scaled_linear"/"cosine" (computed in float32
there, float64 here), and "rescale_betas_zero_snr" is our ``zero_terminal_snr`` (Lin et al. 2024, Algorithm
1).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ldm.diffusion.schedules import DiscreteSchedule

BETA_NAMES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
PREDICTION_NAMES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
# The diffusion config that matches each (beta schedule, prediction) of Stable Diffusion checkpoints.
DIFFUSION_OPTIONS = {
    ("scaled_linear", "eps"): "diffusion=ddpm_scaled_linear_eps",
    ("scaled_linear", "v"): "diffusion=ddpm_scaled_linear_v",
    ("linear", "eps"): "diffusion=ddpm_linear_eps",
    ("cosine", "eps"): "diffusion=ddpm_cosine_eps",
}


def scheduler_config_from_schedule(
    schedule: Any, prediction: str, *, spacing: str = "trailing", scheduler_class: str = "DDIMScheduler"
) -> dict[str, Any]:
    """A diffusers scheduler config for our schedule and prediction type (``from_config`` of any DDPM-family
    scheduler reads it). Sampling settings follow ``sample.py``'s defaults: ``spacing`` is diffusers'
    ``timestep_spacing`` (sample.py's default for DDPM schedules is "trailing"; ``steps_offset=1`` as in
    ``get_sigmas_discrete``), and DDIM's last step lands on x0 (``set_alpha_to_one``) as our grids end at
    sigma 0."""
    if not isinstance(schedule, DiscreteSchedule):
        raise ValueError(
            f"{type(schedule).__name__} has no diffusers DDPM-scheduler equivalent: only discrete DDPM "
            f"schedules "
            "(diffusion=ddpm_*) export to a Stable Diffusion pipeline"
        )
    if prediction not in PREDICTION_NAMES:
        raise ValueError(f"prediction={prediction!r} has no diffusers prediction_type: use eps, v or x0")
    return {
        "_class_name": scheduler_class,
        "num_train_timesteps": schedule.num_timesteps,
        "beta_schedule": BETA_NAMES[schedule.beta_schedule],
        "beta_start": schedule.beta_start,
        "beta_end": schedule.beta_end,
        "trained_betas": None,
        "prediction_type": PREDICTION_NAMES[prediction],
        "rescale_betas_zero_snr": schedule.zero_terminal_snr,
        "timestep_spacing": spacing,
        "steps_offset": 1,
        "set_alpha_to_one": True,
        "clip_sample": False,
        "thresholding": False,
    }


def check_schedule_matches(config: Mapping[str, Any], schedule: Any, prediction: str, source: str) -> None:
    """Refuse (one line naming the field and the fix) a pretrained scheduler config that our schedule or
    prediction type does not reproduce: fine-tuning on another noise schedule than the weights learnt wastes
    them."""
    theirs_beta = {v: k for k, v in BETA_NAMES.items()}.get(config.get("beta_schedule", "linear"))
    theirs_pred = {v: k for k, v in PREDICTION_NAMES.items()}.get(config.get("prediction_type", "epsilon"))
    fix = DIFFUSION_OPTIONS.get((theirs_beta, theirs_pred), "a diffusion= config with these values")
    if config.get("trained_betas") is not None or theirs_beta is None or theirs_pred is None:
        raise ValueError(
            f"{source}: scheduler beta_schedule={config.get('beta_schedule')!r} / prediction_type="
            f"{config.get('prediction_type')!r} / trained_betas have no ldm equivalent; convert the schedule "
            f"by hand"
        )
    if not isinstance(schedule, DiscreteSchedule):
        raise ValueError(
            f"{source} was trained with a discrete DDPM schedule but ours is {type(schedule).__name__}: set "
            f"{fix}"
        )
    ours = {
        "num_train_timesteps": schedule.num_timesteps,
        "beta_schedule": schedule.beta_schedule,
        "rescale_betas_zero_snr": schedule.zero_terminal_snr,
        "prediction_type": prediction,
    }
    theirs = {
        "num_train_timesteps": config.get("num_train_timesteps", 1000),
        "beta_schedule": theirs_beta,
        "rescale_betas_zero_snr": bool(config.get("rescale_betas_zero_snr", False)),
        "prediction_type": theirs_pred,
    }
    if theirs_beta != "cosine":
        ours.update(beta_start=schedule.beta_start, beta_end=schedule.beta_end)
        theirs.update(beta_start=config.get("beta_start", 0.0001), beta_end=config.get("beta_end", 0.02))
    for name, value in theirs.items():
        mine = ours[name]
        same = abs(mine - value) <= 1e-12 if isinstance(value, float) else mine == value
        if not same:
            raise ValueError(
                f"{source}: the pretrained scheduler has {name}={value!r} but this run has {mine!r}: set "
                f"{fix} (and diffusion.schedule.* to the pretrained values)"
            )
