"""Model construction from a config, and parameter accounting against the official builders."""

from __future__ import annotations

from typing import Optional

import torch

from ..config import BaseLCMConfig, ModelConfig, NormalizerConfig, OneTowerConfig, QuantLCMConfig, TwoTowerConfig
from .base_lcm import BaseLCM
from .one_tower import OneTowerLCM
from .quant_lcm import QuantLCM
from .two_tower import TwoTowerLCM


def build_model(
    config: ModelConfig,
    *,
    normalizer: Optional[NormalizerConfig] = None,
    device: Optional[torch.device | str] = None,
    dtype: Optional[torch.dtype] = None,
    init: bool = True,
) -> BaseLCM | TwoTowerLCM | OneTowerLCM | QuantLCM:
    """Builds the model for ``config``, with the official initialisation of a model trained from scratch
    (``model.init_weights()``, :mod:`lcm_fast.nn.init`; ``init=False``: as the modules build, for weights loaded
    next; ``device="meta"`` to only inspect).

    ``normalizer`` selects clipping/FFT for the SONAR normalizer (its statistics come from weights).
    """
    with torch.device(device or "cpu"):
        if isinstance(config, TwoTowerConfig):
            model = TwoTowerLCM(config, normalizer)
        elif isinstance(config, BaseLCMConfig):
            model = BaseLCM(config, normalizer)
        elif isinstance(config, OneTowerConfig):
            model = OneTowerLCM(config, normalizer)
        elif isinstance(config, QuantLCMConfig):
            model = QuantLCM(config, normalizer)
        else:
            raise TypeError(f"not a model config: {type(config).__name__}")
        if init:
            model.init_weights()
    return model.to(dtype) if dtype is not None else model


def official_parameter_count(model: BaseLCM | TwoTowerLCM) -> int:
    """Parameters the official builder creates for the same config: ours plus the denoiser
    self-attention's dead q/k projections (and q/k norms), which lcm_fast does not allocate."""
    count = sum(p.numel() for p in model.parameters())
    if isinstance(model, TwoTowerLCM):
        cfg, dim = model.config.denoiser, model.config.model_dim
        per_layer = 2 * (dim * dim + dim)
        if cfg.enable_qk_layernorm:
            norm = {"standard": 2 * dim, "rms": dim, "fp32": dim, "unit": 0}[cfg.layer_normalization_style]
            per_layer += 2 * norm
        count += cfg.num_layers * per_layer
    return count
