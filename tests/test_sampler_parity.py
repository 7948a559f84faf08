"""Parity of the Euler / Heun / PLMS / DPM-Solver++ / UniPC / flow samplers with diffusers' schedulers.

Both sides run the same deterministic stand-in for a trained net (``model_fn``), the same initial noise and,
for the stochastic samplers, the same seeded generator. diffusers' Euler-family schedulers step VE states
(they scale the net input by 1 / sqrt(sigma^2 + 1) like ``Denoiser``); PNDM, DPM-Solver and UniPC step VP
states x_VP = x_VE / sqrt(1 + sigma^2), so they start from the unscaled noise; at sigma = 0 both coordinates
coincide. diffusers is only the reference here: ``ldm.sampling`` never imports it. DDIM / DDPM parity is in
test_sampling.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from torch import Tensor, nn

from ldm.diffusion import Denoiser, DiscreteSchedule
from ldm.diffusion.schedules import vp_init_noise_scale
from ldm.sampling import (
    get_sigmas_discrete,
    get_sigmas_flow,
    get_sigmas_karras,
    get_timesteps_discrete,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_flow_euler,
    sample_heun,
    sample_plms,
    sample_unipc,
)

SHAPE = (2, 3, 8, 8)
SCHED_KW = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
PRED_TYPE = {"eps": "epsilon", "v": "v_prediction"}
TOL = 1e-4
SCHED = DiscreteSchedule()
STEPS = [10, 25]
SIGMA_RTOL = 3e-5  # diffusers builds its tables from float32 betas, ours are float64


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny tensors: intra-op threads only contend on a shared two-core machine (tanh ran 100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model_fn(x_t: Tensor, t: Tensor) -> Tensor:
    """A deterministic stand-in for a trained net: any smooth function of (x_t, t) works for parity."""
    return torch.tanh(0.3 * x_t) * torch.cos(t.float() / 300).reshape(-1, 1, 1, 1)


class FnNet(nn.Module):
    """``model_fn`` as a net; ``round_t`` mimics diffusers' DPM-Solver / UniPC, which round Karras
    timesteps."""

    def __init__(self, round_t: bool = False) -> None:
        super().__init__()
        self.round_t = round_t

    def forward(self, x: Tensor, c_noise: Tensor, context=None, context_mask=None) -> Tensor:
        return model_fn(x, c_noise.round() if self.round_t else c_noise)


def _noise() -> Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))


def _rel_err(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _denoiser(prediction: str, round_t: bool = False) -> Denoiser:
    return Denoiser(FnNet(round_t), SCHED, prediction)


def _sigmas_at(timesteps: Tensor) -> Tensor:
    """Our sigma list for integer diffusers timesteps: the schedule's sigmas there, then 0."""
    return torch.cat([SCHED.sigmas[timesteps.long()], torch.zeros(1, dtype=torch.float64)]).float()


def _run_ve(ref, x: Tensor, seed: int | None = None) -> Tensor:
    """Drive a diffusers scheduler that keeps VE states and scales the net input itself (Euler family)."""
    kw = {"generator": torch.Generator().manual_seed(seed)} if seed is not None else {}
    for t in ref.timesteps:
        x = ref.step(model_fn(ref.scale_model_input(x, t), t), t, x, **kw).prev_sample
    return x


def _run_vp(ref, x: Tensor, seed: int | None = None) -> Tensor:
    """Drive a diffusers scheduler that keeps VP states (PNDM, DPM-Solver, UniPC)."""
    kw = {"generator": torch.Generator().manual_seed(seed)} if seed is not None else {}
    for t in ref.timesteps:
        x = ref.step(model_fn(x, t), t, x, **kw).prev_sample
    return x


def _karras_kw(spacing: str) -> dict:
    # The Euler family takes the Karras range from its spaced timesteps: only "linspace" (999 ... 0) spans the
    # full training range [sigma(0), sigma(999)] that get_sigmas_karras(schedule.sigma_min, sigma_max) uses.
    return dict(timestep_spacing="linspace", use_karras_sigmas=True) if spacing == "karras" else {}


def _ve_sigmas(ref, spacing: str, steps: int) -> Tensor:
    """Our sigma list for an Euler-family reference, checked against the reference's own list."""
    if spacing == "karras":
        ours = get_sigmas_karras(steps, SCHED.sigma_min, SCHED.sigma_max)
    else:
        ours = get_sigmas_discrete(SCHED, steps, spacing, steps_offset=1)
    ref_sigmas = ref.sigmas.unique_consecutive()  # Heun repeats the inner sigmas
    torch.testing.assert_close(ours, ref_sigmas, rtol=SIGMA_RTOL, atol=0)
    return ours


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "karras"])
@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_euler_and_heun_match_diffusers(sampler: str, spacing: str, prediction: str, steps: int) -> None:
    cls = EulerDiscreteScheduler if sampler == "euler" else HeunDiscreteScheduler
    kw = _karras_kw(spacing) or dict(timestep_spacing=spacing)
    ref = cls(**SCHED_KW, steps_offset=1, prediction_type=PRED_TYPE[prediction], **kw)
    ref.set_timesteps(steps)
    sigmas = _ve_sigmas(ref, spacing, steps)
    x = _noise() * vp_init_noise_scale(sigmas[0])
    expected = _run_ve(ref, x)
    fn = sample_euler if sampler == "euler" else sample_heun
    assert _rel_err(fn(_denoiser(prediction), x, sigmas), expected) <= TOL


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_euler_ancestral_matches_diffusers(spacing: str, prediction: str, steps: int) -> None:
    ref = EulerAncestralDiscreteScheduler(
        **SCHED_KW, steps_offset=1, prediction_type=PRED_TYPE[prediction], timestep_spacing=spacing
    )
    ref.set_timesteps(steps)
    sigmas = _ve_sigmas(ref, spacing, steps)
    x = _noise() * vp_init_noise_scale(sigmas[0])
    expected = _run_ve(ref, x, seed=5)
    ours = sample_euler_ancestral(
        _denoiser(prediction), x, sigmas, generator=torch.Generator().manual_seed(5)
    )
    assert _rel_err(ours, expected) <= TOL


def _run_pndm_eps(ref: PNDMScheduler, prediction: str) -> Tensor:
    """Drive PNDM in its "epsilon" mode, handing it the eps implied by model_fn as a v-prediction when asked.

    diffusers' PNDM in "v_prediction" mode runs its multistep average over the raw v outputs and converts the
    average with the current x_t (eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t); that is a different,
    parameter- isation-dependent method (13 % apart after 10 steps here). ``sample_plms`` only sees x0
    estimates and averages the eps they imply, which is what diffusers does for any net once that net's output
    is given as eps.
    """
    x, abar = _noise(), ref.alphas_cumprod
    for t in ref.timesteps:
        out = model_fn(x, t)
        if prediction == "v":
            out = abar[t].sqrt() * out + (1 - abar[t]).sqrt() * x  # Salimans & Ho 2022: eps from v
        x = ref.step(out, t, x).prev_sample
    return x


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_plms_matches_pndm_skip_prk(spacing: str, final: str, prediction: str, steps: int) -> None:
    """PNDM steps t -> t - T // N: the next listed timestep for "leading" and for "trailing" when N divides T.

    set_alpha_to_one=True ends at abar = 1 (sigma 0); False ends at abar_0 (Stable Diffusion's config), which
    our list expresses by a final schedule.sigma_min instead of 0.
    """
    ref = PNDMScheduler(
        **SCHED_KW,
        skip_prk_steps=True,
        set_alpha_to_one=final == "zero",
        steps_offset=1,
        prediction_type="epsilon",
        timestep_spacing=spacing,
    )
    ref.set_timesteps(steps)
    assert len(ref.timesteps) == steps + 1  # the second timestep is repeated
    sigmas = get_sigmas_discrete(SCHED, steps, spacing, steps_offset=1)
    if final == "sigma_min":
        sigmas[-1] = SCHED.sigma_min
    expected = _run_pndm_eps(ref, prediction)
    ours = sample_plms(_denoiser(prediction), _noise() * vp_init_noise_scale(sigmas[0]), sigmas)
    ours = ours / math.sqrt(1.0 + float(sigmas[-1]) ** 2)  # VE -> VP at the final sigma
    assert _rel_err(ours, expected) <= TOL


def _dpm_reference(spacing: str, steps: int, **kw) -> tuple:
    """(scheduler, our sigmas, whether the net sees rounded timesteps) for DPM-Solver / UniPC references."""
    cls = kw.pop("cls")
    if spacing == "karras":
        ref = cls(**SCHED_KW, use_karras_sigmas=True, **kw)
        ref.set_timesteps(steps)
        ours = get_sigmas_karras(steps, SCHED.sigma_min, SCHED.sigma_max)  # full range for any spacing
        torch.testing.assert_close(ours, ref.sigmas, rtol=SIGMA_RTOL, atol=0)
        return ref, ours, True
    ref = cls(**SCHED_KW, timestep_spacing=spacing, **kw)
    if spacing == "leading" and cls is DPMSolverMultistepScheduler:
        # DPM-Solver's own "leading" spaces N + 1 points and drops one; give it our timesteps instead.
        ref.set_timesteps(timesteps=get_timesteps_discrete(1000, steps, "leading").tolist())
    else:
        ref.set_timesteps(steps)
    ours = _sigmas_at(ref.timesteps)
    if kw.get("final_sigmas_type") == "sigma_min":
        ours[-1] = SCHED.sigma_min
    elif spacing == "trailing":  # the same timesteps as get_sigmas_discrete's "trailing"
        torch.testing.assert_close(ours, get_sigmas_discrete(SCHED, steps, "trailing"), rtol=0, atol=0)
    torch.testing.assert_close(ours, ref.sigmas, rtol=SIGMA_RTOL, atol=0)
    return ref, ours, False


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "karras"])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("sde", [False, True])
def test_dpmpp_2m_matches_diffusers(
    sde: bool, solver_type: str, spacing: str, prediction: str, steps: int
) -> None:
    ref, sigmas, round_t = _dpm_reference(
        spacing,
        steps,
        cls=DPMSolverMultistepScheduler,
        algorithm_type="sde-dpmsolver++" if sde else "dpmsolver++",
        solver_type=solver_type,
        solver_order=2,
        final_sigmas_type="zero",
        prediction_type=PRED_TYPE[prediction],
    )
    expected = _run_vp(ref, _noise(), seed=9 if sde else None)
    x, den = _noise() * vp_init_noise_scale(sigmas[0]), _denoiser(prediction, round_t)
    if sde:
        ours = sample_dpmpp_2m_sde(
            den, x, sigmas, solver_type=solver_type, generator=torch.Generator().manual_seed(9)
        )
    else:
        ours = sample_dpmpp_2m(den, x, sigmas, solver_type=solver_type)
    assert _rel_err(ours, expected) <= TOL


UNIPC_CASES = [
    (2, "bh2", "zero"),
    (3, "bh2", "zero"),
    (1, "bh2", "zero"),
    (2, "bh2", "sigma_min"),
    # bh1 with a final sigma of 0 gives NaN in diffusers (B(h) = -h = -inf times a zero correction); ours
    # returns the limit (the last x0 estimate), so bh1 is compared on lists ending at sigma_min.
    (2, "bh1", "sigma_min"),
    (3, "bh1", "sigma_min"),
]


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize(
    "order,solver_type,final,spacing",
    # With Karras sigmas and final "sigma_min" diffusers repeats sigma_min (a zero-length last step): not
    # compared.
    [
        c + (sp,)
        for c in UNIPC_CASES
        for sp in ("linspace", "trailing", "karras")
        if (c[2], sp) != ("sigma_min", "karras")
    ],
)
def test_unipc_matches_diffusers(
    order: int, solver_type: str, final: str, spacing: str, prediction: str, steps: int
) -> None:
    ref, sigmas, round_t = _dpm_reference(
        spacing,
        steps,
        cls=UniPCMultistepScheduler,
        solver_order=order,
        solver_type=solver_type,
        predict_x0=True,
        lower_order_final=True,
        final_sigmas_type=final,
        prediction_type=PRED_TYPE[prediction],
    )
    expected = _run_vp(ref, _noise())
    x = _noise() * vp_init_noise_scale(sigmas[0])
    ours = sample_unipc(_denoiser(prediction, round_t), x, sigmas, order=order, solver_type=solver_type)
    ours = ours / math.sqrt(1.0 + float(sigmas[-1]) ** 2)  # VE -> VP at the final sigma
    assert _rel_err(ours, expected) <= TOL


@pytest.mark.parametrize("steps", [1, 10, 25])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_matches_flow_match_euler(shift: float, steps: int) -> None:
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    ref.set_timesteps(steps)
    ts = get_sigmas_flow(steps, shift)
    torch.testing.assert_close(ts, ref.sigmas, rtol=1e-6, atol=0)
    expected = _noise()
    for t in ref.timesteps:
        expected = ref.step(model_fn(expected, t), t, expected).prev_sample  # model_fn as the velocity net

    def denoiser(x: Tensor, t: Tensor) -> Tensor:  # x0 = x_t - t * v for x_t = (1 - t) x0 + t eps
        return x - t.reshape(-1, 1, 1, 1) * model_fn(x, 1000 * t)

    assert _rel_err(sample_flow_euler(denoiser, _noise(), ts), expected) <= TOL
