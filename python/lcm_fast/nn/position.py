"""Position encodings: interleaved RoPE (per attention module), learned and sinusoidal (frontend)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class _DeviceCache:
    """Deterministic tables built on first use per device. Not buffers: they are no part of a
    checkpoint, and models built on the meta device (for loading) still get real tables."""

    def __init__(self, build) -> None:
        self.build = build
        self.tables: dict = {}

    def __call__(self, device: torch.device):
        if device not in self.tables:
            self.tables[device] = self.build(device)
        return self.tables[device]


def check_positions(start: int, length: int, max_seq_len: int) -> None:
    if start + length > max_seq_len:
        raise ValueError(
            f"positions {start}..{start + length - 1} exceed the model's max_seq_len={max_seq_len}; "
            "shorten the prompt or max_gen_len"
        )


class RotaryEncoder(nn.Module):
    """RoPE over *interleaved* pairs (dims 2i, 2i+1 rotate together), computed in fp32 and cast back.

    ``inv_freq_i = theta^(-2i/head_dim)``, angle = position * inv_freq; positions are absolute from 0.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self.tables = _DeviceCache(self._build)  # device -> (cos, sin), each [max_seq_len, head_dim / 2]

    def _build(self, device: torch.device) -> tuple[Tensor, Tensor]:
        idx = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (self.theta ** (idx / self.head_dim))
        angles = torch.outer(torch.arange(self.max_seq_len, dtype=torch.float32, device=device), inv_freq)
        return angles.cos(), angles.sin()  # [max_seq_len, head_dim/2] each

    def forward(self, x: Tensor, start: int = 0) -> Tensor:  # x: [B, H, S, head_dim]
        seq_len = x.shape[-2]
        check_positions(start, seq_len, self.max_seq_len)
        cos, sin = self.tables(x.device)
        cos, sin = cos[start : start + seq_len], sin[start : start + seq_len]
        xf = x.float().unflatten(-1, (-1, 2))
        even, odd = xf[..., 0], xf[..., 1]
        out = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
        return out.flatten(-2).type_as(x)


class LearnedPositionEncoder(nn.Module):
    """Adds a learned ``weight[max_seq_len, dim]`` row per position."""

    def __init__(self, dim: int, max_seq_len: int) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        self.weight = nn.Parameter(torch.zeros(max_seq_len, dim))

    def forward(self, x: Tensor, start: int = 0) -> Tensor:  # x: [B, S, dim]
        check_positions(start, x.shape[1], self.max_seq_len)
        return x + self.weight[start : start + x.shape[1]]


def sinusoidal_table(num_positions: int, dim: int, offset: int = 0, device=None) -> Tensor:
    """fp32 [num_positions, dim]: ``[sin(p*f) | cos(p*f)]`` at steps p = offset.., f_i = exp(-i*ln(1e4)/(dim/2-1)),
    by fairseq2's own ops in its order (``_fill_sin_freq_table``): the same bits (SONAR's fixtures check it)."""
    half = dim // 2
    steps = torch.arange(offset, offset + num_positions, dtype=torch.float32, device=device)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=device) * -math.log(10000.0) / (half - 1))
    angles = torch.outer(steps, freqs)
    return torch.cat((angles.sin(), angles[:, : dim - half].cos()), dim=-1)


class SinusoidalPositionEncoder(nn.Module):
    """fairseq2's ``SinusoidalPositionEncoder``: adds :func:`sinusoidal_table` in fp32. ``offset``: the step of
    position 0 (fairseq's legacy models, SONAR among them, start at pad_idx + 1 = 2)."""

    def __init__(self, dim: int, max_seq_len: int, offset: int = 0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"sinusoidal positions need an even dim, got {dim}")
        self.max_seq_len, self.dim, self.offset = max_seq_len, dim, offset
        self._table = _DeviceCache(lambda device: sinusoidal_table(max_seq_len, dim, offset, device))

    def forward(self, x: Tensor, start: int = 0) -> Tensor:  # x: [B, S, dim]
        check_positions(start, x.shape[1], self.max_seq_len)
        return (x.float() + self._table(x.device)[start : start + x.shape[1]]).type_as(x)


def make_frontend_positions(style: str, dim: int, max_seq_len: int) -> nn.Module | None:
    """The frontend's position module for ``pos_embedding_style`` (RoPE lives in the attention)."""
    if style == "learned":
        return LearnedPositionEncoder(dim, max_seq_len)
    if style == "sine":
        return SinusoidalPositionEncoder(dim, max_seq_len)
    if style in ("rope", "none"):
        return None
    raise ValueError(f"unknown pos_embedding_style '{style}'; expected rope, sine, learned or none")
