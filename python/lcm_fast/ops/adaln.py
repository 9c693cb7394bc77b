"""Fused AdaLN ops of the Two-Tower denoiser (DiT-style adaptive LayerNorm, paper section 2.3.4).

- ``adaln_norm_modulate``: ``y = norm(x) * (1 + scale) + shift`` in one pass per row;
- ``adaln_gated_residual_norm_modulate``: one sublayer's gated residual ``r = residual + gate * branch``
  fused with the next sublayer's norm + modulate, returning ``(r, y)``.

``norm`` is LayerNorm (``rms=False``: ``(x - mean) * rstd [* weight] [+ bias]``) or RMSNorm (``rms=True``:
``x * rstd [* weight]``), eps inside the square root. Both ops are differentiable: the compiled path
has a fused backward (``adaln_norm_modulate_backward``) wired through ``register_autograd``; the
reference path is plain autograd.

The kernels take the modulations (gate, shift, scale) either with the input's shape or as one row of D for every
row: a decoding step modulates all its rows with one timestep's row, which the kernels read in place (expanded
into copies, they were a third of the operations a denoising step dispatched).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _ext
from ._dispatch import OpSpec, register

MAX_CUDA_DIM = 8192


def _cuda_reasons(device_type: str, dtype, *, dim: int = 0, **_) -> list[str]:
    if device_type == "cuda" and dim > MAX_CUDA_DIM:
        return [f"D={dim} > {MAX_CUDA_DIM} (one block per row)"]
    return []


NORM_MODULATE = register(OpSpec("adaln_norm_modulate", extra=_cuda_reasons))
GATED_RESIDUAL = register(OpSpec("adaln_gated_residual_norm_modulate", extra=_cuda_reasons))


# ---- references (the specification; the official module semantics) --------------------------------------


def adaln_norm_modulate_ref(
    x: Tensor, shift: Tensor, scale: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
    rms: bool = False, eps: float = 1e-5,
) -> Tensor:
    """x, shift, scale: [..., D]; weight, bias: [D] or None -> [..., D] in x's dtype.

    LayerNorm as ``F.layer_norm`` (fp32 statistics, affine inside); RMSNorm as the official one:
    normalised in fp32, cast back, weight applied in the input dtype. Modulation in the input dtype.
    """
    if rms:
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)
        if weight is not None:
            normed = normed * weight
        if bias is not None:
            normed = normed + bias
    else:
        w = weight.to(x.dtype) if weight is not None else None
        b = bias.to(x.dtype) if bias is not None else None
        normed = F.layer_norm(x, (x.shape[-1],), w, b, eps)
    return normed * (1 + scale) + shift


def adaln_gated_residual_norm_modulate_ref(
    residual: Tensor, branch: Tensor, gate: Tensor, shift: Tensor, scale: Tensor,
    weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, rms: bool = False, eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """All activations [..., D] -> (r = residual + gate * branch, norm(r) * (1 + scale) + shift)."""
    r = residual + gate * branch
    return r, adaln_norm_modulate_ref(r, shift, scale, weight, bias, rms, eps)


# ---- fakes and autograd of the compiled ops --------------------------------------------------------------

if _ext.EXT_AVAILABLE:

    @torch.library.register_fake("lcm_fast::adaln_norm_modulate")
    def _norm_modulate_fake(x, shift, scale, weight, bias, rms, eps):
        return torch.empty_like(x)

    @torch.library.register_fake("lcm_fast::adaln_gated_residual_norm_modulate")
    def _gated_fake(residual, branch, gate, shift, scale, weight, bias, rms, eps):
        return torch.empty_like(residual), torch.empty_like(residual)

    @torch.library.register_fake("lcm_fast::adaln_norm_modulate_backward")
    def _backward_fake(grad_y, x, scale, weight, bias, rms, eps):
        d = x.shape[-1]
        return (torch.empty_like(x), torch.empty_like(x), x.new_empty(d, dtype=torch.float32),
                x.new_empty(d, dtype=torch.float32))

    def _param_grad(grad: Tensor, param: Optional[Tensor]) -> Optional[Tensor]:
        return grad.to(param.dtype) if param is not None else None

    def _like(grad: Tensor, shape: torch.Size) -> Tensor:
        """grad [..., D] summed over the rows that a one-row modulation of this shape was broadcast to."""
        return grad if grad.shape == shape else grad.reshape(-1, grad.shape[-1]).sum(0).reshape(shape)

    def _norm_modulate_setup(ctx, inputs, output):
        x, shift, scale, weight, bias, rms, eps = inputs
        ctx.save_for_backward(x, scale, weight, bias)
        ctx.shift_shape, ctx.rms, ctx.eps = shift.shape, rms, eps

    def _norm_modulate_backward(ctx, grad_y):
        x, scale, weight, bias = ctx.saved_tensors
        gx, gscale, gw, gb = torch.ops.lcm_fast.adaln_norm_modulate_backward(
            grad_y.contiguous(), x, scale.expand_as(x).contiguous(), weight, bias, ctx.rms, ctx.eps
        )
        return (gx, _like(grad_y, ctx.shift_shape), _like(gscale, scale.shape), _param_grad(gw, weight),
                _param_grad(gb, bias), None, None)

    torch.library.register_autograd(
        "lcm_fast::adaln_norm_modulate", _norm_modulate_backward, setup_context=_norm_modulate_setup
    )

    def _gated_setup(ctx, inputs, output):
        residual, branch, gate, shift, scale, weight, bias, rms, eps = inputs
        ctx.save_for_backward(output[0], branch, gate, scale, weight, bias)
        ctx.shift_shape, ctx.rms, ctx.eps = shift.shape, rms, eps

    def _gated_backward(ctx, grad_r, grad_y):
        r, branch, gate, scale, weight, bias = ctx.saved_tensors
        gx, gscale, gw, gb = torch.ops.lcm_fast.adaln_norm_modulate_backward(
            grad_y.contiguous(), r, scale.expand_as(r).contiguous(), weight, bias, ctx.rms, ctx.eps
        )
        d_r = gx if grad_r is None else gx + grad_r  # r feeds both the output r and the norm
        return (d_r, d_r * gate, _like(d_r * branch, gate.shape), _like(grad_y, ctx.shift_shape),
                _like(gscale, scale.shape), _param_grad(gw, weight), _param_grad(gb, bias), None, None)

    torch.library.register_autograd(
        "lcm_fast::adaln_gated_residual_norm_modulate", _gated_backward, setup_context=_gated_setup
    )


# ---- public dispatchers ----------------------------------------------------------------------------------


def adaln_norm_modulate(
    x: Tensor, shift: Tensor, scale: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
    *, rms: bool = False, eps: float = 1e-5, backend: Optional[str] = None,
) -> Tensor:
    """y = norm(x) * (1 + scale) + shift. x: [..., D]; shift, scale: broadcastable to x; weight, bias: [D]."""
    if NORM_MODULATE.choose(x.device.type, x.dtype, backend, dim=x.shape[-1]) == "ref":
        return adaln_norm_modulate_ref(x, shift, scale, weight, bias, rms, eps)
    x = x.contiguous()
    return torch.ops.lcm_fast.adaln_norm_modulate(x, *_modulations(x, shift, scale), weight, bias, rms, eps)


def adaln_gated_residual_norm_modulate(
    residual: Tensor, branch: Tensor, gate: Tensor, shift: Tensor, scale: Tensor,
    weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
    *, rms: bool = False, eps: float = 1e-5, backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """(r, y) with r = residual + gate * branch and y = norm(r) * (1 + scale) + shift; all [..., D]
    (gate, shift, scale broadcastable to residual)."""
    if GATED_RESIDUAL.choose(residual.device.type, residual.dtype, backend, dim=residual.shape[-1]) == "ref":
        return adaln_gated_residual_norm_modulate_ref(residual, branch, gate, shift, scale, weight, bias, rms, eps)
    like = residual.contiguous()
    return torch.ops.lcm_fast.adaln_gated_residual_norm_modulate(
        like, branch.expand_as(like).contiguous(), *_modulations(like, gate, shift, scale), weight, bias, rms, eps
    )


def _modulations(x: Tensor, *mods: Tensor) -> tuple[Tensor, ...]:
    """The modulations as the kernels take them: each one [D] row read in place when all are one row, else each
    expanded to x's shape (a copy where it broadcasts)."""
    D = x.shape[-1]
    if all(m.numel() == D and m.shape[-1] == D for m in mods):
        return tuple(m.contiguous() for m in mods)
    return tuple(m.expand_as(x).contiguous() for m in mods)
