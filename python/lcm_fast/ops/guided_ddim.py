"""``guided_ddim_step_``: one fused, in-place DDIM step of the Two-Tower sampler.

Per row it does what the official sampler does in ~25 small ops: the epsilon implied by the conditional
and unconditional predictions, classifier-free guidance ``g = eps_u + w (eps_c - eps_u)``, the rescale
``g *= phi std(eps_c) / std(g) + (1 - phi)``, ``x0 = (x - sqrt(b_t) g) / sqrt(a_t)``, epsilon scaling,
the x0 clip, the DDIM update (Eq. 12) with optional eta noise, and the ``clip_noise`` clamp. At
``t = T-1`` under CFG (``coef[FIRST_STEP] = 1``) it steps on the conditional prediction without
guidance, as the official code does because ``a_{T-1} = 0``: chosen by data, never by a host branch.
Without CFG (``model_out`` has B rows) it is the plain DDIM step.

Non-finite values propagate alike on every backend: the clips keep NaN (as ``torch.clamp`` does), so a NaN
latent is never disguised as ``+-clip``. The rescale divides ``std(eps_c)`` by ``std(g)`` over the row: with
D = 1 that is 0/0 (the unbiased std of one value) and, as in the official code, which forms the ratio even at
rescale 0, every guided step is NaN; a row whose guided epsilon is constant divides by zero likewise. The first
CFG step (no guidance) and steps without CFG are unaffected.

``coef`` is one row of :meth:`lcm_fast.DDIMScheduler.coefficient_table`; ``params`` comes from
:func:`sampler_params`. Layouts: ``csrc/sampler/guided_ddim.h``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from .. import _ext
from ._dispatch import OpSpec, register

#: coefficient table columns (csrc/sampler/guided_ddim.h ``Coef``)
COEF_FIELDS = ("sqrt_alpha", "sqrt_beta", "sqrt_alpha_prev", "direction", "sigma", "first_step")
#: generation constants (csrc/sampler/guided_ddim.h ``Param``)
PARAM_FIELDS = ("guidance_scale", "rescale", "one_minus_rescale", "epsilon_scaling", "clip_noise", "clip_sample")
PREDICTION_TYPES = {"sample": 0, "epsilon": 1, "v_prediction": 2}
MAX_CUDA_DIM = 8192


def sampler_params(
    guidance_scale: float,
    guidance_rescale: float,
    epsilon_scaling: Optional[float],
    clip_noise: float,
    clip_sample_range: Optional[float] = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """[6] fp32 generation constants. ``1 - rescale`` is rounded once from double, like the official code."""
    values = [
        guidance_scale,
        guidance_rescale,
        1 - guidance_rescale,
        1.0 if epsilon_scaling is None else epsilon_scaling,
        clip_noise,
        math.inf if clip_sample_range is None else clip_sample_range,
    ]
    return torch.tensor(values, dtype=torch.float32, device=device)


def split_prediction(out: Tensor, x: Tensor, sa: Tensor, sb: Tensor, prediction_type: int) -> tuple[Tensor, Tensor]:
    """(x0, eps) from a model output ``out`` at the sample ``x`` (DDIM Eq. 12 solved both ways);
    sa = sqrt(a_t), sb = sqrt(1 - a_t); prediction_type 0 sample, 1 epsilon, 2 v_prediction."""
    if prediction_type == 0:
        return out, (x - sa * out) / sb
    if prediction_type == 1:
        return (x - sb * out) / sa, out
    return sa * x - sb * out, sa * out + sb * x


def guided_ddim_step_ref(
    latents: Tensor, pred_x0: Tensor, model_out: Tensor, coef: Tensor, params: Tensor,
    noise: Optional[Tensor] = None, prediction_type: int = 0,
) -> None:
    """Plain-PyTorch twin (the specification), in the official operation order, computed in fp32
    (fp64 for fp64 inputs, which makes it the high-precision oracle of the tests).

    latents, pred_x0: [B, D] (written); model_out: [2B, D] or [B, D]; coef: [6]; params: [6];
    noise: [B, D] or None.
    """
    B, compute = latents.shape[0], torch.promote_types(latents.dtype, torch.float32)
    x, out = latents.to(compute), model_out.to(compute)
    sa, sb, sap, direction, sigma, first = coef.to(compute).unbind()
    w, phi, one_minus_phi, scaling, clip_noise, clip_sample = params.to(compute).unbind()
    x0, eps = split_prediction(out[:B], x, sa, sb, prediction_type)
    if out.shape[0] == 2 * B:
        eps_c, eps_u = eps, split_prediction(out[B:], x, sa, sb, prediction_type)[1]
        guided = eps_u + w * (eps_c - eps_u)
        guided = (phi * (eps_c.std(dim=-1, keepdim=True) / guided.std(dim=-1, keepdim=True)) + one_minus_phi) * guided
        first = first > 0
        x0 = torch.where(first, x0, (x - sb * guided) / sa)
        eps = torch.where(first, eps, guided)
    eps = eps / scaling
    x0 = x0.clamp(-clip_sample, clip_sample)
    prev = sap * x0 + direction * eps
    if noise is not None:
        prev = prev + sigma * noise.to(compute)
    latents.copy_(prev.clamp(-clip_noise, clip_noise))
    pred_x0.copy_(x0)


def _cuda_reasons(device_type: str, dtype, *, dim: int = 0, **_) -> list[str]:
    if device_type == "cuda" and dim > MAX_CUDA_DIM:
        return [f"D={dim} > {MAX_CUDA_DIM} (one block per row)"]
    return []


SPEC = register(OpSpec("guided_ddim_step_", extra=_cuda_reasons))

if _ext.EXT_AVAILABLE:

    @torch.library.register_fake("lcm_fast::guided_ddim_step_")
    def _guided_ddim_step_fake(latents, pred_x0, model_out, coef, params, noise, prediction_type) -> None:
        torch._check(model_out.shape[0] in (latents.shape[0], 2 * latents.shape[0]))
        return None


def guided_ddim_step_for(device_type: str, dtype: torch.dtype, dim: int,
                         backend: Optional[str] = None) -> Callable[..., None]:
    """The implementation :func:`guided_ddim_step_` takes for [B, dim] inputs of this device and dtype, resolved
    once for a generation call (choosing per call cost ~10 us of a ~1 ms step at model dim 256). Takes the
    op's positional arguments, contiguous, with an int prediction type."""
    if SPEC.choose(device_type, dtype, backend, dim=dim) == "ref":
        return guided_ddim_step_ref
    return torch.ops.lcm_fast.guided_ddim_step_.default


def guided_ddim_step_(
    latents: Tensor, pred_x0: Tensor, model_out: Tensor, coef: Tensor, params: Tensor,
    noise: Optional[Tensor] = None, prediction_type: int | str = "sample", *, backend: Optional[str] = None,
) -> None:
    """In place: latents [B, D] <- clamp(x_prev, +-clip_noise), pred_x0 [B, D] <- x0.

    model_out: [2B, D] (conditional rows, then unconditional) or [B, D] (no CFG), same dtype as latents;
    coef: [6] fp32 row of the coefficient table; params: [6] fp32 from :func:`sampler_params`;
    noise: [B, D] standard normal (the eta term) or None; prediction_type: the model's.
    """
    pt = PREDICTION_TYPES[prediction_type] if isinstance(prediction_type, str) else int(prediction_type)
    step = guided_ddim_step_for(latents.device.type, latents.dtype, latents.shape[-1], backend)
    step(latents, pred_x0, model_out.contiguous(), coef, params, noise.contiguous() if noise is not None else None, pt)
