"""Fused ops. Each module holds the public dispatcher, its plain-PyTorch ``_ref`` twin (the
specification, the fallback and the test oracle) and the ``register_fake`` for torch.compile."""

from ._dispatch import OPS, set_backend
from .adaln import (
    adaln_gated_residual_norm_modulate,
    adaln_gated_residual_norm_modulate_ref,
    adaln_norm_modulate,
    adaln_norm_modulate_ref,
)
from .decoder import decoder_layers_decode, decoder_layers_decode_ref
from .denoiser import denoiser_layers_decode, denoiser_layers_decode_ref
from .guided_ddim import guided_ddim_step_, guided_ddim_step_ref, sampler_params
from .linear import quantize_weight, skinny_linear, skinny_linear_multi, skinny_linear_multi_ref, skinny_linear_ref
from .rvq import rvq_decode, rvq_decode_ref, rvq_encode, rvq_encode_ref

__all__ = [
    "OPS",
    "adaln_gated_residual_norm_modulate",
    "adaln_gated_residual_norm_modulate_ref",
    "adaln_norm_modulate",
    "adaln_norm_modulate_ref",
    "decoder_layers_decode",
    "decoder_layers_decode_ref",
    "denoiser_layers_decode",
    "denoiser_layers_decode_ref",
    "guided_ddim_step_",
    "guided_ddim_step_ref",
    "quantize_weight",
    "rvq_decode",
    "rvq_decode_ref",
    "rvq_encode",
    "rvq_encode_ref",
    "sampler_params",
    "set_backend",
    "skinny_linear",
    "skinny_linear_multi",
    "skinny_linear_multi_ref",
    "skinny_linear_ref",
]
