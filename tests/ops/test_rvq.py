"""rvq_encode / rvq_decode: kernels vs the PyTorch reference and vs faiss, opcheck, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lcm_fast.ops import rvq_decode, rvq_decode_ref, rvq_encode, rvq_encode_ref
from lcm_fast.ops.rvq import (ENCODE_SPEC, RVQ_CANDIDATES, RVQ_SEARCH_MIN_SCORES, native_bf16, search_codebooks,
                              sq_norms)
from lcm_fast import _ext
from lcm_fast.quant import ResidualQuantizer

from ..tolerances import RVQ_TIE_GAP

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and ENCODE_SPEC.has_kernel("cuda") else [])


def clustered(n: int, d: int, seed: int = 0, clusters: int = 32) -> torch.Tensor:
    """Vectors around `clusters` centres with a decaying spectrum (RVQ-friendly, like embeddings)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, d, generator=g)
    scale = torch.arange(1, d + 1).float() ** -0.5
    x = centres[torch.randint(clusters, (n,), generator=g)] + 0.6 * torch.randn(n, d, generator=g)
    return (x * scale).contiguous()


def assert_codes_match(codes: torch.Tensor, expected: torch.Tensor, x: torch.Tensor, codebooks: torch.Tensor,
                       min_rate: float = 1.0) -> None:
    """Codes equal, except near-ties: at a vector's first differing step both candidates must be
    equally near (in float64) to the common residual, within RVQ_TIE_GAP of |r|^2."""
    codes, expected = codes.long().cpu(), expected.long().cpu()
    same = (codes == expected).all(1)
    assert same.numel() == 0 or same.float().mean() >= min_rate, f"only {same.float().mean():.4%} of vectors match"
    cb = codebooks.double().cpu()
    for n in torch.nonzero(~same).flatten().tolist():
        j = int(torch.nonzero(codes[n] != expected[n])[0])
        r = x[n].double().cpu() - sum((cb[i, codes[n, i]] for i in range(j)), torch.zeros_like(cb[0, 0]))
        da, db = ((r - cb[j, codes[n, j]]) ** 2).sum(), ((r - cb[j, expected[n, j]]) ** 2).sum()
        gap = float((da - db).abs() / (r * r).sum().clamp_min(1e-30))
        assert gap < RVQ_TIE_GAP, f"vector {n} step {j}: codes {codes[n, j]} vs {expected[n, j]} are not a tie ({gap:.2e})"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,m,k,d", [(1, 1, 1, 1), (5, 2, 3, 7), (67, 3, 100, 33), (130, 4, 700, 385),
                                     (64, 2, 256, 1024), (3, 2, 513, 1025), (200, 1, 2048, 8),
                                     # CPU from 256 rows: BLAS blocks of distances, over rows and centroids
                                     (300, 2, 1500, 65), (2700, 2, 100, 5)])
def test_kernel_matches_reference(device, n, m, k, d):
    x = clustered(n, d, seed=n + d).to(device)
    cb = (0.5 * torch.randn(m, k, d, generator=torch.Generator().manual_seed(k))).to(device)
    codes = rvq_encode(x, cb, backend="ext")
    assert codes.dtype == torch.int32 and codes.shape == (n, m)
    assert_codes_match(codes, rvq_encode_ref(x.double(), cb.double(), sq_norms(cb.double())), x, cb)
    for prefix in {1, m}:
        for dtype in (torch.int16, torch.int32, torch.int64):
            c = codes.to(dtype)
            assert torch.equal(rvq_decode(c, cb, prefix, backend="ext"), rvq_decode_ref(c, cb, prefix))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 70), m=st.integers(1, 4), k=st.integers(1, 600), d=st.integers(1, 70), seed=st.integers(0, 99))
def test_kernel_matches_reference_property(n, m, k, d, seed):
    g = torch.Generator().manual_seed(seed)
    x, cb = torch.randn(n, d, generator=g), torch.randn(m, k, d, generator=g)
    codes = rvq_encode(x, cb, backend="ext")
    # min_rate 0: every differing vector must be a near-tie (at d = 1 and k = 600, 1 in 20 of them can be)
    assert_codes_match(codes, rvq_encode_ref(x.double(), cb.double(), sq_norms(cb.double())), x, cb, min_rate=0.0)
    assert torch.equal(rvq_decode(codes, cb, backend="ext"), rvq_decode_ref(codes, cb))


@pytest.mark.parametrize("rows", [4, 300])
def test_ties_go_to_the_lowest_index_across_splits_and_blocks(rows):
    """A centroid duplicated far away in the codebook: in another thread's split of K (a few vectors) or in
    another BLAS block of distances (many vectors), the lower index still wins."""
    torch.manual_seed(0)
    cb = torch.randn(3, 4096, 64)
    cb[0, 3000] = cb[0, 100]
    x = torch.cat([cb[0, 100:101] + 1e-3 * torch.randn(1, 64), torch.randn(rows - 1, 64)])
    codes = rvq_encode(x, cb, backend="ext")
    assert torch.equal(codes, rvq_encode_ref(x, cb, sq_norms(cb)))
    assert codes[0, 0] == 100


def _search_rows(k: int) -> int:
    """Rows from which the kernel takes the candidate search for K = k."""
    return -(-RVQ_SEARCH_MIN_SCORES // k)


# the candidate search: codes of the fp32 search except near-ties, on every path of the kernel (n = None:
# just enough rows to take it)
@pytest.mark.parametrize("n,m,k,d", [(None, 1, 1, 1), (None, 2, 3, 7), (None, 2, RVQ_CANDIDATES, 16),
                                     (None, 3, RVQ_CANDIDATES + 1, 33), (None, 4, 700, 385), (64, 2, 256, 1024),
                                     (1100, 2, 2000, 24),   # two blocks of rows
                                     (3, 2, 8300, 40),      # two blocks of centroids
                                     # centroids closer than bf16 resolves: most rows lack the certificate
                                     # and are searched again, from the kept scores or (two blocks) in full
                                     (None, 2, 300, 1), (40, 2, 8300, 1), (None, 3, 64, 2)])
def test_candidate_search_matches_reference(n, m, k, d):
    n = n or _search_rows(k)
    x = clustered(n, d, seed=n + d)
    cb = 0.5 * torch.randn(m, k, d, generator=torch.Generator().manual_seed(k))
    codes = rvq_encode(x, cb, search_codebooks=search_codebooks(cb, "bf16"), backend="ext")
    assert codes.dtype == torch.int32 and codes.shape == (n, m)
    # d = 1 with 8300 centroids has fp32 near-ties (the fp32 search matches float64 on 90 % of vectors)
    assert_codes_match(codes, rvq_encode_ref(x.double(), cb.double(), sq_norms(cb.double())), x, cb,
                       min_rate=0.9 if d == 1 else 1.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_candidate_search_input_dtypes(dtype):
    """Any float input is encoded as its fp32 value, by either search."""
    cb = 0.5 * torch.randn(3, 300, 48, generator=torch.Generator().manual_seed(3))
    x = clustered(_search_rows(300), 48, seed=5).to(dtype)
    codes = rvq_encode(x, cb, search_codebooks=search_codebooks(cb, "bf16"), backend="ext")
    assert_codes_match(codes, rvq_encode(x.float(), cb, backend="ext"), x.float(), cb)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 70), m=st.integers(1, 4), k=st.integers(1, 600), d=st.integers(1, 70), seed=st.integers(0, 99))
def test_candidate_search_matches_reference_property(n, m, k, d, seed):
    """Thousands of rows at d = 1 or 2 meet fp32 near-ties (the fp32 search has them too): every mismatch
    must be one."""
    g = torch.Generator().manual_seed(seed)
    n += _search_rows(k)
    x, cb = torch.randn(n, d, generator=g), torch.randn(m, k, d, generator=g)
    codes = rvq_encode(x, cb, search_codebooks=search_codebooks(cb, "bf16"), backend="ext")
    assert_codes_match(codes, rvq_encode_ref(x.double(), cb.double(), sq_norms(cb.double())), x, cb,
                       min_rate=0.9 if d <= 2 else 1.0)


def test_candidate_search_ties_and_nan_rows():
    """Duplicates of the nearest centroid, more of them than the shortlist holds and one in another block of
    centroids: the lowest index wins, as in the fp32 search; a NaN row gets index 0 on every path."""
    torch.manual_seed(0)
    cb = torch.randn(2, 8300, 64)
    cb[0, 8250] = cb[0, 100]
    cb[0, 2000:2000 + 2 * RVQ_CANDIDATES] = cb[0, 100]
    x = torch.cat([cb[0, 100:101] + 1e-3 * torch.randn(1, 64), torch.randn(4, 64), torch.full((1, 64), float("nan"))])
    codes = rvq_encode(x, cb, search_codebooks=search_codebooks(cb, "bf16"), backend="ext")
    assert len(x) >= _search_rows(8300)
    assert torch.equal(codes[:5], rvq_encode_ref(x[:5], cb, sq_norms(cb)))
    assert codes[0, 0] == 100 and codes[5].tolist() == [0, 0] == rvq_encode(x[5:], cb, backend="ext")[0].tolist()


def test_candidate_search_errors_and_modes():
    x, cb = torch.randn(4, 8), torch.randn(2, 16, 8)
    with pytest.raises(RuntimeError, match="search_codebooks must be the codebooks in contiguous bfloat16"):
        torch.ops.lcm_fast.rvq_encode(x, cb, sq_norms(cb), cb)
    with pytest.raises(RuntimeError, match="search_codebooks must be"):
        torch.ops.lcm_fast.rvq_encode(x, cb, sq_norms(cb), cb[:1].bfloat16())
    with pytest.raises(ValueError, match="greedy"):
        rvq_encode(x, cb, beam=2, search_codebooks=cb.bfloat16())
    with pytest.raises(ValueError, match="unknown RVQ search 'fast'"):
        search_codebooks(cb, "fast")
    assert search_codebooks(cb, "exact") is None
    assert search_codebooks(cb, "bf16").dtype == torch.bfloat16
    assert (search_codebooks(cb, "auto") is None) == (not native_bf16("cpu"))
    assert native_bf16("cuda") == (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0))


def _score_rows(r: torch.Tensor, cb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows r [n, d] of residuals with decaying spectra, some one-hot-heavy, over many magnitudes (the worst
    cases of bf16 rounding and of aligned accumulation), and the exact scores |C|^2 - 2 r.C in float64."""
    sq = sq_norms(cb)
    return r, sq, sq.double() - 2 * r.double() @ cb.double().T


def _residuals(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n, d, generator=g) * torch.logspace(-3, 3, n)[:, None] * torch.arange(1, d + 1) ** -0.5
    r[::3, 0] *= 1e3  # one component dominates: the aligned terms after it lose the most
    return r


def _tensor_core_dots(a: torch.Tensor, b: torch.Tensor, block: int) -> torch.Tensor:
    """a [n, d] @ b [K, d]^T of bf16 values, as tensor cores sum (Fasi et al. 2021): exact products, blocks of
    ``block`` products plus the accumulator aligned to their largest exponent and truncated to fp32's 24 bits
    there, the sum truncated to fp32. Float64 holds every step exactly."""
    prods = a.double()[:, None, :] * b.double()[None, :, :]
    acc = torch.zeros(prods.shape[:2], dtype=torch.float64)

    def truncate(t, top):  # toward zero, to multiples of the fp32 ulp at `top`'s binade
        ulp = torch.ldexp(torch.ones_like(top), torch.frexp(top)[1] - 24)
        return torch.trunc(t / ulp) * ulp

    for i in range(0, a.shape[1], block):
        terms = torch.cat([acc[..., None], prods[..., i:i + block]], -1)
        acc = truncate(terms, terms.abs().amax(-1, keepdim=True)).sum(-1)
        acc = truncate(acc, acc.abs())
    return acc.float()


@pytest.mark.skipif(not _ext.EXT_AVAILABLE, reason="the bound is compiled code (csrc/rvq/certify.h)")
@pytest.mark.parametrize("d", [1, 7, 64, 1024])
@pytest.mark.parametrize("arithmetic", ["cpu_bf16_out", "tensor_core_block1", "tensor_core_block16"])
def test_shortlist_bound_holds(d, arithmetic):
    """The certificate's premise, for either backend's arithmetic: every approximate score is within the row's
    bound of its exact score. CPU: oneDNN's bf16 GEMM (fp32 accumulation, bf16 output). CUDA: the tensor-core
    accumulation, simulated (the bound assumes the worst block size: 1). Also: the bound is not vacuous."""
    cb = 0.5 * torch.randn(64, d, generator=torch.Generator().manual_seed(d))
    r, sq, exact = _score_rows(_residuals(48, d, seed=d), cb)
    if arithmetic == "cpu_bf16_out":
        dots = torch.mm(r.bfloat16(), cb.bfloat16().T).float()
    else:
        dots = _tensor_core_dots(r.bfloat16(), cb.bfloat16(), int(arithmetic.removeprefix("tensor_core_block")))
    approx = torch.addcmul(sq, dots, torch.full_like(dots, -2.0))  # fl(|C|^2 - 2 dot): one rounding, like fma
    err = (approx.double() - exact).abs().amax(1)
    r_err = (r - r.bfloat16().float()).norm(dim=1)
    c_max = float(sq.amax().sqrt()) * (1 + 2**-20)
    bound = torch.tensor([_ext._C.rvq_shortlist_bound(float(dots[i].abs().amax()), float(r[i].norm()), float(r_err[i]),
                                                      c_max, d, arithmetic != "cpu_bf16_out") for i in range(len(r))])
    assert (err <= bound).all(), (err / bound).max()
    assert (bound <= 1e-2 * (r.norm(dim=1) * c_max + c_max**2 + 1e-30) * max(d, 64) ** 0.5).all()  # not vacuous


def test_shortlist_bound_of_non_finite_rows_is_not_finite():
    """A NaN or overflowing row gets no certificate: it is searched in full, as the fp32 search would."""
    bound = _ext._C.rvq_shortlist_bound if _ext.EXT_AVAILABLE else pytest.skip("compiled code")
    for tc in (False, True):
        assert np.isnan(bound(float("nan"), 1.0, 0.0, 1.0, 16, tc))
        assert not np.isfinite(bound(float("inf"), float("inf"), 0.0, 1.0, 16, tc))
        assert not np.isfinite(bound(1.0, 1.0, 0.0, 1.0, 1 << 24, tc))  # d past what the accumulation bound covers


def _faiss_codes(faiss, rq, x: torch.Tensor, m: int, nbits: int) -> torch.Tensor:
    """Codes [N, m] int64 of x by ``faiss.ResidualQuantizer`` rq."""
    return torch.from_numpy(faiss.unpack_bitstrings(rq.compute_codes(x.numpy()), m, nbits).astype(np.int64))


@pytest.mark.parametrize("d,m,nbits", [(64, 4, 6), (128, 8, 8), (33, 3, 5)])
def test_codes_match_faiss_compute_codes(faiss, d, m, nbits):
    """faiss-trained codebooks (plain k-means per step, fast): our codes match faiss's on >= 99.9 %
    of held-out vectors and every mismatch is a float64 near-tie; decode matches faiss bit for bit."""
    K = 1 << nbits
    train, test = clustered(40 * K, d, seed=1), clustered(4000, d, seed=2)
    frq = faiss.ResidualQuantizer(d, m, nbits)
    frq.train_type = faiss.ResidualQuantizer.Train_default | faiss.ResidualQuantizer.Skip_codebook_tables
    frq.max_beam_size = 1
    frq.train(train.numpy())
    rq = ResidualQuantizer.from_faiss(frq)
    theirs = _faiss_codes(faiss, frq, test, m, nbits)
    for search in ("exact", "bf16"):
        ours = rq.encode(test, search=search, backend="ext")
        assert_codes_match(ours, theirs, test, rq.codebooks, min_rate=0.999)
    packed = faiss.pack_bitstrings(ours.numpy(), nbits)
    np.testing.assert_array_equal(rq.decode(ours, backend="ext").numpy(), frq.decode(packed))


def test_beam_search_matches_faiss(faiss):
    """The reference beam search is faiss's: identical codes at beam 4 (greedy kernel not involved)."""
    d, m, nbits = 32, 4, 5
    train, test = clustered(2000, d, seed=3), clustered(500, d, seed=4)
    frq = faiss.ResidualQuantizer(d, m, nbits)
    frq.train_type = faiss.ResidualQuantizer.Train_default | faiss.ResidualQuantizer.Skip_codebook_tables
    frq.max_beam_size = 4
    frq.train(train.numpy())
    rq = ResidualQuantizer.from_faiss(frq)
    beam = rq.encode(test, beam=4)
    assert_codes_match(beam, _faiss_codes(faiss, frq, test, m, nbits), test, rq.codebooks, min_rate=0.99)
    err = lambda c: float(((test - rq.decode(c)) ** 2).sum())
    assert err(beam) <= err(rq.encode(test)) * (1 + 1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    g = torch.Generator().manual_seed(0)
    for n, m, k, d in [(7, 2, 9, 5), (64, 3, 300, 129)]:
        x, cb = torch.randn(n, d, generator=g).to(device), torch.randn(m, k, d, generator=g).to(device)
        torch.library.opcheck(torch.ops.lcm_fast.rvq_encode.default, (x, cb, sq_norms(cb)))
        torch.library.opcheck(torch.ops.lcm_fast.rvq_encode.default, (x, cb, sq_norms(cb), cb.bfloat16()))
        codes = rvq_encode(x, cb)
        torch.library.opcheck(torch.ops.lcm_fast.rvq_decode.default, (codes, cb, m))


def test_compiles_without_graph_breaks():
    x, cb = torch.randn(9, 16), torch.randn(2, 40, 16)
    fn = torch.compile(lambda x: rvq_decode(rvq_encode(x, cb), cb, 1), fullgraph=True)
    assert torch.equal(fn(x), rvq_decode(rvq_encode(x, cb), cb, 1))
    x, scb = torch.randn(_search_rows(40), 16), cb.bfloat16()
    fn = torch.compile(lambda x: rvq_encode(x, cb, search_codebooks=scb), fullgraph=True)
    assert torch.equal(fn(x), rvq_encode(x, cb, search_codebooks=scb))


def test_beam_falls_back_to_reference():
    x, cb = torch.randn(4, 8), torch.randn(2, 16, 8)
    with pytest.raises(RuntimeError, match="beam=2"):
        rvq_encode(x, cb, beam=2, backend="ext")
    assert rvq_encode(x, cb, beam=2).shape == (4, 2)


def test_op_errors():
    x, cb = torch.randn(4, 8), torch.randn(2, 16, 8)
    with pytest.raises(RuntimeError, match="d=9 but the codebooks have d=8"):
        torch.ops.lcm_fast.rvq_encode(torch.randn(4, 9), cb, sq_norms(cb))
    with pytest.raises(RuntimeError, match="codebook_sq_norms must be"):
        torch.ops.lcm_fast.rvq_encode(x, cb, sq_norms(cb)[:1])
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.lcm_fast.rvq_encode(x, cb.double(), sq_norms(cb))
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.lcm_fast.rvq_decode(torch.full((2, 2), 16, dtype=torch.int32), cb, 2)
    with pytest.raises(RuntimeError, match="k=3"):
        torch.ops.lcm_fast.rvq_decode(torch.zeros(2, 2, dtype=torch.int32), cb, 3)
    with pytest.raises(RuntimeError, match="int16, int32 or int64"):
        torch.ops.lcm_fast.rvq_decode(torch.zeros(2, 2), cb, 1)
