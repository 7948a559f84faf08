"""Discrete variance-preserving noise schedules (DDPM, Ho et al. 2020) and their sigma view.

A VP schedule defines abar_t = prod_{s<=t} (1 - beta_s) and x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.
Dividing by sqrt(abar_t) gives the variance-exploding view x = x0 + sigma_t eps with
sigma_t = sqrt((1 - abar_t) / abar_t) (Karras et al. 2022, "EDM", Sec. 2 / Table 1), which is the coordinate
system that ``Denoiser`` and the samplers in ``ldm.sampling`` work in.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ldm.tensors import float_dtype, work_dtype

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
ZERO_SNR_ALPHA_CUMPROD = (
    2.0**-24
)  # abar_T used in the sigma view of a zero-terminal-SNR schedule (sigma_max 4096)


def cosine_betas(num_timesteps: int, offset: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """(T,) betas of the cosine schedule, abar(t) = cos^2((t/T + s) / (1 + s) * pi/2) (Nichol & Dhariwal 2021,
    eq. 17).

    beta_t = 1 - abar((t+1)/T) / abar(t/T), clipped at ``max_beta`` to avoid the singularity at t = T.
    """
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps  # (T+1,)
    abar = torch.cos((steps + offset) / (1 + offset) * torch.pi / 2) ** 2  # (T+1,)
    return (1.0 - abar[1:] / abar[:-1]).clamp(max=max_beta)  # (T,)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Shift and scale sqrt(abar) so that abar_T = 0 and abar_0 is unchanged (Lin et al. 2024, Algorithm
    1)."""
    sqrt_abar = torch.cumprod(1.0 - betas, dim=0).sqrt()  # (T,)
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)  # (T,) now 0 at T-1, unchanged at 0
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])  # (T,) alpha_t = abar_t / abar_{t-1}
    return 1.0 - alphas


def vp_init_noise_scale(sigma: float) -> float:
    """VP only: sqrt(1 + sigma_max^2) scales N(0, I), the VP prior x_T, into the sigma view x = x_T /
    sqrt(abar_T).

    EDM starts from sigma_max * N(0, I) and rectified flow from N(0, I): for any schedule use
    ``schedule.init_noise_scale(sigmas[0])``.
    """
    return float(1.0 + float(sigma) ** 2) ** 0.5


def vp_coefficients(sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(a, alpha, s) of a variance-preserving model in VE coordinates x = x0 + sigma eps.

    The net input a * x = alpha * x0 + s * eps with a = alpha = 1/sqrt(1 + sigma^2), s = sigma * alpha
    (EDM, Table 1, "VP" column: c_in). Computed in float64 (float32 on MPS).
    """
    sigma = sigma.to(work_dtype(sigma.device))
    alpha = (1.0 + sigma**2).rsqrt()
    return alpha, alpha, sigma * alpha


class DiscreteSchedule:
    """DDPM discrete VP schedule with T training timesteps t = 0..T-1 (Ho et al. 2020, Sec. 4).

    ``beta_schedule="linear"`` spaces beta linearly (DDPM); ``"scaled_linear"`` spaces sqrt(beta) linearly,
    the latent-diffusion / Stable Diffusion schedule (Rombach et al. 2022); ``"cosine"`` is Nichol &
    Dhariwal's (beta_start/beta_end unused). ``zero_terminal_snr`` rescales the betas so that abar_{T-1} = 0
    (Lin et al. 2024); its sigma view then needs a finite sigma_max, so ``sigmas`` use abar_{T-1} = 2^-24
    (sigma_max = 4096), the same clamp diffusers' sigma-space schedulers use. Pair it with v-prediction: eps
    carries no information at SNR 0. All tables are float64 on CPU.

    Noise-schedule interface shared with ``EDMSchedule`` and ``FlowSchedule`` (what the denoiser, the loss and
    the samplers use; ``ldm.interfaces.Schedule``): ``space``, ``spacings``/``default_spacing``,
    ``sigma_min``/``sigma_max``, ``sigma_data``, ``alpha_min``, ``coefficients``, ``c_noise``,
    ``sigma_at_fraction``, ``init_noise_scale``.
    """

    space = "ve"  # samplers see x = x0 + sigma * eps
    sigma_data = 1.0  # latents are scaled to about unit variance
    # sampling grids (ldm.sampling.grids); trailing starts at the last training timestep (Lin et al. 2024)
    spacings = ("leading", "trailing", "linspace", "karras")
    default_spacing = "trailing"

    def __init__(
        self,
        num_timesteps: int = 1000,
        beta_schedule: str = "scaled_linear",
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        zero_terminal_snr: bool = False,
    ) -> None:
        if num_timesteps < 2:
            raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}; use e.g. 1000.")
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}.")
        if beta_schedule != "cosine" and not 0.0 < beta_start < beta_end < 1.0:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {beta_start=} {beta_end=}.")
        self.num_timesteps = num_timesteps
        self.beta_schedule = beta_schedule
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.zero_terminal_snr = zero_terminal_snr

        t = num_timesteps
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, t, dtype=torch.float64)  # (T,)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, t, dtype=torch.float64) ** 2  # (T,)
        else:
            betas = cosine_betas(t)  # (T,)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.betas: Tensor = betas  # (T,)
        self.alphas_cumprod: Tensor = torch.cumprod(1.0 - betas, dim=0)  # (T,) abar_t, Ho et al. eq. 4
        abar = (
            self.alphas_cumprod.clamp(min=ZERO_SNR_ALPHA_CUMPROD)
            if zero_terminal_snr
            else self.alphas_cumprod
        )
        self.sigmas: Tensor = ((1.0 - abar) / abar).sqrt()  # (T,) ascending
        self.log_sigmas: Tensor = self.sigmas.log()  # (T,)
        self.sigma_min = float(self.sigmas[0])
        self.sigma_max = float(self.sigmas[-1])
        self.alpha_min = float(self.alphas_cumprod[-1].sqrt())  # 0 exactly with zero terminal SNR

    def __repr__(self) -> str:
        return (
            f"DiscreteSchedule(num_timesteps={self.num_timesteps}, beta_schedule={self.beta_schedule!r}, "
            f"beta_start={self.beta_start}, beta_end={self.beta_end}, "
            f"zero_terminal_snr={self.zero_terminal_snr})"
        )

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(a, alpha, s): the net sees a * x = alpha * x0 + s * eps for x = x0 + sigma * eps (see
        ``vp_coefficients``)."""
        return vp_coefficients(sigma)

    def c_noise(self, sigma: Tensor) -> Tensor:
        """The net's timestep input: the (continuous) training timestep t(sigma)."""
        return self.sigma_to_t(sigma)

    def sigma_at_fraction(self, u: Tensor) -> Tensor:
        """u in [0, 1) -> the sigma of training timestep floor(u * T): u ~ U[0, 1) gives t ~ U{0..T-1}
        (DDPM)."""
        work = work_dtype(u.device)
        t = (u.to(work) * self.num_timesteps).floor().long().clamp(0, self.num_timesteps - 1)
        return self.sigmas.to(device=u.device, dtype=work)[t]

    def init_noise_scale(self, sigma: float) -> float:
        return vp_init_noise_scale(sigma)

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Continuous timestep for sigma, by linear interpolation of t in log-sigma (k-diffusion convention).

        Grid sigmas map to exact integers, also when given in float32 (a sigma equal to a grid value rounded
        to its own dtype returns that grid index). Sigmas outside [sigma_min, sigma_max] clamp to t in [0,
        T-1]. Output: same shape and device as ``sigma``; float64 if sigma is float64, else float32.
        """
        work = work_dtype(sigma.device)
        log_grid = self.log_sigmas.to(device=sigma.device, dtype=work)  # (T,) ascending
        log_sigma = sigma.to(work).log()  # (...)
        flat = log_sigma.reshape(-1)  # (N,)
        high = torch.searchsorted(log_grid, flat).clamp(1, self.num_timesteps - 1)  # (N,)
        low = high - 1
        lo, hi = log_grid[low], log_grid[high]
        w = ((flat - lo) / (hi - lo)).clamp(0.0, 1.0)  # (N,) fraction of the way from low to high
        t = low.to(work) + w  # (N,)
        if sigma.dtype in (torch.float32, torch.float64):
            grid = self.sigmas.to(device=sigma.device, dtype=sigma.dtype)  # (T,)
            hits = sigma.reshape(-1, 1) == grid.reshape(1, -1)  # (N, T)
            index = hits.to(torch.int64).argmax(dim=1).to(work)  # (N,)
            t = torch.where(hits.any(dim=1), index, t)
        return t.reshape(sigma.shape).to(float_dtype(sigma))

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """sigma at continuous timestep t (log-linear interpolation between grid points; exact on the grid).

        Output: same shape and device as ``t``; float64 if t is float64, else float32.
        """
        work = work_dtype(t.device)
        t_work = t.to(work).clamp(0.0, self.num_timesteps - 1)  # (...)
        low = t_work.floor().to(torch.int64)  # (...)
        high = (low + 1).clamp(max=self.num_timesteps - 1)  # (...)
        w = t_work - low.to(work)  # (...) in [0, 1), exactly 0 on the grid
        sigmas = self.sigmas.to(device=t.device, dtype=work)  # (T,)
        log_sigmas = self.log_sigmas.to(device=t.device, dtype=work)  # (T,)
        # sigma_low * exp(w * (log sigma_high - log sigma_low)) == exp of the interpolated log-sigma
        sigma = sigmas[low] * torch.exp(w * (log_sigmas[high] - log_sigmas[low]))
        return sigma.to(float_dtype(t))
