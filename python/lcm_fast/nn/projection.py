"""``Projection``: a linear layer plus an optional activation (key ``fc``, ``activation_fn``)."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ..config import ProjectionConfig
from .activation import make_activation
from .init import init_linear
from .linear import LinearFn, apply_linear


class Projection(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, config: ProjectionConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim, bias=config.linear_bias)
        self.activation_fn = make_activation(config.activation_name) if config.activation_name else None
        self.init = config.linear_init_fn

    def reset_parameters(self) -> None:  # the config's linear_init_fn (lcm_fast.nn.init)
        init_linear(self.fc, self.init)

    def forward(self, x: Tensor, linear: Optional[LinearFn] = None) -> Tensor:  # [..., in_dim] -> [..., out_dim]
        x = apply_linear(self.fc, x, linear)
        return self.activation_fn(x) if self.activation_fn is not None else x
