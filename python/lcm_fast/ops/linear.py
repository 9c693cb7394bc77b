"""``skinny_linear``: ``y = x W^T + b`` for the few rows of a decoding step; ``skinny_linear_multi``: several
weights that share their input in one call (q, k and v; SwiGLU's gate and up with its product).

Diffusion decoding multiplies one or two rows per document (conditional and unconditional CFG halves)
by every weight matrix of the denoiser at every step, so the cost is reading the weights once. The
CPU kernel streams W exactly once in order (``csrc/linear/skinny_linear_cpu.cpp``); the BLAS path of
``F.linear`` reaches a fraction of the memory bandwidth at these shapes (bench/RESULTS.md). fp32 inputs with
more than :data:`MAX_ROWS` rows are a real GEMM and the op hands them to BLAS. On CUDA the op forwards to
cuBLAS.

Weight-only int8 or fp8: a weight may be packed (:func:`quantize_weight`: symmetric per output channel, a quarter of
fp32's bytes, half of bf16's), multiplied as ``scale * (x . q)`` with x in its own dtype and fp32 accumulation.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _ext
from ._dispatch import OpSpec, register

#: fp32 inputs with more rows are a real GEMM: the op hands them to BLAS (``kSkinnyMaxRows`` in
#: ``csrc/linear/skinny_linear_cpu.h``), which catches up from 64-128 rows; bf16/fp16 stay in the kernel at any
#: size on CPUs without native half GEMMs (BLAS ran them at ~20 GFLOP/s, the kernel at 105-121; bench/RESULTS.md)
#: and up to 4 rows on CPUs with them (``kSkinnyNativeHalfMaxRows``)
MAX_ROWS = 64


#: a packed weight is [N, K + PACKED_SCALE_BYTES] bytes: q [N, K] (row major), then the N fp32 row scales
#: (``csrc/linear/skinny_linear_checks.h``); one tensor, so every parameter list and op takes it as a weight. Its dtype
#: says the format of q: uint8 holds int8 values, float8_e4m3fn fp8 (e4m3) ones.
PACKED_SCALE_BYTES = 4

#: weight-only formats: the packed tensor's dtype and the largest |q| (the row's max |w| maps to it)
PACKED_FORMATS = {"int8": (torch.uint8, 127.0), "fp8": (torch.float8_e4m3fn, 448.0)}


def quantize_weight(weight: Tensor, fmt: str = "int8") -> Tensor:
    """Weight-only quantization of weight [N, K] (any float dtype), symmetric per output channel n:
    ``scale = max|w_n| / qmax`` and ``q = w_n / scale`` rounded to the format, packed as [N, K + 4]
    (:data:`PACKED_SCALE_BYTES`, dtype by :data:`PACKED_FORMATS`). ``"int8"``: q in [-127, 127], every weight within
    scale / 2; ``"fp8"``: e4m3 (3 mantissa bits), every weight within 2^-4 of itself relatively (2^-10 scale
    absolutely below e4m3's normal range). An all-zero row has scale 0."""
    if fmt not in PACKED_FORMATS:
        raise ValueError(f"quantize_weight: unknown format {fmt!r}; expected one of {list(PACKED_FORMATS)}")
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize_weight: expected a floating-point [N, K] weight, got {weight.dtype} "
                         f"{list(weight.shape)}")
    w = weight.detach().float()
    if not torch.isfinite(w).all():
        raise ValueError("quantize_weight: the weight holds NaN or inf")
    dtype, qmax = PACKED_FORMATS[fmt]
    N, K = w.shape
    scale = w.abs().amax(1) / qmax
    # the clamp: w / scale may round past qmax, which e4m3 would turn into NaN
    q = (w / torch.where(scale > 0, scale, 1.0)[:, None]).clamp(-qmax, qmax)
    q = torch.round(q).to(torch.int8) if fmt == "int8" else q.to(torch.float8_e4m3fn)
    packed = torch.cat((q.view(torch.uint8).flatten(), scale.view(torch.uint8)))
    return packed.view(N, K + PACKED_SCALE_BYTES).view(dtype)


def unpack(packed: Tensor) -> tuple[Tensor, Tensor]:
    """(q [N, K] int8 or float8_e4m3fn, scale [N] fp32) of a packed weight [N, K + 4]."""
    N, K = packed.shape[0], packed.shape[1] - PACKED_SCALE_BYTES
    flat = packed.contiguous().view(-1)
    q = flat[: N * K].view(N, K)
    # clone: the scales start at byte N K, which a float view needs divisible by 4
    scale = flat[N * K:].view(torch.uint8).clone().view(torch.float32)
    return (q.view(torch.int8) if packed.dtype == torch.uint8 else q), scale


def is_packed(weight: Tensor) -> bool:
    return weight.dtype in (torch.uint8, torch.float8_e4m3fn)


def in_features(weight: Tensor) -> int:
    """K of a weight [N, K], or of a packed one [N, K + 4]."""
    return weight.shape[1] - (PACKED_SCALE_BYTES if is_packed(weight) else 0)


def skinny_linear_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Plain-PyTorch twin: ``F.linear``. x: [..., K]; weight: [N, K] of x's dtype, or packed [N, K + 4]
    (``scale * (x . q)`` in fp32, then the bias, rounded to x's dtype once); bias: [N] or None -> [..., N]."""
    if not is_packed(weight):
        return F.linear(x, weight, bias)
    q, scale = unpack(weight)
    y = F.linear(x.float(), q.float()) * scale
    return (y if bias is None else y + bias.float()).to(x.dtype)


def skinny_linear_multi_ref(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]],
                            glu: bool = False) -> Tensor:
    """Plain-PyTorch twin. x [..., K]; weights [N_i, K]; biases [N_i] or None, one per weight -> [..., sum N_i],
    the outputs side by side; with ``glu`` (gate and up, one N) -> [..., N] ``silu(x Wg^T + bg) * (x Wu^T + bu)``."""
    ys = [skinny_linear_ref(x, w, b) for w, b in zip(weights, biases, strict=True)]
    return F.silu(ys[0]) * ys[1] if glu else torch.cat(ys, dim=-1)


SPEC = register(OpSpec("skinny_linear"))
MULTI_SPEC = register(OpSpec("skinny_linear_multi"))

if _ext.EXT_AVAILABLE:
    _skinny_linear_op = torch.ops.lcm_fast.skinny_linear.default

    @torch.library.register_fake("lcm_fast::skinny_linear")
    def _skinny_linear_fake(x, weight, bias):
        torch._check(x.shape[1] == in_features(weight))
        return x.new_empty((x.shape[0], weight.shape[0]))

    @torch.library.register_fake("lcm_fast::skinny_linear_multi")
    def _skinny_linear_multi_fake(x, weights, biases, glu):
        torch._check(len(weights) == len(biases) and all(x.shape[1] == in_features(w) for w in weights))
        return x.new_empty((x.shape[0], weights[0].shape[0] if glu else sum(w.shape[0] for w in weights)))


def skinny_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, backend: Optional[str] = None) -> Tensor:
    """``F.linear`` for few rows: x [..., K] (fp32/bf16/fp16, the dtype of weight [N, K] and bias [N]; or weight
    packed [N, K + 4], :func:`quantize_weight`) -> [..., N], accumulated in fp32. Not differentiable (inference)."""
    if SPEC.choose(x.device.type, x.dtype, backend) == "ref":
        return skinny_linear_ref(x, weight, bias)
    # a decoding step makes ~100 of these calls, a few microseconds of weights each: the overload is called
    # directly (resolving it through the op packet costs microseconds per call) and 2-D x is not reshaped
    if x.dim() == 2:
        return _skinny_linear_op(x, weight, bias)
    rows = x.numel() // max(x.shape[-1], 1)
    return _skinny_linear_op(x.reshape(rows, x.shape[-1]), weight, bias).view(*x.shape[:-1], -1)


def skinny_linear_multi(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]], glu: bool = False,
                        *, backend: Optional[str] = None) -> Tensor:
    """x [..., K] through every weight in one call (one pass over each, no fused copy of the weights): shapes as
    :func:`skinny_linear_multi_ref`. A decoding step's q/k/v, or SwiGLU's inner rows with ``glu``, as one op
    instead of three or four. Not differentiable (inference)."""
    if MULTI_SPEC.choose(x.device.type, x.dtype, backend) == "ref":
        return skinny_linear_multi_ref(x, weights, biases, glu)
    rows = x.numel() // max(x.shape[-1], 1)
    out = torch.ops.lcm_fast.skinny_linear_multi.default(x.reshape(rows, x.shape[-1]), list(weights), list(biases), glu)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], -1)
