"""``skinny_linear``: ``y = x W^T + b`` for the few rows of a decoding step.

Diffusion decoding multiplies one or two rows per document (conditional and unconditional CFG halves)
by every weight matrix of the denoiser at every step, so the cost is reading the weights once. The
CPU kernel streams W exactly once in order (``csrc/linear/skinny_linear_cpu.cpp``); the BLAS path of
``F.linear`` reaches a fraction of the memory bandwidth at these shapes (bench/RESULTS.md). fp32 inputs with
more than :data:`MAX_ROWS` rows are a real GEMM and the op hands them to BLAS. On CUDA the op forwards to
cuBLAS.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _ext
from ._dispatch import OpSpec, register

#: fp32 inputs with more rows are a real GEMM: the op hands them to BLAS (``kSkinnyMaxRows`` in
#: ``csrc/linear/skinny_linear_cpu.h``), which catches up from 64-128 rows; bf16/fp16 stay in the kernel at any
#: size on CPUs without native half GEMMs (BLAS ran them at ~20 GFLOP/s, the kernel at 105-121; bench/RESULTS.md)
MAX_ROWS = 64


def skinny_linear_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Plain-PyTorch twin: ``F.linear``. x: [..., K]; weight: [N, K]; bias: [N] or None -> [..., N]."""
    return F.linear(x, weight, bias)


SPEC = register(OpSpec("skinny_linear"))

if _ext.EXT_AVAILABLE:
    _skinny_linear_op = torch.ops.lcm_fast.skinny_linear.default

    @torch.library.register_fake("lcm_fast::skinny_linear")
    def _skinny_linear_fake(x, weight, bias):
        torch._check(x.shape[1] == weight.shape[1])
        return x.new_empty((x.shape[0], weight.shape[0]))


def skinny_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, backend: Optional[str] = None) -> Tensor:
    """``F.linear`` for few rows: x [..., K] (fp32/bf16/fp16, the dtype of weight [N, K] and bias [N])
    -> [..., N], accumulated in fp32. Not differentiable (inference)."""
    if SPEC.choose(x.device.type, x.dtype, backend) == "ref":
        return skinny_linear_ref(x, weight, bias)
    # a decoding step makes ~100 of these calls, a few microseconds of weights each: the overload is called
    # directly (resolving it through the op packet costs microseconds per call) and 2-D x is not reshaped
    if x.dim() == 2:
        return _skinny_linear_op(x, weight, bias)
    rows = x.numel() // max(x.shape[-1], 1)
    return _skinny_linear_op(x.reshape(rows, x.shape[-1]), weight, bias).view(*x.shape[:-1], -1)
