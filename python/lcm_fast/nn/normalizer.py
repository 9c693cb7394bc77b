"""SONAR embedding normalizer: ``normalize(x) = (x - center) / scale`` and its inverse.

Optional per-dimension clipping (buffers ``clip_min``/``clip_max``) and an FFT transform (official archs
``*_fft``): rfft (norm="backward") laid out as [real parts (dim/2+1) | imaginary parts 1..dim/2-1].
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from ..config import NormalizerConfig


def _fft(x: Tensor) -> Tensor:  # [..., dim] real -> [..., dim] packed spectrum (fp32 for half inputs)
    spec = torch.fft.rfft(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x, norm="backward")
    return torch.cat((spec.real, spec.imag[..., 1:-1]), dim=-1).to(x.dtype)


def _ifft(y: Tensor) -> Tensor:
    dim = y.shape[-1]
    yf = y.float() if y.dtype in (torch.float16, torch.bfloat16) else y
    real, imag = yf[..., : dim // 2 + 1], yf[..., dim // 2 + 1 :]
    zero = torch.zeros_like(real[..., :1])
    spec = torch.complex(real, torch.cat((zero, imag, zero), dim=-1))
    return torch.fft.irfft(spec, n=dim, norm="backward").to(y.dtype)


class SonarNormalizer(nn.Module):
    """Buffers ``center [dim]``, ``scale [dim]`` (+ ``clip_min``, ``clip_max`` when clipping)."""

    def __init__(self, dim: int, *, clip: bool = False, with_fft: bool = False) -> None:
        super().__init__()
        self.dim = dim
        self.with_fft = with_fft
        self.register_buffer("center", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        if clip:
            self.register_buffer("clip_min", torch.full((dim,), -torch.inf))
            self.register_buffer("clip_max", torch.full((dim,), torch.inf))
        else:
            self.clip_min = self.clip_max = None

    @classmethod
    def from_config(cls, dim: int, config: Optional[NormalizerConfig]) -> "SonarNormalizer":
        """``config`` (optional) selects clipping and FFT; its dim, when given, must equal ``dim``."""
        if config is None:
            return cls(dim)
        if config.dim != dim:
            raise ValueError(f"normalizer dim {config.dim} does not match sonar_embed_dim {dim}")
        return cls(dim, clip=config.clip_proba is not None, with_fft=config.with_fft)

    @classmethod
    def fit(cls, x: Tensor, method: str = "gaussian_robust") -> "SonarNormalizer":
        """Statistics from sample embeddings x: [N, dim] (fp32 maths).

        ``standard``: mean / std; ``robust``: median / interquartile range; ``gaussian_robust`` (the
        official default): median / IQR rescaled to unit variance for Gaussian data (IQR / 1.349).
        """
        if x.dim() != 2 or x.shape[0] < 2:
            raise ValueError(f"fit needs sample embeddings [N >= 2, dim], got {list(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("fit: the sample contains NaN or inf")
        x = x.float()
        if method == "standard":
            center, scale = x.mean(0), x.std(0)
        elif method in ("robust", "gaussian_robust"):
            q1, median, q3 = torch.quantile(x, torch.tensor([0.25, 0.5, 0.75]), dim=0)
            center, scale = median, q3 - q1
            if method == "gaussian_robust":
                scale = scale / (2 * math.sqrt(2) * torch.erfinv(torch.tensor(0.5)))  # Phi^-1(.75) - Phi^-1(.25)
        else:
            raise ValueError(f"unknown normalization method '{method}'; expected standard, robust or gaussian_robust")
        norm = cls(x.shape[1])
        norm.center.copy_(center)
        # (near-)constant dims are not scaled: dividing by a spread of ~1e-8 (a dim the encoder barely
        # uses, as in all-MiniLM-L6-v2) would turn any deviation there into a huge normalized value
        constant = scale <= 1e-4 * scale.median()
        norm.scale.copy_(torch.where(constant, torch.ones_like(scale), scale))
        return norm

    def save(self, path: str | Path) -> None:
        """Writes the official standalone format, ``{"model": {"center", "scale"[, "clip_min", "clip_max"]}}``."""
        torch.save({"model": {k: v.detach().cpu() for k, v in self.state_dict().items()}}, path)

    def normalize(self, x: Tensor) -> Tensor:  # [..., dim] SONAR space -> normalized space
        if self.with_fft:
            x = _fft(x)
        y = (x - self.center) / self.scale
        return torch.clamp(y, self.clip_min, self.clip_max) if self.clip_min is not None else y

    def denormalize(self, y: Tensor) -> Tensor:  # [..., dim] normalized space -> SONAR space
        if self.clip_min is not None:
            y = torch.clamp(y, self.clip_min, self.clip_max)
        x = y * self.scale + self.center
        return _ifft(x) if self.with_fft else x
