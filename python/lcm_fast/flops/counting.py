"""``FlopCounterMode`` that also sees attention on the CPU and lcm_fast's own matmul op.

torch (2.13) has FLOP formulas for the CUDA SDPA kernels but none for the CPU one,
``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward, so CPU counts silently miss all
attention. Importing this module registers the standard SDPA formulas (2 matmuls forward, 5 backward,
GQA-aware) for them, the matmul formula for ``lcm_fast::skinny_linear`` (the fast engine's
projections) and the sum of both for ``lcm_fast::denoiser_layers_decode`` (the fast engine's denoiser step).
"""

from __future__ import annotations

import torch
from torch.utils import flop_counter

from .. import _ext
from ..ops.denoiser import LAYER_TENSORS

_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_CPU_SDPA_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _missing(op) -> bool:
    return op not in flop_counter.flop_registry and op.default not in flop_counter.flop_registry


if _missing(_CPU_SDPA):

    @flop_counter.register_flop_formula(_CPU_SDPA)
    def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


if _missing(_CPU_SDPA_BACKWARD):

    @flop_counter.register_flop_formula(_CPU_SDPA_BACKWARD)
    def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                                **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


if _ext.EXT_AVAILABLE:

    @flop_counter.register_flop_formula(torch.ops.lcm_fast.skinny_linear)
    def _skinny_linear_flop(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * x_shape[0] * x_shape[1] * w_shape[0]  # bias adds are not counted, as for aten.addmm

    # projection weights that only the conditional rows go through
    _CROSS_ATTENTION_WEIGHTS = {LAYER_TENSORS.index(name) for name in ("query_weight", "cross_out_weight")}

    @flop_counter.register_flop_formula(torch.ops.lcm_fast.denoiser_layers_decode)
    def _denoiser_layers_decode_flop(h_shape, modulations_shape, param_shapes, keys_shapes, values_shapes, length,
                                     rows_shape, num_cond, uncond_cross_shape, rms, eps, activation, post_norms,
                                     qk_norm, io_shapes, *, out_shape=None, **kwargs) -> int:
        # what its composed twin counts: every projection as a matmul over its rows, SDPA as 2 matmuls
        total = 4 * num_cond * length * uncond_cross_shape[1] * len(keys_shapes)
        for weight in (io_shapes[0], io_shapes[5]) if io_shapes else ():  # the input and output projections
            total += 2 * h_shape[0] * weight[0] * weight[1]
        for i, shape in enumerate(param_shapes):
            if shape is not None and len(shape) == 2:  # projection weights [N, K]
                rows = num_cond if i % len(LAYER_TENSORS) in _CROSS_ATTENTION_WEIGHTS else h_shape[0]
                total += 2 * rows * shape[0] * shape[1]
        return total


def count_flops(fn, *args, **kwargs) -> tuple[int, object]:
    """(FLOPs counted while running ``fn(*args, **kwargs)``, its result)."""
    with flop_counter.FlopCounterMode(display=False) as counter:
        result = fn(*args, **kwargs)
    return counter.get_total_flops(), result
