"""Generation: the reference and fast engines, noise sources and beam search over sampled concepts."""

from .beam import Candidates, DenoisingConsistency, PlanSimilarity
from .generator import Generator, generate
from .noise import DocumentNoise, NoiseSource, ReplayNoise, TorchNoise
from .options import GenerationOptions, GenerationOutput

__all__ = [
    "Candidates",
    "DenoisingConsistency",
    "DocumentNoise",
    "GenerationOptions",
    "GenerationOutput",
    "Generator",
    "NoiseSource",
    "PlanSimilarity",
    "ReplayNoise",
    "TorchNoise",
    "generate",
]
