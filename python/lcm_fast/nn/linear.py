"""How an inference engine swaps its own GEMM into the modules: ``linear=`` arguments."""

from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor, nn

#: ``fn(x [..., K], weight [N, K], bias [N] | None) -> [..., N]``, e.g. :func:`lcm_fast.ops.skinny_linear`
LinearFn = Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]


def apply_linear(layer: nn.Linear, x: Tensor, fn: Optional[LinearFn] = None) -> Tensor:
    """``layer(x)``, or ``fn(x, layer.weight, layer.bias)`` when fn is given."""
    return layer(x) if fn is None else fn(x, layer.weight, layer.bias)
