"""Injectable noise: every random draw of generation goes through one ``NoiseSource``.

``TorchNoise(seed)`` draws from a CPU ``torch.Generator`` seeded like ``torch.manual_seed(seed)``, so the
same shapes in the same order give the official generator's noise bit for bit, on any device.
``ReplayNoise`` replays recorded tensors (the parity fixtures) and checks every shape.
``DocumentNoise(seed, keys)`` keys each document's draws by (seed, its key, the position generated), so a
document's noise does not depend on the batch it is in: what corpus-scale generation needs for outputs that
do not depend on batching, workers or resuming.
"""

from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import torch
from torch import Tensor

#: where a draw comes from: the initial diffusion latents, the DDIM eta noise, Base-LCM sampling,
#: Quant-LCM unit sampling, a beam scorer's draws (:class:`~lcm_fast.inference.beam.DenoisingConsistency`)
SITES = ("initial_latents", "ddim_variance", "latent_sample", "unit_sample", "beam_score")


class NoiseSource:
    """Where generation's random draws come from. Every draw is batch-first: row i belongs to the i-th active
    document. The generator announces each position (:meth:`at`) and each compaction of the active documents
    (:meth:`reorder`); sources that do not key by document ignore both."""

    def randn(self, shape: tuple[int, ...], *, site: str, device: torch.device) -> Tensor:
        """A standard-normal fp32 tensor of ``shape`` [active documents, ...] on ``device``."""
        raise NotImplementedError

    def at(self, position: int) -> None:
        """The draws that follow produce sentence ``position`` (0-based, prompt included) of every active
        document; -1: the prefill of the prompts' common part, whose output is discarded."""

    def reorder(self, index: Tensor) -> None:
        """The active documents are now rows ``index`` [n] of the previous ones (finished ones dropped)."""

    def expand(self, width: int) -> None:
        """Beam search: every active document becomes ``width`` consecutive rows (its beams' candidates), each with
        its own draws; row 0 of a document keeps the document's. Called before any draw; rows then stay in place
        (a row's noise belongs to its slot, not to the beam that moves into it)."""


class TorchNoise(NoiseSource):
    """Standard normal draws from a seeded CPU generator (``seed=None``: torch's global CPU RNG)."""

    def __init__(self, seed: Optional[int] = None) -> None:
        self.generator = None
        if seed is not None:
            self.generator = torch.Generator(device="cpu")
            self.generator.manual_seed(seed)

    def randn(self, shape: tuple[int, ...], *, site: str, device: torch.device) -> Tensor:
        return torch.randn(shape, generator=self.generator, dtype=torch.float32).to(device)


class ReplayNoise(NoiseSource):
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


def document_seed(seed: int, key: str | int, position: int) -> int:
    """The 63-bit seed of one document's draws at one position: a hash of (seed, key, position), the same in every
    process (unlike Python's ``hash``)."""
    digest = hashlib.blake2b(f"{seed}\0{key!r}\0{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class DocumentNoise(NoiseSource):
    """Noise keyed by document: row i of every draw at position p comes from a generator seeded by
    :func:`document_seed` (seed, keys[i], p) and continued through that position's draws (their order is the
    algorithm's, the same in every batch). So a document's draws do not depend on the other documents, the
    batch size, its row or the prompts' lengths around it. keys: one per prompt row (the documents' ids). Beam search's
    candidate rows of a document are keyed by (key, j) (:meth:`expand`), so they too do not depend on the batch."""

    def __init__(self, seed: int, keys: Sequence[str | int]) -> None:
        self.seed, self.keys = int(seed), list(keys)
        self.at(-1)

    def at(self, position: int) -> None:
        self.position = position
        self._generators: Optional[list[torch.Generator]] = None  # seeded at the position's first draw

    def expand(self, width: int) -> None:
        self.keys = [key if j == 0 else (key, j) for key in self.keys for j in range(width)]
        self._generators = None

    def reorder(self, index: Tensor) -> None:
        rows = index.tolist()
        self.keys = [self.keys[i] for i in rows]
        if self._generators is not None:
            self._generators = [self._generators[i] for i in rows]

    def randn(self, shape: tuple[int, ...], *, site: str, device: torch.device) -> Tensor:
        if shape[0] != len(self.keys):
            raise RuntimeError(f"DocumentNoise: a {site} draw for {shape[0]} rows while {len(self.keys)} documents "
                               "are active")
        if self._generators is None:
            self._generators = [torch.Generator().manual_seed(document_seed(self.seed, k, self.position))
                                for k in self.keys]
        if not self.keys:
            return torch.empty(shape, device=device)
        return torch.stack([torch.randn(shape[1:], generator=g) for g in self._generators]).to(device)
