"""The guided DDIM chain of the diffusion LCMs (Two-Tower, One-Tower), written once.

Generation (both engines, the per-step loop and the CUDA-graph sentence loop) and teacher-forced evaluation
(``evaluation/scorer``) all step through :class:`GuidedDDIM`: the schedule's timesteps, the coefficient table and
constants of the fused ``guided_ddim_step_`` (CFG combine, guidance rescale, DDIM update, epsilon scaling, clips),
and the first-CFG-step rule.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..ops.guided_ddim import PREDICTION_TYPES, guided_ddim_step_for, sampler_params
from .schedule import DDIMScheduler

#: denoise(i, t, unconditional) -> the model's prediction for the current latents at step i (timestep t):
#: [n, D], or [2n, D] (conditional rows, then unconditional) when ``unconditional``
Denoise = Callable[[int, int, bool], Tensor]


class GuidedDDIM:
    """DDIM over ``steps`` inference timesteps of ``scheduler`` (set on it), with classifier-free guidance when
    ``guidance_scale != 1``, one fused in-place step per timestep on fp32 latents [n, D].

    Args:
        scheduler: the model's scheduler with the call's options applied (``with_options``).
        steps: inference timesteps requested (``official_stride``: the official code's stride rule).
        guidance_scale, guidance_rescale: CFG weight w and rescale phi (paper section 2.3.4).
        eta: DDIM eta (0: deterministic; > 0 needs a noise row per step).
        epsilon_scaling: the sampler's epsilon scaling (None: none); clip_noise: the latents' clamp.
        device, dim: where the latents live and their width (they pick the fused step's implementation).
    """

    def __init__(self, scheduler: DDIMScheduler, steps: int, *, guidance_scale: float = 1.0,
                 guidance_rescale: float = 0.0, eta: float = 0.0, epsilon_scaling: Optional[float] = None,
                 clip_noise: float = 100.0, official_stride: bool = False, device: torch.device, dim: int) -> None:
        scheduler.set_timesteps(steps, official_stride=official_stride)
        self.scheduler = scheduler
        self.timesteps: list[int] = scheduler.timesteps.tolist()
        self.cfg = guidance_scale != 1.0
        self.coefficients = scheduler.coefficient_table(eta, guided=self.cfg).to(device)  # [steps, 6]
        clip_sample = scheduler.config.clip_sample_range if scheduler.config.clip_sample else None
        self.params = sampler_params(guidance_scale, guidance_rescale, epsilon_scaling, clip_noise, clip_sample,
                                     device=device)
        self.prediction_type = PREDICTION_TYPES[scheduler.config.prediction_type]
        self._step = guided_ddim_step_for(torch.device(device).type, torch.float32, dim)  # chosen once

    def unconditional(self, t: int) -> bool:
        """Whether the step at timestep t uses the unconditional prediction: with CFG, every step but the first.
        At t = T-1, a_t = 0 under zero-terminal SNR, epsilon is undefined, and the sampler steps on the
        conditional x0 alone (the official behaviour; the coefficient table marks that step)."""
        return self.cfg and t != self.scheduler.num_train_steps - 1

    def step(self, i: int, latents: Tensor, x0: Tensor, pred: Tensor, noise: Optional[Tensor] = None) -> None:
        """Step i in place: latents, x0 [n, D] fp32 (x0: the step's x0 prediction); pred [n, D] or [2n, D] fp32
        (a reference evaluation may pass both halves at the first step: the unconditional one is then unused);
        noise [n, D] (the eta term) or None."""
        self._step(latents, x0, pred, self.coefficients[i], self.params, noise, self.prediction_type)

    def run(self, latents: Tensor, x0: Tensor, denoise: Denoise, noise: Optional[Tensor] = None) -> None:
        """Every step in place (latents, x0 [n, D] fp32; noise [steps, n, D] or None): the sentence's x0 is ``x0``
        after the last step."""
        for i, t in enumerate(self.timesteps):
            self.step(i, latents, x0, denoise(i, t, self.unconditional(t)), noise[i] if noise is not None else None)
