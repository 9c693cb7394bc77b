"""DiT timestep embedder: 256 sinusoidal features -> MLP (keys ``fc1``, ``fc2``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

FREQUENCY_DIM = 256
MAX_PERIOD = 10000


def timestep_features(t: Tensor, dim: int = FREQUENCY_DIM) -> Tensor:
    """t: integer timesteps [...] -> fp32 features [..., dim] = [cos(t*f_j) | sin(t*f_j)] (cos first),
    f_j = exp(-ln(10000) * j / (dim/2)), j < dim/2."""
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[..., None] * freqs
    return torch.cat((torch.cos(args), torch.sin(args)), dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(FREQUENCY_DIM, dim)
        self.nonlin = nn.SiLU()
        self.fc2 = nn.Linear(dim, dim)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal weights (std 0.02), zero biases: the official ``DiTTimestepEncoder``'s, after DiT."""
        for fc in (self.fc1, self.fc2):
            nn.init.normal_(fc.weight, std=0.02)
            nn.init.zeros_(fc.bias)

    def forward(self, t: Tensor) -> Tensor:  # t: integer [...] -> [..., dim] in the weights' dtype
        return self.fc2(self.nonlin(self.fc1(timestep_features(t).to(self.fc1.weight.dtype))))
