"""Generation: the reference engine (a readable port of the official algorithm) and noise sources."""

from .generator import GenerationOptions, GenerationOutput, Generator, generate
from .noise import DocumentNoise, NoiseSource, ReplayNoise, TorchNoise

__all__ = [
    "DocumentNoise",
    "GenerationOptions",
    "GenerationOutput",
    "Generator",
    "NoiseSource",
    "ReplayNoise",
    "TorchNoise",
    "generate",
]
