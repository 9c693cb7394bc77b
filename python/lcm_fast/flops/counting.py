"""``FlopCounterMode`` that also sees attention on the CPU and lcm_fast's own matmul op.

torch (2.13) has FLOP formulas for the CUDA SDPA kernels but none for the CPU one,
``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward, so CPU counts silently miss all
attention. Importing this module registers the standard SDPA formulas (2 matmuls forward, 5 backward,
GQA-aware) for them, and the matmul formula for ``lcm_fast::skinny_linear`` (the fast engine's
projections).
"""

from __future__ import annotations

import torch
from torch.utils import flop_counter

from .. import _ext

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


def count_flops(fn, *args, **kwargs) -> tuple[int, object]:
    """(FLOPs counted while running ``fn(*args, **kwargs)``, its result)."""
    with flop_counter.FlopCounterMode(display=False) as counter:
        result = fn(*args, **kwargs)
    return counter.get_total_flops(), result
