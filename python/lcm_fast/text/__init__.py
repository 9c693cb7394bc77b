"""Text in, text out: sentence segmentation, encoders (MiniLM default; SONAR native, :mod:`lcm_fast.text.sonar`,
with the user's weights) and decoders (the retrieval decoder over a sentence bank by default; SONAR), and the MI
coherence metric."""

from .corpus_generation import generate_corpus
from .encoders import Decoder, Encoder, MiniLMEncoder, load_encoder
from .mutual_information import MutualInformation
from .retrieval import RetrievalDecoder, check_dims
from .segment import Segment, segment, segment_spans
from .sonar import SonarDecoder, SonarEncoder

__all__ = [
    "Decoder", "Encoder", "MiniLMEncoder", "MutualInformation", "RetrievalDecoder", "Segment", "SonarDecoder", "SonarEncoder", "check_dims",
    "generate_corpus", "load_encoder", "segment", "segment_spans",
]
