"""What the network predicts, for any schedule whose net input is x_in = alpha * x0 + s * eps.

    eps  (Ho et al. 2020):            F = eps                     x0 = (x_in - s F) / alpha
    x0:                               F = x0                      x0 = F
    v    (Salimans & Ho 2022, Sec. 4): F = alpha eps - s x0        x0 = (alpha x_in - s F) / (alpha^2 + s^2)
    flow (Liu et al. 2023; SD3):      F = eps - x0 (= dx_in/dt)   x0 = (x_in - s F) / (alpha + s)
    edm  (Karras et al. 2022, eq. 7): F = (x0 - c_skip x) / c_out  x0 = c_skip x + c_out F, with x = x_in / alpha,
         c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2), sigma = s / alpha, sd = sigma_data;
         in (alpha, s) terms for the EDM schedule (alpha = c_in): c_skip x = sd^2 alpha x_in, c_out = sd s.

For variance-preserving schedules alpha^2 + s^2 = 1 and the v formula is the familiar x0 = alpha x_t - s v.
``error_scale`` is k = (dF/dx0)^2 at fixed x_in: an x0 error e costs k e^2 in F-space, which is how loss weightings
written for x0 (min-SNR, EDM) are expressed for each parameterisation.
"""

from __future__ import annotations

from torch import Tensor

PREDICTIONS = ("eps", "v", "x0", "flow", "edm")


def check_prediction(prediction: str) -> str:
    """Validate a parameterisation name."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}.")
    return prediction


def check_prediction_for(prediction: str, schedule) -> str:
    """Refuse eps-prediction on a schedule whose alpha reaches 0 (x0 = (x_in - s eps) / alpha is undefined there)."""
    check_prediction(prediction)
    if prediction == "eps" and schedule.alpha_min == 0.0:
        raise ValueError(
            f"prediction=eps cannot give x0 where alpha = 0 (pure noise) in {schedule!r}: "
            "use diffusion.prediction=v (or flow for rectified flow)"
        )
    return prediction


def to_x0(prediction: str, out: Tensor, x_in: Tensor, alpha: Tensor, s: Tensor, sigma_data: float) -> Tensor:
    """The x0 estimate from the net output ``out`` = F. Shapes broadcast: out, x_in (B, ...); alpha, s (B, 1, ...)."""
    if prediction == "eps":
        return (x_in - s * out) / alpha
    if prediction == "x0":
        return out
    if prediction == "v":
        return (alpha * x_in - s * out) / (alpha**2 + s**2)
    if prediction == "flow":
        return (x_in - s * out) / (alpha + s)
    if prediction == "edm":
        return sigma_data**2 * alpha * x_in + sigma_data * s * out
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}.")


def from_x0(prediction: str, x0: Tensor, x_in: Tensor, alpha: Tensor, s: Tensor, sigma_data: float) -> Tensor:
    """The net output F that ``to_x0`` maps to ``x0`` (its inverse at fixed x_in); needs s > 0 except for x0."""
    if prediction == "eps":
        return (x_in - alpha * x0) / s
    if prediction == "x0":
        return x0
    if prediction == "v":
        return (alpha * x_in - (alpha**2 + s**2) * x0) / s
    if prediction == "flow":
        return (x_in - (alpha + s) * x0) / s
    if prediction == "edm":
        return (x0 - sigma_data**2 * alpha * x_in) / (sigma_data * s)
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}.")


def target(prediction: str, x0: Tensor, eps: Tensor, alpha: Tensor, s: Tensor, sigma_data: float) -> Tensor:
    """The regression target F for clean x0 and noise eps (x_in = alpha x0 + s eps)."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return alpha * eps - s * x0
    if prediction == "flow":
        return eps - x0
    if prediction == "edm":
        # (x0 - sd^2 alpha (alpha x0 + s eps)) / (sd s)
        return ((1.0 - sigma_data**2 * alpha**2) * x0 - sigma_data**2 * alpha * s * eps) / (sigma_data * s)
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}.")


def error_scale(prediction: str, alpha: Tensor, s: Tensor, sigma_data: float) -> Tensor:
    """k = (dF/dx0)^2: |F error|^2 = k |x0 error|^2. eps: SNR; v (VP): SNR + 1; x0: 1; edm: 1 / c_out^2."""
    if prediction == "eps":
        return (alpha / s) ** 2
    if prediction == "x0":
        return alpha * 0.0 + 1.0
    if prediction == "v":
        return ((alpha**2 + s**2) / s) ** 2
    if prediction == "flow":
        return ((alpha + s) / s) ** 2
    if prediction == "edm":
        return 1.0 / (sigma_data * s) ** 2
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}.")
