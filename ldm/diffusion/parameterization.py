"""What the network predicts, for any schedule whose net input is x_in = alpha * x0 + s * eps: one object
each.

    eps  (Ho et al. 2020):            F = eps                     x0 = (x_in - s F) / alpha
    x0:                               F = x0                      x0 = F
    v    (Salimans & Ho 2022, Sec. 4): F = alpha eps - s x0        x0 = (alpha x_in - s F) / (alpha^2 + s^2)
    flow (Liu et al. 2023; SD3):      F = eps - x0 (= dx_in/dt)   x0 = (x_in - s F) / (alpha + s)
    edm  (Karras et al. 2022, eq. 7): F = (x0 - c_skip x) / c_out  x0 = c_skip x + c_out F,
         with x = x_in / alpha, c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
         sigma = s / alpha, sd = sigma_data;
         in (alpha, s) terms for the EDM schedule (alpha = c_in): c_skip x = sd^2 alpha x_in, c_out = sd s.

For variance-preserving schedules alpha^2 + s^2 = 1 and the v formula is the familiar x0 = alpha x_t - s v.
``error_scale`` (the loss-space factor) is k = (dF/dx0)^2 at fixed x_in: an x0 error e costs k e^2 in F-space,
which is how loss weightings written for x0 (min-SNR, EDM) are expressed for each parameterisation.

Adding a parameterisation: subclass ``Parameterization`` with its four maps and add an instance to
``PARAMETERIZATIONS``; ``diffusion.prediction=<name>`` then selects it for the loss and the denoiser.
Shapes broadcast throughout: out, x_in, x0, eps (B, ...); alpha, s (B, 1, ...) or (B,) for ``error_scale``.
"""

from __future__ import annotations

from torch import Tensor


class Parameterization:
    """The net output F and its maps to and from x0; ``needs_signal``: x0 is undefined where alpha = 0."""

    name: str
    needs_signal = False

    def to_x0(self, out: Tensor, x_in: Tensor, alpha: Tensor, s: Tensor, sigma_data: float) -> Tensor:
        """The x0 estimate from the net output ``out`` = F."""
        raise NotImplementedError

    def from_x0(self, x0: Tensor, x_in: Tensor, alpha: Tensor, s: Tensor, sigma_data: float) -> Tensor:
        """The net output F that ``to_x0`` maps to ``x0`` (its inverse at fixed x_in); needs s > 0 except for
        x0."""
        raise NotImplementedError

    def target(self, x0: Tensor, eps: Tensor, alpha: Tensor, s: Tensor, sigma_data: float) -> Tensor:
        """The regression target F for clean x0 and noise eps (x_in = alpha x0 + s eps)."""
        raise NotImplementedError

    def error_scale(self, alpha: Tensor, s: Tensor, sigma_data: float) -> Tensor:
        """k = (dF/dx0)^2: |F error|^2 = k |x0 error|^2."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Eps(Parameterization):
    name = "eps"
    needs_signal = True

    def to_x0(self, out, x_in, alpha, s, sigma_data):
        return (x_in - s * out) / alpha

    def from_x0(self, x0, x_in, alpha, s, sigma_data):
        return (x_in - alpha * x0) / s

    def target(self, x0, eps, alpha, s, sigma_data):
        return eps

    def error_scale(self, alpha, s, sigma_data):
        return (alpha / s) ** 2  # the SNR


class V(Parameterization):
    name = "v"

    def to_x0(self, out, x_in, alpha, s, sigma_data):
        return (alpha * x_in - s * out) / (alpha**2 + s**2)

    def from_x0(self, x0, x_in, alpha, s, sigma_data):
        return (alpha * x_in - (alpha**2 + s**2) * x0) / s

    def target(self, x0, eps, alpha, s, sigma_data):
        return alpha * eps - s * x0

    def error_scale(self, alpha, s, sigma_data):
        return ((alpha**2 + s**2) / s) ** 2  # VP: SNR + 1


class X0(Parameterization):
    name = "x0"

    def to_x0(self, out, x_in, alpha, s, sigma_data):
        return out

    def from_x0(self, x0, x_in, alpha, s, sigma_data):
        return x0

    def target(self, x0, eps, alpha, s, sigma_data):
        return x0

    def error_scale(self, alpha, s, sigma_data):
        return alpha * 0.0 + 1.0


class FlowVelocity(Parameterization):
    name = "flow"

    def to_x0(self, out, x_in, alpha, s, sigma_data):
        return (x_in - s * out) / (alpha + s)

    def from_x0(self, x0, x_in, alpha, s, sigma_data):
        return (x_in - (alpha + s) * x0) / s

    def target(self, x0, eps, alpha, s, sigma_data):
        return eps - x0

    def error_scale(self, alpha, s, sigma_data):
        return ((alpha + s) / s) ** 2


class EDMPreconditioned(Parameterization):
    name = "edm"

    def to_x0(self, out, x_in, alpha, s, sigma_data):
        return sigma_data**2 * alpha * x_in + sigma_data * s * out

    def from_x0(self, x0, x_in, alpha, s, sigma_data):
        return (x0 - sigma_data**2 * alpha * x_in) / (sigma_data * s)

    def target(self, x0, eps, alpha, s, sigma_data):
        # (x0 - sd^2 alpha (alpha x0 + s eps)) / (sd s)
        return ((1.0 - sigma_data**2 * alpha**2) * x0 - sigma_data**2 * alpha * s * eps) / (sigma_data * s)

    def error_scale(self, alpha, s, sigma_data):
        return 1.0 / (sigma_data * s) ** 2  # 1 / c_out^2


PARAMETERIZATIONS: dict[str, Parameterization] = {
    p.name: p for p in (Eps(), V(), X0(), FlowVelocity(), EDMPreconditioned())
}
PREDICTIONS = tuple(PARAMETERIZATIONS)


def check_prediction(prediction: str) -> str:
    """Validate a parameterisation name."""
    if prediction not in PARAMETERIZATIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}.")
    return prediction


def parameterization(prediction: str) -> Parameterization:
    """The parameterisation object for a name ("eps", "v", "x0", "flow", "edm")."""
    return PARAMETERIZATIONS[check_prediction(prediction)]


def parameterization_for(prediction: str, schedule) -> Parameterization:
    """Refuse eps-prediction on a schedule whose alpha reaches 0 (x0 = (x_in - s eps) / alpha is undefined
    there)."""
    param = parameterization(prediction)
    if param.needs_signal and schedule.alpha_min == 0.0:
        raise ValueError(
            f"prediction={prediction} cannot give x0 where alpha = 0 (pure noise) in {schedule!r}: "
            "use diffusion.prediction=v (or flow for rectified flow)"
        )
    return param
