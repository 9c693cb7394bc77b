"""lcm_fast: Large Concept Models (arXiv 2412.08821), compatible with the official checkpoints.

Quick start::

    import lcm_fast
    model = lcm_fast.load_official("path/to/model_card.yaml")
    out = lcm_fast.generate(model, prompts, seq_lens, options=lcm_fast.GenerationOptions.recommended())

Without the compiled extension everything runs in plain PyTorch; ``python -m lcm_fast.info`` says
which path each op takes.
"""

__version__ = "0.1.0"

from . import _ext
from .archs import ARCHS, get_arch
from .config import BaseLCMConfig, NormalizerConfig, OneTowerConfig, QuantLCMConfig, SchedulerConfig, TwoTowerConfig
from .diffusion import DDIMScheduler
from .inference import DocumentNoise, GenerationOptions, GenerationOutput, Generator, ReplayNoise, TorchNoise, generate
from .io import CheckpointError, from_pretrained, load_normalizer, load_official, save_pretrained
from .models import BaseLCM, OneTowerLCM, QuantLCM, TwoTowerLCM, build_model
from .ops import set_backend

EXT_AVAILABLE = _ext.EXT_AVAILABLE

__all__ = [
    "ARCHS",
    "BaseLCM",
    "BaseLCMConfig",
    "CheckpointError",
    "DDIMScheduler",
    "EXT_AVAILABLE",
    "GenerationOptions",
    "GenerationOutput",
    "Generator",
    "NormalizerConfig",
    "OneTowerConfig",
    "OneTowerLCM",
    "QuantLCM",
    "QuantLCMConfig",
    "DocumentNoise",
    "ReplayNoise",
    "SchedulerConfig",
    "TorchNoise",
    "TwoTowerConfig",
    "TwoTowerLCM",
    "build_model",
    "from_pretrained",
    "generate",
    "get_arch",
    "load_normalizer",
    "load_official",
    "save_pretrained",
    "set_backend",
]
