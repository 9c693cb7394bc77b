"""Inference FLOPs of LCM pipelines vs token LLMs (paper section 2.5.1): the analytic model, token
transformer baselines to count and time, and Figure 13."""

from .baseline import TokenTransformer
from .counting import count_flops
from .model import (
    ALGORITHMS,
    LLAMA,
    SONAR_DECODER,
    SONAR_ENCODER,
    PipelineFlops,
    TokenModel,
    crossover_sentence_length,
    lcm_pipeline_flops,
    llm_flops,
    sonar_decode_flops,
    sonar_encode_flops,
    two_tower_flops,
)

__all__ = [
    "ALGORITHMS", "LLAMA", "PipelineFlops", "SONAR_DECODER", "SONAR_ENCODER", "TokenModel", "TokenTransformer", "count_flops",
    "crossover_sentence_length", "lcm_pipeline_flops", "llm_flops", "sonar_decode_flops", "sonar_encode_flops",
    "two_tower_flops",
]
