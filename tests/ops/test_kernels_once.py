"""Every compiled kernel once, against its reference, on small odd shapes: the short selection that
``scripts/gpu_check.py`` runs under ``compute-sanitizer`` (memcheck, racecheck) on a GPU. The accuracy grids are in
each op's own test file; this one is about launching every kernel (each template path that shapes select: packed
and scalar loads, both AdaLN variants and the backward, CFG and plain DDIM, both code widths of the RVQ decode)."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from lcm_fast.ops import (OPS, adaln_gated_residual_norm_modulate, adaln_gated_residual_norm_modulate_ref,
                          adaln_norm_modulate, adaln_norm_modulate_ref, guided_ddim_step_, guided_ddim_step_ref,
                          rvq_decode, rvq_decode_ref, rvq_encode, rvq_encode_ref, sampler_params, skinny_linear,
                          skinny_linear_multi, skinny_linear_multi_ref)

from lcm_fast.ops.linear import PACKED_FORMATS, quantize_weight, skinny_linear_ref
from lcm_fast.ops.rvq import RVQ_SEARCH_MIN_SCORES, search_codebooks, sq_norms

from ..tolerances import ADALN_FP32, GUIDED_DDIM_FP32, SKINNY_LINEAR_FP32

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and all(
    "cuda" in spec.kernels for spec in OPS.values() if "cuda" in spec.devices) else [])
DIMS = (1023, 1024)  # scalar and 128-bit paths


def _randn(*shape: int, device: str) -> torch.Tensor:
    return torch.randn(*shape, generator=_randn.generator).to(device)


_randn.generator = torch.Generator().manual_seed(0)


def _adaln(device: str) -> None:
    tol = dict(atol=ADALN_FP32, rtol=ADALN_FP32)
    for D in DIMS:
        x, shift, scale = (_randn(3, D, device=device) for _ in range(3))
        w, b = _randn(D, device=device), _randn(D, device=device)
        for rms in (False, True):
            xg = x.clone().requires_grad_()
            y = adaln_norm_modulate(xg, shift, scale, w, b, rms=rms, backend="ext")
            torch.testing.assert_close(y, adaln_norm_modulate_ref(x, shift, scale, w, b, rms, 1e-5), **tol)
            (grad,) = torch.autograd.grad(y.square().sum(), xg)  # the fused backward kernel
            xr = x.clone().requires_grad_()
            (want,) = torch.autograd.grad(adaln_norm_modulate_ref(xr, shift, scale, w, b, rms, 1e-5).square().sum(), xr)
            torch.testing.assert_close(grad, want, atol=1e-3, rtol=1e-4)


def _gated(device: str) -> None:
    for D in DIMS:
        args = [_randn(3, D, device=device) for _ in range(5)]
        for rms in (False, True):
            got = adaln_gated_residual_norm_modulate(*args, rms=rms, backend="ext")
            want = adaln_gated_residual_norm_modulate_ref(*args, None, None, rms, 1e-5)
            torch.testing.assert_close(got, want, atol=ADALN_FP32, rtol=ADALN_FP32)


def _linear(device: str) -> None:
    x, w, b = _randn(3, 1027, device=device), _randn(65, 1027, device=device), _randn(65, device=device)
    torch.testing.assert_close(skinny_linear(x, w, b, backend="ext"), F.linear(x, w, b), **SKINNY_LINEAR_FP32)
    u = _randn(65, 1027, device=device)
    for glu in (False, True):  # q/k/v side by side; SwiGLU's product
        torch.testing.assert_close(skinny_linear_multi(x, (w, u), (b, None), glu, backend="ext"),
                                   skinny_linear_multi_ref(x, (w, u), (b, None), glu), atol=1e-3, rtol=1e-4)
    for fmt in PACKED_FORMATS:
        for k in (1027, 1024):  # packed weights: the byte-wise and the 16-byte loads of the CUDA GEMV
            packed = quantize_weight(w[:, :k], fmt)
            torch.testing.assert_close(skinny_linear(x[:, :k].contiguous(), packed, b, backend="ext"),
                                       skinny_linear_ref(x[:, :k], packed, b), atol=1e-3, rtol=1e-4)


def _guided_ddim(device: str) -> None:
    params = sampler_params(3.0, 0.7, 1.00045, 100.0, device=device)
    coef = torch.tensor([0.8, 0.6, 0.9, 0.4, 0.1, 0.0], device=device)
    for D in DIMS:
        for rows in (3, 6):  # plain DDIM, CFG
            latents, noise, out = _randn(3, D, device=device), _randn(3, D, device=device), _randn(rows, D, device=device)
            got, want = (latents.clone(), torch.empty_like(latents)), (latents.clone(), torch.empty_like(latents))
            guided_ddim_step_(*got, out, coef, params, noise, 0, backend="ext")
            guided_ddim_step_ref(*want, out, coef, params, noise, 0)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, atol=GUIDED_DDIM_FP32, rtol=GUIDED_DDIM_FP32)


def _rvq(device: str) -> None:
    codebooks = _randn(3, 37, 65, device=device)
    x = _randn(50, 65, device=device)
    codes = rvq_encode(x, codebooks, backend="ext")
    assert torch.equal(codes.long(), rvq_encode_ref(x, codebooks, sq_norms(codebooks)).long())  # no near-ties here
    many = _randn(RVQ_SEARCH_MIN_SCORES // 37 + 1, 65, device=device)  # enough rows for the candidate search
    searched = rvq_encode(many, codebooks, search_codebooks=search_codebooks(codebooks, "bf16"), backend="ext")
    assert torch.equal(searched.long(), rvq_encode_ref(many, codebooks, sq_norms(codebooks)).long())
    for dtype in (torch.int32, torch.int64):
        got = rvq_decode(codes.to(dtype), codebooks, 2, backend="ext")
        torch.testing.assert_close(got, rvq_decode_ref(codes.to(dtype), codebooks, 2), atol=1e-6, rtol=1e-6)


#: op name -> a run of its kernel(s); what it launches covers every CUDA kernel of the extension
RUNS: dict[str, Callable[[str], None]] = {
    "adaln_norm_modulate": _adaln, "adaln_gated_residual_norm_modulate": _gated, "skinny_linear": _linear,
    "skinny_linear_multi": _linear, "guided_ddim_step_": _guided_ddim, "rvq_encode": _rvq, "rvq_decode": _rvq,
}


def test_every_cuda_op_has_a_run():
    """The sanitizer selection cannot silently miss an op: a new CUDA op needs an entry in RUNS."""
    assert set(RUNS) == {name for name, spec in OPS.items() if "cuda" in spec.devices}


@pytest.mark.parametrize("device", DEVICES)
def test_every_kernel_once(device):
    for run in dict.fromkeys(RUNS.values()):  # each run once
        run(device)
