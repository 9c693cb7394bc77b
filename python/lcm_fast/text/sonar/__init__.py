"""SONAR's text encoder and decoder, native: sonar-space's outputs without fairseq2 (any torch, CPU or CUDA).

``SonarEncoder(weights_dir=DIR).encode(sentences)`` and ``SonarDecoder(weights_dir=DIR).decode(embeddings)``;
the pieces: :class:`SonarTokenizer`, :class:`SonarTextEncoder` / :class:`SonarTextDecoder` (``load_sonar_checkpoint``)
and :func:`beam_search`. Parity with sonar-space 0.5 is tested on fixtures it made (``scripts/make_sonar_fixtures.py``).
"""

from .beam_search import Hypothesis, beam_search
from .model import SonarConfig, SonarTextDecoder, SonarTextEncoder, load_sonar_checkpoint
from .pipeline import SonarDecoder, SonarEncoder
from .tokenizer import SONAR_LANGS, SonarTokenizer

__all__ = [
    "Hypothesis", "SONAR_LANGS", "SonarConfig", "SonarDecoder", "SonarEncoder", "SonarTextDecoder", "SonarTextEncoder",
    "SonarTokenizer", "beam_search", "load_sonar_checkpoint",
]
