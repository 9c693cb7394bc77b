"""Text in, text out: sentence segmentation and the retrieval decoder (sentence bank)."""

from .retrieval import RetrievalDecoder, check_dims
from .segment import Segment, segment, segment_spans

__all__ = ["RetrievalDecoder", "Segment", "check_dims", "segment", "segment_spans"]
