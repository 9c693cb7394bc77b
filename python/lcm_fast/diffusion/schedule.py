"""Beta schedules and the DDIM scheduler (DDIM paper, arXiv 2010.02502, Eqs. 12 and 16).

Notation: t a training timestep in [0, T); a_t = alpha-bar_t = prod_{s<=t} (1 - beta_s) (``alphas_cumprod``);
b_t = 1 - a_t; x0 the predicted clean sample; eps the predicted noise; sigma_t the DDIM noise scale.

The maths follows the official ``lcm/nn/schedulers/ddim.py`` operation for operation (fp32 scalars
indexed from ``alphas_cumprod``), so that official numbers are reproduced to fp32 rounding.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..config import SchedulerConfig
from ..ops.guided_ddim import PREDICTION_TYPES, split_prediction

MAX_BETA = 0.999


def _betas_for_alpha_bar(num_steps: int, alpha_bar) -> Tensor:
    """beta_i = min(1 - abar((i+1)/T) / abar(i/T), 0.999), computed in Python doubles, stored fp32."""
    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), MAX_BETA) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float32)


def _cosine_alpha_bar(t: float) -> float:
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def _sigmoid_alpha_bar(alpha: float, beta: float):
    """Paper Eq. 14: abar(t) = sigmoid(beta - alpha * logit(t)). As in the official code, t is clamped
    as an fp32 tensor (so 1 - 1e-32 rounds to 1 and abar(1) = 0) before a double-precision logit."""

    def fn(t: float) -> float:
        x = torch.clamp(torch.tensor(t), min=1e-32, max=1 - 1e-32)
        logit = math.log(x / (1 - x))  # x / (1 - x) in fp32: +inf at t = 1, so abar(1) = 0
        return 1 / (1 + math.exp(-(beta - alpha * logit)))

    return fn


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2023, Algorithm 1: shift/scale sqrt(abar) so that abar_{T-1} = 0 and abar_0 is kept."""
    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt -= last
    abar_sqrt *= first / (first - last)
    abar = abar_sqrt**2
    alphas = torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def make_betas(config: SchedulerConfig) -> Tensor:
    """[T] fp32 betas for ``config.beta_schedule`` (+ zero-terminal-SNR rescale when configured)."""
    T, kind = config.num_diffusion_train_steps, config.beta_schedule
    if kind == "linear":
        betas = torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float32)
    elif kind == "scaled_linear":
        e = config.scaled_linear_exponent
        betas = torch.linspace(config.beta_start ** (1 / e), config.beta_end ** (1 / e), T, dtype=torch.float32) ** e
    elif kind == "squaredcos_cap_v2":
        betas = _betas_for_alpha_bar(T, _cosine_alpha_bar)
    elif kind == "sigmoid":
        betas = _betas_for_alpha_bar(T, _sigmoid_alpha_bar(config.sigmoid_schedule_alpha, config.sigmoid_schedule_beta))
    else:
        raise ValueError(
            f"unknown beta_schedule '{kind}'; expected linear, scaled_linear, squaredcos_cap_v2 or sigmoid"
        )
    return rescale_zero_terminal_snr(betas) if config.rescale_betas_zero_snr else betas


def _checked(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type '{prediction_type}'; expected sample, epsilon or v_prediction")
    return prediction_type


#: the paper's named noise schedules (section 2.3.2, Figure 5, Table 5), all with T = 100 and the
#: zero-terminal-SNR rescale; sigmoid(delta, gamma) is ``sigmoid_schedule_alpha/beta``.
NOISE_SCHEDULES: dict[str, dict] = {
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
    "quadratic-1": dict(beta_schedule="scaled_linear", beta_start=0.001, beta_end=0.0012),
    "quadratic-2": dict(beta_schedule="scaled_linear", beta_start=0.02, beta_end=0.022),
    "sigmoid(1.5,-1)": dict(beta_schedule="sigmoid", sigmoid_schedule_alpha=1.5, sigmoid_schedule_beta=-1.0),
    "sigmoid(1.5,-2)": dict(beta_schedule="sigmoid", sigmoid_schedule_alpha=1.5, sigmoid_schedule_beta=-2.0),
    "sigmoid(0.8,-1)": dict(beta_schedule="sigmoid", sigmoid_schedule_alpha=0.8, sigmoid_schedule_beta=-1.0),
    "sigmoid(3.5,0)": dict(beta_schedule="sigmoid", sigmoid_schedule_alpha=3.5, sigmoid_schedule_beta=0.0),
}


def named_schedule(name: str) -> SchedulerConfig:
    """The SchedulerConfig of one of the paper's schedules (:data:`NOISE_SCHEDULES`)."""
    if name not in NOISE_SCHEDULES:
        raise KeyError(f"unknown noise schedule '{name}'; the paper's are {sorted(NOISE_SCHEDULES)}")
    return SchedulerConfig(num_diffusion_train_steps=100, rescale_betas_zero_snr=True, **NOISE_SCHEDULES[name])


#: the largest alpha-bar a scheduler keeps (the largest fp32 below 1)
ALPHA_BAR_MAX = 1.0 - 2.0**-24


class SchedulerOutput(NamedTuple):
    prev_sample: Tensor  # x_{t_prev}, [..., D]
    pred_original_sample: Tensor  # x0, [..., D]


Timestep = Union[int, Tensor]


class DDIMScheduler:
    """DDIM with every official option: beta schedules, zero-terminal-SNR, linspace/leading/trailing
    spacing, prediction types sample/epsilon/v_prediction, clipping, dynamic thresholding, eta, and
    epsilon scaling (Ning et al. 2023: divide the predicted noise; paper section 2.3.2)."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.num_train_steps = config.num_diffusion_train_steps
        with torch.device("cpu"):  # host-side tables, even when the model is built on another device
            self.betas = make_betas(config)  # [T] fp32
            # [T] fp32, below 1: the wide sigmoid(3.5, 0) gives alpha-bar_0 = 1.0 exactly in fp32, an infinite SNR,
            # and epsilon = (x - x0) / sqrt(1 - alpha-bar) = 0 / 0 at t = 0 (NaN sentences); the largest fp32 below 1
            # changes no other schedule
            self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0).clamp(max=ALPHA_BAR_MAX)
            self.final_alpha_cumprod = torch.tensor(1.0) if config.set_alpha_to_one else self.alphas_cumprod[0]
        self.num_inference_steps: Optional[int] = None
        self.timesteps: Optional[Tensor] = None
        self._prev: Optional[dict[int, int]] = None

    def with_options(self, **overrides) -> "DDIMScheduler":
        """A new scheduler whose config has ``overrides`` (e.g. thresholding for one generation)."""
        return DDIMScheduler(dataclasses.replace(self.config, **overrides))

    def set_timesteps(self, num_steps: int, *, official_stride: bool = True) -> Tensor:
        """Builds the inference timesteps [n] (int64, descending) for ``num_steps`` requested steps.

        ``official_stride=True`` reproduces the official code exactly: the spacing stride is truncated to
        an integer (trailing with T=100 and 40 requested steps runs **50** steps [99, 97, ..., 1]) and
        the previous timestep is always ``t - T // num_steps``. ``False`` gives exactly ``num_steps``
        steps (diffusers' float spacing) and steps each timestep to the next one of the schedule.
        """
        T = self.num_train_steps
        if not 0 < num_steps <= T:
            raise ValueError(f"num_steps={num_steps} must be in [1, num_diffusion_train_steps={T}]")
        spacing = self.config.timestep_spacing
        if spacing == "linspace":
            ts = torch.linspace(0, T - 1, num_steps, dtype=torch.long).flip(0) if official_stride else (
                torch.from_numpy(np.linspace(0, T - 1, num_steps).round()[::-1].copy()).long()
            )
        elif spacing == "leading":
            ts = torch.arange(0, T, T // num_steps, dtype=torch.long).flip(0)
            ts = ts if official_stride else ts[-num_steps:]
        elif spacing == "trailing":
            if official_stride:
                # torch.arange with dtype=long truncates the float step -T/S to an integer.
                ts = torch.arange(T, 0, -(T / num_steps), dtype=torch.long) - 1
            else:
                # T - i * T/S for i < S (a float arange can yield S + 1 entries through rounding)
                ts = torch.from_numpy(np.round(T - np.arange(num_steps) * (T / num_steps)).astype(np.int64) - 1)
        else:
            raise ValueError(f"unknown timestep_spacing '{spacing}'; expected linspace, leading or trailing")
        self.num_inference_steps = num_steps
        self.timesteps = ts
        if official_stride:
            self._prev = None
        else:
            seq = ts.tolist()
            self._prev = dict(zip(seq, seq[1:] + [-1]))
        return ts

    def prev_timestep(self, t: int) -> int:
        if self.num_inference_steps is None:
            raise RuntimeError("call set_timesteps() before step()")
        if self._prev is not None:
            return self._prev[t]
        return t - self.num_train_steps // self.num_inference_steps

    def _threshold(self, x0: Tensor) -> Tensor:
        """Dynamic thresholding (Imagen): per sample, s = clamp(quantile(|x0|, ratio), 1, max); x0 = clamp(x0, -s, s) / s."""
        dtype, shape = x0.dtype, x0.shape
        flat = x0.float().reshape(shape[0], -1)
        s = torch.quantile(flat.abs(), self.config.dynamic_thresholding_ratio, dim=1)
        s = torch.clamp(s, min=1, max=self.config.sample_max_value).unsqueeze(1)
        return (torch.clamp(flat, -s, s) / s).reshape(shape).to(dtype)

    def _coefficients(self, t: Tensor, eta: float) -> tuple[Tensor, ...]:
        """fp32 coefficients of timesteps t (int64, any shape), elementwise as the official step() computes
        its scalars: (sqrt(a_t), sqrt(b_t), sqrt(a_prev), sqrt(1 - a_prev - sigma^2), sigma)."""
        if self.num_inference_steps is None:
            raise RuntimeError("call set_timesteps() before step()")
        if self._prev is not None:
            prev = torch.tensor([self._prev[v] for v in t.flatten().tolist()]).reshape(t.shape)
        else:
            prev = t - self.num_train_steps // self.num_inference_steps
        a_t = self.alphas_cumprod[t]
        a_prev = torch.where(prev >= 0, self.alphas_cumprod[prev.clamp(min=0)], self.final_alpha_cumprod)
        # Eq. 16: sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        variance = ((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)
        sigma = eta * variance**0.5
        return a_t**0.5, (1 - a_t) ** 0.5, a_prev**0.5, (1 - a_prev - sigma**2) ** 0.5, sigma

    def coefficient_table(self, eta: float = 0.0, *, guided: bool = False) -> Tensor:
        """[n_steps, 6] fp32 coefficients of the current timesteps, for ``ops.guided_ddim_step_``:
        sqrt(a_t), sqrt(b_t), sqrt(a_prev), direction, sigma, first_step. ``first_step`` marks
        t = T-1 when ``guided`` (CFG), where the sampler steps on the conditional x0 without guidance."""
        if self.timesteps is None:
            raise RuntimeError("call set_timesteps() before coefficient_table()")
        first = (self.timesteps == self.num_train_steps - 1).float() * float(guided)
        return torch.stack([*self._coefficients(self.timesteps, eta), first], dim=1)

    def step(
        self,
        model_output: Tensor,
        timestep: Timestep,
        sample: Tensor,
        *,
        eta: float = 0.0,
        prediction_type: Optional[str] = None,
        epsilon_scaling: Optional[float] = None,
        variance_noise: Optional[Tensor] = None,
    ) -> SchedulerOutput:
        """One DDIM step x_t -> x_{t_prev}. model_output, sample, variance_noise: [..., D].

        ``variance_noise`` (standard normal, same shape) is required when ``eta > 0``.
        """
        sa, sb, sap, direction, sigma = self._coefficients(torch.tensor(int(timestep)), eta)
        ptype = PREDICTION_TYPES[_checked(prediction_type or self.config.prediction_type)]
        x0, eps = split_prediction(model_output, sample, sa, sb, ptype)
        if epsilon_scaling is not None:
            eps = eps / epsilon_scaling  # after x0 is formed: only the direction term is affected
        if self.config.thresholding:
            x0 = self._threshold(x0)
        elif self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        # Eq. 12: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps (+ sigma z)
        prev_sample = sap * x0 + direction * eps
        if eta > 0:
            if variance_noise is None:
                raise ValueError("eta > 0 needs variance_noise (a standard normal tensor shaped like sample)")
            prev_sample = prev_sample + sigma * variance_noise
        return SchedulerOutput(prev_sample, x0)

    def split(self, model_output: Tensor, sample: Tensor, timestep: Timestep) -> tuple[Tensor, Tensor]:
        """(x0, eps) implied by the model output at ``sample`` under the configured prediction type. [..., D] each."""
        a_t = self.alphas_cumprod[int(timestep)]
        ptype = PREDICTION_TYPES[_checked(self.config.prediction_type)]
        return split_prediction(model_output, sample, a_t**0.5, (1 - a_t) ** 0.5, ptype)

    def get_epsilon(self, model_output: Tensor, sample: Tensor, timestep: Timestep) -> Tensor:
        """The noise implied by the model output under the configured prediction type. [..., D]."""
        return self.split(model_output, sample, timestep)[1]

    def _per_sample(self, values: Tensor, timesteps: Tensor, like: Tensor) -> Tensor:
        v = values.to(device=like.device, dtype=like.dtype)[timesteps.to(like.device).long()].flatten()
        return v.reshape(v.shape + (1,) * (like.dim() - v.dim()))

    def add_noise(self, original: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """Forward process q(x_t | x0) = sqrt(a_t) x0 + sqrt(1 - a_t) eps. original, noise: [N, ...]; timesteps: [N]."""
        a = self._per_sample(self.alphas_cumprod, timesteps, original)
        return a**0.5 * original + (1 - a) ** 0.5 * noise

    def get_velocity(self, sample: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """v = sqrt(a_t) eps - sqrt(1 - a_t) x0 (v-prediction target)."""
        a = self._per_sample(self.alphas_cumprod, timesteps, sample)
        return a**0.5 * noise - (1 - a) ** 0.5 * sample

    def get_snrs(self) -> Tensor:
        """[T] signal-to-noise ratios a_t / (1 - a_t)."""
        return self.alphas_cumprod / (1 - self.alphas_cumprod)
