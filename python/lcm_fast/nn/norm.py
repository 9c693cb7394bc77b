"""Layer normalisations with the official semantics (eps 1e-5 everywhere)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EPS = 1e-5


class RMSNorm(nn.Module):
    """LLaMA-style RMSNorm: normalise in fp32 (eps inside the rsqrt), cast back, then scale in the
    input dtype. Keys: ``weight``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:  # x: [..., dim]
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).type_as(x) * self.weight


class FP32LayerNorm(nn.Module):
    """LayerNorm computed in fp32 and cast back, weight only (official style ``fp32``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:  # x: [..., dim]
        return F.layer_norm(x.float(), (x.shape[-1],), self.weight.float(), None, EPS).type_as(x)


def make_norm(style: str, dim: int) -> nn.Module:
    """``standard`` (weight+bias), ``rms`` (weight), ``fp32`` (weight, fp32 maths), ``unit`` (no affine)."""
    if style == "standard":
        return nn.LayerNorm(dim, eps=EPS)
    if style == "unit":
        return nn.LayerNorm(dim, eps=EPS, elementwise_affine=False)
    if style == "rms":
        return RMSNorm(dim)
    if style == "fp32":
        return FP32LayerNorm(dim)
    raise ValueError(f"unknown layer_normalization_style '{style}'; expected standard, rms, fp32 or unit")


def norm_args(norm: nn.Module) -> tuple[Optional[Tensor], Optional[Tensor], bool, float]:
    """(weight, bias, rms, eps) of one of these norms (nn.LayerNorm, RMSNorm, FP32LayerNorm): the arguments of
    the fused AdaLN ops (``lcm_fast.ops.adaln``), which take tensors, not modules."""
    if isinstance(norm, nn.LayerNorm):
        return norm.weight, norm.bias, False, norm.eps
    if isinstance(norm, RMSNorm):
        return norm.weight, None, True, EPS
    if isinstance(norm, FP32LayerNorm):
        return norm.weight, None, False, EPS
    raise TypeError(f"no fused AdaLN path for {type(norm).__name__}")
