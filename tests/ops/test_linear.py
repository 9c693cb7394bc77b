"""skinny_linear: the compiled kernel vs F.linear over shapes, dtypes and layouts; opcheck; errors."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lcm_fast.ops import skinny_linear, skinny_linear_multi, skinny_linear_multi_ref, skinny_linear_ref
from lcm_fast.ops.linear import MAX_ROWS, PACKED_FORMATS, PACKED_SCALE_BYTES, SPEC, in_features, quantize_weight, unpack

from ..tolerances import SKINNY_LINEAR_FP32

pytestmark = pytest.mark.skipif(not SPEC.has_kernel("cpu"), reason="lcm_fast._C not built")


def _inputs(M, K, N, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = torch.randn(N, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    return x, w, b


def _check(x, w, b):
    got = skinny_linear(x, w, b, backend="ext")
    assert got.dtype == x.dtype and got.shape == (*x.shape[:-1], w.shape[0])
    exact = skinny_linear_ref(x.double(), w.double(), None if b is None else b.double())
    if x.dtype == torch.float32:
        torch.testing.assert_close(got, skinny_linear_ref(x, w, b), **SKINNY_LINEAR_FP32)
    else:  # 2x rule against the same-dtype reference, one output ulp of slack
        ref_err = (skinny_linear_ref(x, w, b).double() - exact).abs().max()
        ulp = exact.abs().max() * (2**-8 if x.dtype == torch.bfloat16 else 2**-11)
        assert (got.double() - exact).abs().max() <= 2 * ref_err + ulp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
# 3-row register tiles and their 1- and 2-row tails; 24+ rows widen bf16/fp16 tiles first; 100+ fp32 rows take BLAS,
# bf16/fp16 ones the kernel (without native half GEMMs), 300 at K ~ 1024 in L2-sized row blocks
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 7, 16, 30, 64, 100, 300])
@pytest.mark.parametrize("K,N", [(1, 1), (7, 5), (256, 256), (1023, 9), (1025, 770)])
def test_matches_reference(M, K, N, dtype):
    _check(*_inputs(M, K, N, dtype, bias=(K + M) % 2 == 0))


@settings(max_examples=40, deadline=None)
@given(M=st.integers(1, MAX_ROWS // 2), K=st.integers(1, 300), N=st.integers(1, 70), bias=st.booleans(),
       lead=st.sampled_from([(), (1,), (2, 1)]))  # leading dims, e.g. [B, 1, K]
def test_hypothesis_shapes(M, K, N, bias, lead):
    rows = M * (lead[0] if lead else 1)
    x, w, b = _inputs(rows, K, N, torch.float32, bias)
    _check(x.reshape(*lead, M, K), w, b)


def test_strided_inputs():
    x, w, b = _inputs(4, 64, 48, torch.float32)
    _check(x[::2], w.T.contiguous().T, b)  # every other row; a column-major weight
    _check(torch.randn(3, 128)[:, ::2], w, b)


def test_many_fp32_rows_take_the_gemm():
    x, w, b = _inputs(MAX_ROWS + 1, 32, 8, torch.float32)
    torch.testing.assert_close(skinny_linear(x, w, b), skinny_linear_ref(x, w, b), rtol=0, atol=0)


def test_empty():
    x, w, b = _inputs(0, 16, 8, torch.float32)
    assert torch.ops.lcm_fast.skinny_linear(x, w, b).shape == (0, 8)


def test_opcheck():
    for M, dtype, bias in ((2, torch.float32, True), (1, torch.bfloat16, False), (MAX_ROWS + 1, torch.float32, True)):
        x, w, b = _inputs(M, 40, 24, dtype, bias)
        torch.library.opcheck(torch.ops.lcm_fast.skinny_linear, (x, w, b))


def test_compile_traces_the_op():
    x, w, b = _inputs(2, 64, 32, torch.float32)
    fn = torch.compile(lambda x: skinny_linear(x, w, b), backend="eager", fullgraph=True)
    torch.testing.assert_close(fn(x), skinny_linear_ref(x, w, b), **SKINNY_LINEAR_FP32)


@pytest.mark.parametrize("args,match", [
    ((torch.randn(2, 8), torch.randn(4, 9), None), "K=8 but weight has K=9"),
    ((torch.randn(2, 8), torch.randn(4, 8).half(), None), "x is Float but weight is Half"),
    ((torch.randn(2, 8), torch.randn(4, 8), torch.randn(5)), r"bias must be \[N=4\]"),
    ((torch.randn(2, 8).double(), torch.randn(4, 8).double(), None), "dtype must be"),
])
def test_bad_input(args, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.lcm_fast.skinny_linear(*args)


def _multi_inputs(M, K, Ns, dtype, seed=0):
    x, _, _ = _inputs(M, K, 1, dtype, seed=seed)
    ws = [_inputs(1, K, N, dtype, bias=i % 2 == 0, seed=seed + 1 + i)[1:] for i, N in enumerate(Ns)]
    return x, [w for w, _ in ws], [b for _, b in ws]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 2, 5, 30, MAX_ROWS + 36])  # past MAX_ROWS fp32 takes BLAS, column by column
@pytest.mark.parametrize("K,Ns,glu", [(7, (5,), False), (256, (256, 64, 64), False), (1023, (9, 9), True),
                                      (64, (200, 200), True)])
def test_multi_matches_reference(M, K, Ns, glu, dtype):
    x, ws, bs = _multi_inputs(M, K, Ns, dtype)
    got = skinny_linear_multi(x, ws, bs, glu, backend="ext")
    ref = skinny_linear_multi_ref(x, ws, bs, glu)
    assert got.dtype == dtype and got.shape == ref.shape
    exact = skinny_linear_multi_ref(x.double(), [w.double() for w in ws],
                                    [None if b is None else b.double() for b in bs], glu)
    # 2x rule against the same-dtype reference, one output ulp of slack (the SwiGLU product of two sums of 1k terms
    # doubles their relative error, past an fp32 tolerance made for one)
    ulp = exact.abs().max() * {torch.float32: 2**-23, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    assert (got.double() - exact).abs().max() <= 2 * (ref.double() - exact).abs().max() + ulp


def test_multi_leading_dims_and_empty():
    x, ws, bs = _multi_inputs(6, 32, (16, 16), torch.float32)
    torch.testing.assert_close(skinny_linear_multi(x.view(2, 3, 32), ws, bs, True),
                               skinny_linear_multi_ref(x, ws, bs, True).view(2, 3, 16), **SKINNY_LINEAR_FP32)
    assert skinny_linear_multi(x[:0], ws, bs, True, backend="ext").shape == (0, 16)
    assert skinny_linear_multi(x[:0], ws, bs, backend="ext").shape == (0, 32)


def test_multi_opcheck():
    for M, dtype, glu in ((2, torch.float32, True), (1, torch.bfloat16, False), (MAX_ROWS + 1, torch.float32, True)):
        x, ws, bs = _multi_inputs(M, 40, (24, 24), dtype)
        torch.library.opcheck(torch.ops.lcm_fast.skinny_linear_multi, (x, ws, bs, glu))


@pytest.mark.parametrize("weights,biases,glu,match", [
    ([torch.randn(4, 8)], [None, None], False, "one bias entry"),
    ([torch.randn(4, 8), torch.randn(5, 8)], [None, None], True, "glu takes two weights with the same N"),
    ([torch.randn(4, 8), torch.randn(4, 9)], [None, None], False, "K=8 but weight has K=9"),
])
def test_multi_bad_input(weights, biases, glu, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.lcm_fast.skinny_linear_multi(torch.randn(2, 8), weights, biases, glu)


# -- weight-only int8 / fp8: packed weights [N, K + 4] (K one-byte values, then the row's fp32 scale) --

FORMATS = list(PACKED_FORMATS)
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _packed_check(x, packed, b):
    """Kernel vs the reference twin: both compute scale * (x . q) in fp32 then add the bias; fp32 rounding apart
    (summation order), the 2x rule with one output ulp of slack for half outputs."""
    got = skinny_linear(x, packed, b, backend="ext")
    ref = skinny_linear_ref(x, packed, b)
    assert got.dtype == x.dtype and got.shape == ref.shape
    q, scale = unpack(packed)
    exact = (x.double() @ q.double().T) * scale.double() + (0 if b is None else b.double())
    ulp = exact.abs().max() * {torch.float32: 2**-23, torch.bfloat16: 2**-8, torch.float16: 2**-11}[x.dtype]
    assert (got.double() - exact).abs().max() <= 2 * (ref.double() - exact).abs().max() + ulp + 1e-5


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
# the 2-row register blocks and their tail; 24+ rows widen each tile to fp32 once; 300 rows in L2-sized blocks
@pytest.mark.parametrize("M", [1, 2, 3, 5, 30, 100, 300])
@pytest.mark.parametrize("K,N", [(1, 1), (7, 5), (256, 256), (1023, 9), (1025, 770)])
def test_packed_matches_reference(M, K, N, dtype, fmt):
    x, w, b = _inputs(M, K, N, dtype, bias=(K + M) % 2 == 0)
    _packed_check(x, quantize_weight(w, fmt), b)


@settings(max_examples=40, deadline=None)
@given(M=st.integers(1, 40), K=st.integers(1, 300), N=st.integers(1, 70), bias=st.booleans(),
       fmt=st.sampled_from(FORMATS), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       spread=st.floats(0, 7))  # a row's weights over 10^spread: past ~4.5 its small ones are e4m3 subnormals
def test_hypothesis_packed(M, K, N, bias, fmt, dtype, spread):
    x, w, b = _inputs(M, K, N, dtype, bias)
    _packed_check(x, quantize_weight(w.float() * torch.logspace(-spread, 0, K), fmt), b)


def test_fp8_widening_is_exact():
    """Every one of e4m3's 254 finite values (subnormals, the largest 448, both zeros) as a weight: the widening
    (fp16 bits, F16C, times 2^8 in registers for 1-2 rows; the tile widened once for many) gives the value itself,
    so one-hot rows of x return the weights exactly, at every position of a vector load and in the tail."""
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    finite = values[~values.float().isnan()]
    for K in (256, 255):  # two rows of weights, K % 8 == 0 and a tail
        q = torch.zeros(2 * K, dtype=torch.float8_e4m3fn)
        q[: finite.numel()] = finite
        packed = torch.cat((q.view(torch.uint8), torch.ones(2).view(torch.uint8))).view(2, K + 4)
        packed = packed.view(torch.float8_e4m3fn)
        one_hot = torch.eye(K)
        by_row = torch.cat([skinny_linear(one_hot[k: k + 1], packed, backend="ext") for k in range(K)])
        for got in (by_row, skinny_linear(one_hot, packed, backend="ext")):
            assert torch.equal(got.T, unpack(packed)[0].float())


@pytest.mark.parametrize("fmt", FORMATS)
def test_avx2_and_avx512_tiles_agree(fmt):
    """The AVX-512 tiles (chosen at run time where the CPU has them) and the AVX2 ones (LCM_FAST_NO_AVX512=1, what
    other CPUs run), in a second process: the same outputs up to fp32 summation order for 1-3 rows, and the same
    weights exactly through one-hot rows (main loop and tail; test_fp8_widening_is_exact checks them in this one)."""
    script = ("import sys, torch; from lcm_fast.ops.linear import quantize_weight, skinny_linear; "
              "g = torch.Generator().manual_seed(0); "
              "w = quantize_weight(torch.randn(37, 1029, generator=g), sys.argv[2]); "
              "x = torch.randn(3, 1029, generator=g); "
              "eye = torch.eye(1029)[list(range(20)) + list(range(1010, 1029))]; "
              "rows = [skinny_linear(x[:m], w, backend='ext') for m in (1, 2, 3)]; "
              "torch.save(rows + [torch.cat([skinny_linear(e[None], w, backend='ext') for e in eye])], sys.argv[1])")
    outs = []
    for flag in ("0", "1"):
        path = Path(tempfile.mkdtemp()) / "y.pt"
        env = {k: v for k, v in os.environ.items() if k != "LCM_FAST_NO_AVX512"}
        env |= {"LCM_FAST_NO_AVX512": "1"} if flag == "1" else {}
        subprocess.run([sys.executable, "-c", script, str(path), fmt], check=True, env=env, timeout=120)
        outs.append(torch.load(path))
    for a, b in zip(outs[0][:3], outs[1][:3], strict=True):
        torch.testing.assert_close(a, b, **SKINNY_LINEAR_FP32)
    assert torch.equal(outs[0][3], outs[1][3])


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantization(fmt):
    """Per output channel: scale = max|w| / qmax; int8: q in [-127, 127], every weight within scale / 2 of
    scale * q; fp8: e4m3's round to nearest, within 2^-4 relatively (2^-10 scale absolutely, its subnormals); the
    row's largest weight exact. An all-zero row has scale 0 (its outputs are the bias); bad weights are errors."""
    w = torch.randn(40, 33) * torch.logspace(-3, 3, 40)[:, None]
    w[7] = 0
    packed = quantize_weight(w, fmt)
    dtype, qmax = PACKED_FORMATS[fmt]
    assert packed.dtype == dtype and packed.shape == (40, 33 + PACKED_SCALE_BYTES) and in_features(packed) == 33
    q, scale = unpack(packed)
    torch.testing.assert_close(scale, w.abs().amax(1) / qmax)
    err = (q.float() * scale[:, None] - w).abs()
    bound = scale[:, None] / 2 if fmt == "int8" else torch.maximum(w.abs() * 2**-4, scale[:, None] * 2**-10)
    assert q.float().abs().max() <= qmax and err.le(bound * (1 + 1e-6)).all()
    assert torch.equal(q.float().abs().amax(1)[scale > 0], torch.full((39,), qmax))
    assert scale[7] == 0 and not q[7].float().any()
    assert torch.equal(skinny_linear(torch.randn(2, 33), packed, torch.ones(40), backend="ext")[:, 7], torch.ones(2))
    assert torch.equal(quantize_weight(w.bfloat16(), fmt).view(torch.uint8),
                       quantize_weight(w.bfloat16().float(), fmt).view(torch.uint8))
    for bad, match in ((torch.randn(3), "floating-point \\[N, K\\]"), (torch.ones(2, 2, dtype=torch.int32), "floating"),
                       (torch.tensor([[1.0, float("nan")]]), "NaN or inf")):
        with pytest.raises(ValueError, match=match):
            quantize_weight(bad, fmt)
    with pytest.raises(ValueError, match="unknown format 'int4'"):
        quantize_weight(w, "int4")


@pytest.mark.parametrize("fmt", FORMATS)
def test_packed_multi_glu_opcheck_and_errors(fmt):
    x, ws, bs = _multi_inputs(3, 64, (48, 48), torch.float32)
    packed = [quantize_weight(w, fmt) for w in ws]
    for glu in (False, True):
        got = skinny_linear_multi(x, packed, bs, glu, backend="ext")
        torch.testing.assert_close(got, skinny_linear_multi_ref(x, packed, bs, glu), **SKINNY_LINEAR_FP32)
    mixed = [packed[0], ws[1]]  # a packed weight beside one in the model dtype
    torch.testing.assert_close(skinny_linear_multi(x, mixed, bs, backend="ext"),
                               skinny_linear_multi_ref(x, mixed, bs), **SKINNY_LINEAR_FP32)
    # the schema check compares inputs by arithmetic that torch lacks for float8 (the int8 run checks the schema)
    tests = [t for t in OPCHECK_UTILS if fmt == "int8" or t != "test_schema"]
    torch.library.opcheck(torch.ops.lcm_fast.skinny_linear, (x, packed[0], bs[0]), test_utils=tests)
    torch.library.opcheck(torch.ops.lcm_fast.skinny_linear_multi, (x.bfloat16(), packed, [None, None], True),
                          test_utils=tests)
    with pytest.raises(RuntimeError, match="K=64 but weight has K=63 \\(packed"):
        torch.ops.lcm_fast.skinny_linear(x, packed[0][:, 1:].contiguous(), None)
