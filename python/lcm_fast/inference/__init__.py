"""Generation: the reference engine (a readable port of the official algorithm) and noise sources."""

from .generator import GenerationOptions, GenerationOutput, Generator, generate
from .noise import NoiseSource, ReplayNoise, TorchNoise

__all__ = [
    "GenerationOptions",
    "GenerationOutput",
    "Generator",
    "NoiseSource",
    "ReplayNoise",
    "TorchNoise",
    "generate",
]
