"""Classifier-free guidance with rescale (Lin et al. 2023, Algorithm 2; LCM paper section 2.3.4)."""

from __future__ import annotations

from torch import Tensor


def classifier_free_guidance(eps_cond: Tensor, eps_uncond: Tensor, scale: float, rescale: float) -> Tensor:
    """eps_cond, eps_uncond: [..., D] -> guided [..., D].

    ``g = eps_u + w (eps_c - eps_u)``, then ``g *= phi * std(eps_c) / std(g) + (1 - phi)`` with the std
    over the last dim (unbiased; the Bessel factor cancels in the ratio). The official generator
    computes the rescale even when phi = 0, where it is an exact multiplication by 1.
    """
    guided = eps_uncond + scale * (eps_cond - eps_uncond)
    factor = eps_cond.std(dim=-1, keepdim=True) / guided.std(dim=-1, keepdim=True)
    return (rescale * factor + (1 - rescale)) * guided
