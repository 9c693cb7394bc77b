"""RVQ encode/decode: lcm_fast's fused kernels vs faiss ``ResidualQuantizer`` on the same codebooks; on a GPU,
encode, decode and codebook training (no faiss there: throughput alone).

Run: ``python -m pytest bench/bench_rvq.py -q --benchmark-json=rvq.json``. The faiss comparisons skip where faiss
is not installed.

Protocol (../shared/notes/faiss-rvq.md section 6): same codebooks (random: speed does not depend on
their values), same held-out fp32 data, one process, equal thread counts, the two implementations
alternated A/B/A/B after a warm-up, median of ``REPEATS``. Each benchmark records in ``extra_info``
both medians, vectors/s, achieved GFLOP/s (2 M K d per encoded vector), the ratio lcm_fast / faiss
measured in that window, and the fraction of vectors whose codes agree.
"""

from __future__ import annotations

import functools
import statistics
import time

import numpy as np
import pytest
import torch

from lcm_fast.ops.rvq import bf16_search
from lcm_fast.quant import ResidualQuantizer

D = 1024
SHAPES = [(8, 256), (16, 1024), (32, 4096), (64, 8192)]
REPEATS = 5
# faiss's batch size ignores the [n, K] distance buffer (21 GB at K = 8192): call it in chunks
FAISS_CHUNK = 16384


def _large_batch(M: int, K: int) -> int:
    """Vectors per call for the throughput case: about 16 GFLOP of distance GEMM, at least 256."""
    return int(min(65536, max(256, 16e9 // (2 * M * K * D))))


@functools.lru_cache(maxsize=1)  # 2 GB of fp32 at 64 x 8192: build each shape once
def _quantizers(M: int, K: int):
    g = torch.Generator().manual_seed(M * K)
    rq = ResidualQuantizer.from_codebooks(torch.randn(M, K, D, generator=g) / D**0.5)
    return rq, rq.to_faiss()


@pytest.fixture
def faiss(faiss):
    """faiss (skips without it), at lcm_fast's thread count."""
    faiss.omp_set_num_threads(torch.get_num_threads())
    return faiss


def _data(n: int) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(n)) / D**0.5


def _alternate(benchmark, ours, theirs) -> tuple[float, float]:
    """Median seconds of (ours, theirs), interleaved; one call each when benchmarks are disabled."""
    repeats = 1 if benchmark.disabled else REPEATS
    ours(), theirs()  # warm-up
    t_ours, t_theirs = [], []
    for _ in range(repeats):
        for fn, times in ((ours, t_ours), (theirs, t_theirs)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(t_ours), statistics.median(t_theirs)


def _faiss_encode(faiss, frq, x: np.ndarray, M: int, nbits: int) -> np.ndarray:
    return np.concatenate([faiss.unpack_bitstrings(frq.compute_codes(x[i:i + FAISS_CHUNK]), M, nbits)
                           for i in range(0, len(x), FAISS_CHUNK)])


@pytest.mark.parametrize("search", ["exact", "auto"])
@pytest.mark.parametrize("batch", ["1", "64", "large"])
@pytest.mark.parametrize("M,K", SHAPES)
def test_encode_vs_faiss(benchmark, faiss, M, K, batch, search):
    """``search="auto"`` is the bf16 candidate search on CPUs with bf16 dot products (``extra_info``
    ``search_resolved``), else the fp32 search again."""
    # the smoke run (--benchmark-disable, as in CI) keeps the throughput case small
    n = (64 if benchmark.disabled else _large_batch(M, K)) if batch == "large" else int(batch)
    rq, frq = _quantizers(M, K)
    x = _data(n)
    xn, nbits = x.numpy(), K.bit_length() - 1
    ours = lambda: rq.encode(x, search=search)
    theirs = lambda: _faiss_encode(faiss, frq, xn, M, nbits)
    t_ours, t_faiss = _alternate(benchmark, ours, theirs)
    match = float((ours().numpy() == theirs()).all(1).mean())
    benchmark.group = f"rvq_encode/d{D}/{M}x{K}/n{n}/{search}"
    benchmark.pedantic(ours, rounds=1 if benchmark.disabled else REPEATS, iterations=1)
    flop = 2 * M * K * D * n
    benchmark.extra_info.update(
        op="rvq_encode", M=M, K=K, d=D, n=n, threads=torch.get_num_threads(), faiss=faiss.__version__,
        search=search, search_resolved="bf16" if bf16_search(search, rq.device) else "exact",
        ours_s=t_ours, faiss_s=t_faiss, ours_vps=n / t_ours, faiss_vps=n / t_faiss,
        ours_gflops=flop / t_ours / 1e9, faiss_gflops=flop / t_faiss / 1e9, ratio=t_faiss / t_ours,
        vector_match=match)


@pytest.mark.parametrize("batch", ["1", "64", "4096"])
@pytest.mark.parametrize("M,K", SHAPES)
def test_decode_vs_faiss(benchmark, faiss, M, K, batch):
    n = int(batch)
    rq, frq = _quantizers(M, K)
    codes = torch.randint(K, (n, M), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    packed = faiss.pack_bitstrings(codes.numpy(), K.bit_length() - 1)
    ours = lambda: rq.decode(codes)
    theirs = lambda: frq.decode(packed)
    t_ours, t_faiss = _alternate(benchmark, ours, theirs)
    assert np.array_equal(ours().numpy(), theirs())  # same codes, same sums, same order
    benchmark.group = f"rvq_decode/d{D}/{M}x{K}/n{n}"
    benchmark.pedantic(ours, rounds=1 if benchmark.disabled else REPEATS, iterations=1)
    benchmark.extra_info.update(
        op="rvq_decode", M=M, K=K, d=D, n=n, threads=torch.get_num_threads(), ours_s=t_ours, faiss_s=t_faiss,
        ours_vps=n / t_ours, faiss_vps=n / t_faiss, ratio=t_faiss / t_ours,
        ours_gbps=n * M * D * 4 / t_ours / 1e9)


# GPU: no faiss-gpu to compare with; what a reader needs is vectors per second and the distance GEMM's rate
# (2 M K d FLOP per encoded vector) of the certified bf16 search against the fp32 one, in the same run, and
# against the H200's ~67 TFLOP/s fp32 SIMT and ~790 measured bf16 tensor-core TFLOP/s
GPU_ENCODE_FLOP = 4e12  # per call: about 0.1-0.2 s at the fp32 kernel's rate


def _gpu_quantizer(M: int, K: int) -> ResidualQuantizer:
    g = torch.Generator("cuda").manual_seed(M * K)
    return ResidualQuantizer.from_codebooks(torch.randn(M, K, D, device="cuda", generator=g) / D**0.5)


def _gpu_data(n: int) -> torch.Tensor:
    return torch.randn(n, D, device="cuda", generator=torch.Generator("cuda").manual_seed(n)) / D**0.5


def _synced(fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


def _gpu_timed(benchmark, fn, rounds: int = 3) -> float:
    """Median seconds of fn (synchronised) over ``rounds`` after one warm-up."""
    benchmark.pedantic(_synced(fn), rounds=rounds, warmup_rounds=1)
    return benchmark.stats.stats.median if benchmark.stats else float("nan")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("M,K", SHAPES)
def test_encode_gpu(benchmark, M, K):
    """``search="exact"`` (the fp32 kernel) and ``"auto"`` (the certified bf16 search on tensor-core GPUs),
    alternated in one run; the benchmark's own timing is the ``auto`` path."""
    n = int(min(262144, max(4096, GPU_ENCODE_FLOP // (2 * M * K * D))))
    rq, x = _gpu_quantizer(M, K), _gpu_data(n)
    exact, auto = _synced(lambda: rq.encode(x, search="exact")), _synced(lambda: rq.encode(x, search="auto"))
    t_exact, t_auto = _alternate(benchmark, exact, auto)
    match = float((exact() == auto()).all(1).float().mean())
    benchmark.group = f"rvq_encode_gpu/d{D}/{M}x{K}/n{n}"
    _gpu_timed(benchmark, auto)
    flop = 2 * M * K * D * n
    benchmark.extra_info.update(op="rvq_encode", device=torch.cuda.get_device_name(), M=M, K=K, d=D, n=n,
                                search_resolved="bf16" if bf16_search("auto", rq.device) else "exact",
                                exact_s=t_exact, auto_s=t_auto, speedup=t_exact / t_auto,
                                exact_vectors_per_s=n / t_exact, vectors_per_s=n / t_auto,
                                exact_tflops=flop / t_exact / 1e12, tflops=flop / t_auto / 1e12, vector_match=match)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("M,K", [(8, 256), (64, 8192)])
def test_decode_gpu(benchmark, M, K):
    n = 65536
    rq = _gpu_quantizer(M, K)
    codes = torch.randint(K, (n, M), device="cuda", dtype=torch.int32)
    benchmark.group = f"rvq_decode_gpu/d{D}/{M}x{K}/n{n}"
    median = _gpu_timed(benchmark, lambda: rq.decode(codes))
    benchmark.extra_info.update(op="rvq_decode", device=torch.cuda.get_device_name(), M=M, K=K, d=D, n=n,
                                vectors_per_s=n / median, gbps=n * D * 4 / median / 1e9)


# the paper's codebooks: 64 x 8192 trained on 1M vectors; every point is used (256 per centroid would be 2M)
PAPER_TRAIN = dict(M=64, K=8192, n=1 << 20)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("search", ["exact", "auto"])
@pytest.mark.parametrize("M,K,n", [(8, 1024, 131072), (4, 8192, 262144)])
def test_train_gpu(benchmark, M, K, n, search):
    """The torch k-means trainer on the GPU, 10 Lloyd iterations per stage, every point used (n <= 256 K). Its
    time is linear in M and n at a given K, so ``paper_scaled_s`` = time x (64 / M) x (2^20 / n) estimates the
    paper's 64 x 8192 on 1M vectors from the 8192-centroid case."""
    n_iter = 10
    x = _gpu_data(n)
    benchmark.group = f"rvq_train_gpu/d{D}/{M}x{K}/n{n}"
    median = _gpu_timed(benchmark, lambda: ResidualQuantizer(D, M, K).train(x, device="cuda", n_iter=n_iter,
                                                                              search=search, progress=False), rounds=2)
    benchmark.extra_info.update(op="rvq_train", device=torch.cuda.get_device_name(), M=M, K=K, d=D, n=n,
                                n_iter=n_iter, search=search,
                                search_resolved="bf16" if bf16_search(search, torch.device("cuda")) else "exact",
                                train_s=median, vectors_per_s=n / median,
                                assignment_tflops=2 * M * K * D * n * (n_iter + 1) / median / 1e12,
                                paper_scaled_s=median * PAPER_TRAIN["M"] / M * PAPER_TRAIN["n"] / n
                                if K == PAPER_TRAIN["K"] else None)
