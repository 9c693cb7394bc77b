"""Injectable noise: every random draw of generation goes through one ``NoiseSource``.

``TorchNoise(seed)`` draws from a CPU ``torch.Generator`` seeded like ``torch.manual_seed(seed)``, so the
same shapes in the same order give the official generator's noise bit for bit, on any device.
``ReplayNoise`` replays recorded tensors (the parity fixtures) and checks every shape.
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence

import torch
from torch import Tensor

#: where a draw comes from: the initial diffusion latents, the DDIM eta noise, Base-LCM sampling,
#: Quant-LCM unit sampling
SITES = ("initial_latents", "ddim_variance", "latent_sample", "unit_sample")


class NoiseSource(Protocol):
    def randn(self, shape: tuple[int, ...], *, site: str, device: torch.device) -> Tensor:
        """A standard-normal fp32 tensor of ``shape`` on ``device``."""
        ...


class TorchNoise:
    """Standard normal draws from a seeded CPU generator (``seed=None``: torch's global CPU RNG)."""

    def __init__(self, seed: Optional[int] = None) -> None:
        self.generator = None
        if seed is not None:
            self.generator = torch.Generator(device="cpu")
            self.generator.manual_seed(seed)

    def randn(self, shape: tuple[int, ...], *, site: str, device: torch.device) -> Tensor:
        return torch.randn(shape, generator=self.generator, dtype=torch.float32).to(device)


class ReplayNoise:
    """Returns ``tensors`` in order; a draw of another shape, or one too many, is an error."""

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.tensors = list(tensors)
        self.index = 0

    @property
    def remaining(self) -> int:
        return len(self.tensors) - self.index

    def randn(self, shape: tuple[int, ...], *, site: str, device: torch.device) -> Tensor:
        if self.index >= len(self.tensors):
            raise RuntimeError(f"noise replay exhausted: draw #{self.index} ({site}, shape {list(shape)}) has no record")
        t = self.tensors[self.index]
        if tuple(t.shape) != tuple(shape):
            raise RuntimeError(
                f"noise replay mismatch at draw #{self.index} ({site}): recorded shape {list(t.shape)}, "
                f"requested {list(shape)}"
            )
        self.index += 1
        return t.to(device=device, dtype=torch.float32)
