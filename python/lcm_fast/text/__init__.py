"""Text in, text out: sentence segmentation, encoders (MiniLM default, SONAR optional) and decoders
(the retrieval decoder over a sentence bank by default, SONAR optional)."""

from .encoders import Decoder, Encoder, MiniLMEncoder, SonarDecoder, SonarEncoder, load_encoder
from .retrieval import RetrievalDecoder, check_dims
from .segment import Segment, segment, segment_spans

__all__ = [
    "Decoder", "Encoder", "MiniLMEncoder", "RetrievalDecoder", "Segment", "SonarDecoder", "SonarEncoder", "check_dims",
    "load_encoder", "segment", "segment_spans",
]
