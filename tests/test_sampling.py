"""Sampler tests: sigma schedules and DDIM / DDPM parity with diffusers, CFG, determinism."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from torch import Tensor, nn

from ldm.diffusion import Denoiser, DiscreteSchedule
from ldm.diffusion.schedules import vp_init_noise_scale
from ldm.sampling import (
    CFGDenoiser,
    get_sigmas_discrete,
    get_timesteps_discrete,
    sample_ddim,
    sample_ddpm,
)

SHAPE = (2, 3, 8, 8)
SCHED_KW = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
PRED_TYPE = {"eps": "epsilon", "v": "v_prediction"}


def model_fn(x_t: Tensor, t: Tensor) -> Tensor:
    """A deterministic stand-in for a trained net: any function of (x_t, t) works for parity."""
    return torch.tanh(0.3 * x_t) * torch.cos(t.float() / 300).reshape(-1, 1, 1, 1)


class FnNet(nn.Module):
    def forward(self, x: Tensor, c_noise: Tensor, context=None, context_mask=None) -> Tensor:
        return model_fn(x, c_noise)


def _noise() -> Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))


def _rel_err(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_timesteps_match_diffusers(spacing: str, steps_offset: int) -> None:
    ref = DDIMScheduler(**SCHED_KW, timestep_spacing=spacing, steps_offset=steps_offset)
    sched = DiscreteSchedule()
    for steps in [1, 2, 3, 7, 10, 16, 20, 25, 30, 33, 50, 64, 99, 100, 250, 333, 500, 999]:
        ref.set_timesteps(steps)
        ours = get_timesteps_discrete(1000, steps, spacing, steps_offset)
        assert torch.equal(ours, ref.timesteps), (spacing, steps)
        sigmas = get_sigmas_discrete(sched, steps, spacing, steps_offset)
        assert sigmas.dtype == torch.float32 and sigmas.shape == (steps + 1,) and float(sigmas[-1]) == 0.0
        assert torch.equal(sigmas[:-1], sched.sigmas[ref.timesteps].float())
        assert torch.equal(sched.sigma_to_t(sigmas[:-1]), ref.timesteps.float())


def test_sigma_helpers_reject_bad_input() -> None:
    assert vp_init_noise_scale(2.0) == pytest.approx(5**0.5)
    with pytest.raises(ValueError, match="spacing must be one of"):
        get_timesteps_discrete(1000, 10, "karras")
    with pytest.raises(ValueError, match="steps must be in"):
        get_timesteps_discrete(1000, 1001)
    with pytest.raises(ValueError, match="lower steps_offset"):
        get_timesteps_discrete(1000, 1000, "leading", steps_offset=1)
    with pytest.raises(ValueError, match="strictly descending"):
        sample_ddim(lambda x, s: x, torch.zeros(1, 2), torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="eta must be"):
        sample_ddim(lambda x, s: x, torch.zeros(1, 2), torch.tensor([1.0, 0.0]), eta=1.5)


def _ddim_reference(ref: DDIMScheduler, prediction: str, eta: float, seed: int) -> Tensor:
    """Drive diffusers' DDIMScheduler.step with model_fn, injecting N(0, I) noise from a seeded generator.

    diffusers steps from t to t - T // steps, which is the next listed timestep for "leading" and "trailing"
    (asserted) but not for "linspace" (e.g. 999 -> 949 while the next timestep is 946). For linspace the
    abar table is patched per step so that unmodified diffusers maths lands on the next listed timestep,
    the sigma-list semantics every sigma-space sampler (and diffusers' DDPM/DPM-Solver) uses.
    """
    g = torch.Generator().manual_seed(seed)
    x, ts, table = _noise(), ref.timesteps, ref.alphas_cumprod.clone()
    stride = ref.config.num_train_timesteps // ref.num_inference_steps
    for i, t in enumerate(ts):
        prev = int(t) - stride
        t_next = int(ts[i + 1]) if i + 1 < len(ts) else -1
        if ref.config.timestep_spacing != "linspace":
            assert prev == t_next or (t_next == -1 and prev < 0)
        patched = table.clone()
        if prev >= 0:
            patched[prev] = table[t_next]
        ref.alphas_cumprod = patched
        z = torch.randn(SHAPE, generator=g)
        x = ref.step(model_fn(x, t), t, x, eta=eta, variance_noise=z).prev_sample
    ref.alphas_cumprod = table
    return x


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_matches_diffusers(prediction: str, spacing: str, eta: float) -> None:
    steps = 20
    ref = DDIMScheduler(
        **SCHED_KW,
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=1,
        prediction_type=PRED_TYPE[prediction],
        timestep_spacing=spacing,
    )
    ref.set_timesteps(steps)
    expected = _ddim_reference(ref, prediction, eta, seed=7)

    sched = DiscreteSchedule()
    sigmas = get_sigmas_discrete(sched, steps, spacing, steps_offset=1)
    x = _noise() * vp_init_noise_scale(sigmas[0])
    ours = sample_ddim(
        Denoiser(FnNet(), sched, prediction), x, sigmas, eta=eta, generator=torch.Generator().manual_seed(7)
    )
    assert _rel_err(ours, expected) <= 1e-4


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_linspace_matches_unpatched_first_order_dpm_solver(prediction: str) -> None:
    """First-order DPM-Solver++ is DDIM (Lu et al. 2022, Sec. 4.1) and steps to the next listed timestep."""
    timesteps = DDIMScheduler(**SCHED_KW, timestep_spacing="linspace")
    timesteps.set_timesteps(20)
    ref = DPMSolverMultistepScheduler(
        **SCHED_KW,
        solver_order=1,
        algorithm_type="dpmsolver++",
        final_sigmas_type="zero",
        prediction_type=PRED_TYPE[prediction],
    )
    ref.set_timesteps(timesteps=timesteps.timesteps.tolist())
    expected = _noise()
    for t in ref.timesteps:
        expected = ref.step(model_fn(expected, t), t, expected).prev_sample

    sched = DiscreteSchedule()
    sigmas = get_sigmas_discrete(sched, 20, "linspace")
    ours = sample_ddim(
        Denoiser(FnNet(), sched, prediction), _noise() * vp_init_noise_scale(sigmas[0]), sigmas
    )
    assert _rel_err(ours, expected) <= 1e-4


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddpm_matches_diffusers_on_a_strided_grid(prediction: str, spacing: str) -> None:
    steps = 20
    ref = DDPMScheduler(
        **SCHED_KW,
        clip_sample=False,
        prediction_type=PRED_TYPE[prediction],
        timestep_spacing=spacing,
        steps_offset=0,
    )
    ref.set_timesteps(steps)
    g = torch.Generator().manual_seed(11)
    expected = _noise()
    for t in ref.timesteps:
        expected = ref.step(model_fn(expected, t), t, expected, generator=g).prev_sample

    sched = DiscreteSchedule()
    sigmas = get_sigmas_discrete(sched, steps, spacing, steps_offset=0)
    x = _noise() * vp_init_noise_scale(sigmas[0])
    ours = sample_ddpm(
        Denoiser(FnNet(), sched, prediction), x, sigmas, generator=torch.Generator().manual_seed(11)
    )
    assert _rel_err(ours, expected) <= 1e-4


def test_ddpm_is_deterministic_given_a_seed_and_equals_ddim_eta_one() -> None:
    sched = DiscreteSchedule()
    den = Denoiser(FnNet(), sched, "eps")
    sigmas = get_sigmas_discrete(sched, 15)
    x = _noise() * vp_init_noise_scale(sigmas[0])
    a = sample_ddpm(den, x, sigmas, generator=torch.Generator().manual_seed(3))
    b = sample_ddpm(den, x, sigmas, generator=torch.Generator().manual_seed(3))
    c = sample_ddpm(den, x, sigmas, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    d = sample_ddim(den, x, sigmas, eta=1.0, generator=torch.Generator().manual_seed(3))
    assert _rel_err(d, a) <= 1e-5


def test_callback_sees_every_step() -> None:
    sched = DiscreteSchedule()
    sigmas = get_sigmas_discrete(sched, 6)
    seen: list[dict] = []
    x = _noise() * vp_init_noise_scale(sigmas[0])
    sample_ddim(Denoiser(FnNet(), sched), x, sigmas, callback=seen.append)
    assert [d["i"] for d in seen] == list(range(6))
    assert torch.equal(torch.stack([d["sigma"] for d in seen]), sigmas[:-1])
    assert torch.equal(seen[0]["x"], x) and seen[0]["denoised"].shape == SHAPE


class CountingDenoiser:
    """x0 estimate that depends on the context, and counts calls and batch sizes."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, x: Tensor, sigma: Tensor, context: Tensor, context_mask: Tensor) -> Tensor:
        self.batches.append(x.shape[0])
        assert sigma.shape == (x.shape[0],) and context_mask.shape == context.shape[:2]
        pooled = (context * context_mask[..., None]).sum(1).mean(-1)  # (B,)
        return x / (1 + sigma.view(-1, 1, 1, 1) ** 2) + pooled.view(-1, 1, 1, 1)


def _conds(batch: int, uncond_batch: int, uncond_len: int = 5) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(5)
    cond = {
        "context": torch.randn(batch, 5, 4, generator=g),
        "context_mask": torch.ones(batch, 5, dtype=torch.bool),
    }
    uncond = {
        "context": torch.randn(uncond_batch, uncond_len, 4, generator=g),
        "context_mask": torch.ones(uncond_batch, uncond_len, dtype=torch.bool),
    }
    return cond, uncond


@pytest.mark.parametrize("uncond_batch", [1, 2])
def test_cfg_output_is_u_plus_scale_times_c_minus_u(uncond_batch: int) -> None:
    inner, (cond, uncond) = CountingDenoiser(), _conds(2, uncond_batch)
    x, sigma = _noise(), torch.tensor(3.0)
    guided = CFGDenoiser(inner, cond, uncond, scale=7.5)(x, sigma)
    assert inner.batches == [4]
    c = inner(x, sigma.expand(2), **cond)
    u = inner(x, sigma.expand(2), **{k: v.expand(2, *v.shape[1:]) for k, v in uncond.items()})
    torch.testing.assert_close(guided, u + 7.5 * (c - u))
    assert not torch.allclose(guided, c)


def test_cfg_scale_one_is_the_cond_denoiser_with_one_half_size_call() -> None:
    inner, (cond, uncond) = CountingDenoiser(), _conds(2, 1)
    x, sigma = _noise(), torch.full((2,), 2.0)
    out = CFGDenoiser(inner, cond, uncond, scale=1.0)(x, sigma)
    assert inner.batches == [2]
    assert torch.equal(out, inner(x, sigma, **cond))


def test_cfg_makes_exactly_one_inner_call_per_sampler_step() -> None:
    inner, (cond, uncond) = CountingDenoiser(), _conds(2, 1, uncond_len=3)  # shorter negative prompt: padded
    sigmas = get_sigmas_discrete(DiscreteSchedule(), 12)
    x = _noise() * vp_init_noise_scale(sigmas[0])
    sample_ddpm(
        CFGDenoiser(inner, cond, uncond, scale=4.0), x, sigmas, generator=torch.Generator().manual_seed(0)
    )
    assert inner.batches == [4] * 12


def test_cfg_rejects_mismatched_inputs() -> None:
    cond, uncond = _conds(2, 3)
    with pytest.raises(ValueError, match="uncond batch 1"):
        CFGDenoiser(CountingDenoiser(), cond, uncond, 3.0)
    cond, uncond = _conds(2, 1)
    with pytest.raises(ValueError, match="must both hold"):
        CFGDenoiser(CountingDenoiser(), cond, {"context": uncond["context"]}, 3.0)
    cfg = CFGDenoiser(CountingDenoiser(), cond, uncond, 3.0)
    with pytest.raises(ValueError, match="cond has batch 2"):
        cfg(torch.zeros(3, 3, 8, 8), torch.tensor(1.0))
