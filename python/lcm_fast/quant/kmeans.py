"""k-means and progressive residual k-means in PyTorch (the ``torch`` RVQ training backend).

Runs wherever torch does (CPU or GPU). Assignment is the fused ``rvq_encode`` op with one codebook,
so the ``[n, K]`` distance matrix never exists and residuals never leave the device. Data larger than
memory is streamed: the training set only has to support ``len()`` and row slicing (a tensor, a
NumPy array or ``np.memmap``); residuals are rebuilt chunk by chunk from the codes found so far
(``N x M`` integers) rather than stored.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..ops.rvq import rvq_decode, rvq_encode, sq_norms

#: empty clusters are refilled by splitting a large one, its centroid nudged by this relative amount (faiss's EPS)
SPLIT_EPS = 1.0 / 1024
INITS = ("random", "kmeans++")


def _rows(data, start: int, stop: int, device: torch.device) -> Tensor:
    """Rows [start, stop) as fp32 on device; may alias ``data`` (never write into it)."""
    chunk = data[start:stop]
    chunk = torch.from_numpy(np.array(chunk, dtype=np.float32)) if isinstance(chunk, np.ndarray) else chunk  # copy: memmaps are read-only
    return chunk.to(device=device, dtype=torch.float32)


def _rows_at(data, index: np.ndarray, device: torch.device) -> Tensor:
    if isinstance(data, Tensor):
        return data[torch.as_tensor(index, device=data.device)].to(device=device, dtype=torch.float32)
    return torch.from_numpy(np.ascontiguousarray(data[index])).to(device=device, dtype=torch.float32)


def _kmeans_pp(x: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """k-means++ seeding (D^2 sampling) on the rows of x [n, d]."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centroids = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        total = d2.sum()
        i = int(torch.multinomial((d2 / total).cpu(), 1, generator=gen)) if total > 0 else int(
            torch.randint(n, (1,), generator=gen))
        centroids.append(x[i])
        d2 = torch.minimum(d2, ((x - x[i]) ** 2).sum(1))
    return torch.stack(centroids)


def kmeans(
    x: Tensor, k: int, *, n_iter: int = 10, init: str = "random", seed: int = 1234,
    callback: Optional[Callable[[int, float], None]] = None,
) -> Tensor:
    """Lloyd's k-means of x [n, d] (fp32, any device, n >= k) -> centroids [k, d].

    ``init``: ``random`` (k distinct points, as faiss) or ``kmeans++``. An empty cluster takes half of
    the largest cluster: its centroid is copied and both are pushed apart by ``SPLIT_EPS`` (faiss's rule).
    ``callback(iteration, mean squared error)`` is called after every assignment.
    """
    if init not in INITS:
        raise ValueError(f"unknown k-means init {init!r}; expected one of {INITS}")
    n, d = x.shape
    if n < k:
        raise ValueError(f"k-means needs at least k={k} training points, got {n}")
    gen = torch.Generator().manual_seed(seed)
    if init == "random":
        centroids = x[torch.randperm(n, generator=gen)[:k].to(x.device)].clone()
    else:
        centroids = _kmeans_pp(x, k, gen)
    for it in range(n_iter):
        assign = rvq_encode(x, centroids[None], sq_norms(centroids)[None])[:, 0].long()
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        if callback is not None:
            err = ((x - centroids[assign]) ** 2).sum() / n
            callback(it, float(err))
        nonempty = counts > 0
        centroids[nonempty] = sums[nonempty] / counts[nonempty, None].to(x.dtype)
        _split_empty(centroids, counts, gen)
    return centroids


def _split_empty(centroids: Tensor, counts: Tensor, gen: torch.Generator) -> None:
    """Refills each empty cluster by splitting a cluster chosen with probability ~ its size - 1 (faiss)."""
    counts = counts.clone().cpu()
    for j in torch.nonzero(counts == 0).flatten().tolist():
        weights = (counts - 1).clamp(min=0).double()
        if weights.sum() == 0:
            break
        src = int(torch.multinomial(weights, 1, generator=gen))
        sign = torch.ones_like(centroids[src])
        sign[::2] = -1  # alternate signs, so the pair moves apart symmetrically
        centroids[j] = centroids[src] * (1 + SPLIT_EPS * sign)
        centroids[src] = centroids[src] * (1 - SPLIT_EPS * sign)
        counts[j] = counts[src] // 2
        counts[src] -= counts[j]


def train_residual_kmeans(
    data, n_codebooks: int, codebook_size: int, *, n_iter: int = 10, init: str = "random",
    max_points_per_centroid: int = 256, chunk_size: int = 65536, device: Optional[torch.device | str] = None,
    seed: int = 1234, progress: bool = True,
) -> tuple[Tensor, Tensor]:
    """Progressive residual k-means: codebook m is k-means on the residuals left by codebooks < m.

    data: [N, d] rows (tensor, ndarray or memmap; streamed in ``chunk_size`` slices). Each step's
    k-means sees a random subsample of ``max_points_per_centroid * K`` residuals (faiss's cap). Returns
    (codebooks [M, K, d] fp32 on ``device``, codes [N, M] int32 of the training data).
    """
    N, d = len(data), int(data.shape[1])
    M, K = n_codebooks, codebook_size
    device = torch.device(device) if device is not None else (data.device if isinstance(data, Tensor) else torch.device("cpu"))
    rng = np.random.default_rng(seed)
    codebooks = torch.zeros(M, K, d, device=device)
    codes = torch.zeros(N, M, dtype=torch.int32)  # host: N x M is what streaming keeps
    bar = tqdm(total=M, disable=not progress, desc=f"rvq {M}x{K} (torch, {device.type})", unit="codebook")
    for m in range(M):
        sample = np.sort(rng.choice(N, size=min(N, max_points_per_centroid * K), replace=False))
        xs = _rows_at(data, sample, device)
        if m > 0:
            xs = xs - rvq_decode(codes[torch.from_numpy(sample)].to(device), codebooks, m)
        codebooks[m] = kmeans(xs, K, n_iter=n_iter, init=init, seed=seed + m)
        del xs
        cb, sq = codebooks[m:m + 1], sq_norms(codebooks[m:m + 1])
        for start in range(0, N, chunk_size):
            r = _rows(data, start, start + chunk_size, device)
            if m > 0:
                r = r - rvq_decode(codes[start:start + chunk_size].to(device), codebooks, m)
            codes[start:start + chunk_size, m] = rvq_encode(r, cb, sq)[:, 0].cpu()
        bar.update(1)
    bar.close()
    return codebooks, codes


def prefix_errors(data, codes: Tensor, codebooks: Tensor, prefixes: Optional[Sequence[int]] = None,
                  chunk_size: int = 65536) -> dict[int, float]:
    """Relative reconstruction error sum|x - x_k|^2 / sum|x|^2 for each prefix k of codebooks
    (default 1, 2, 4, ..., M). data: [N, d]; codes: [N, M]; codebooks: [M, K, d]."""
    M = codebooks.shape[0]
    prefixes = sorted(set(prefixes or [2 ** i for i in range(M.bit_length()) if 2 ** i <= M] + [M]))
    err, norm = dict.fromkeys(prefixes, 0.0), 0.0
    for start in range(0, len(data), chunk_size):
        x = _rows(data, start, start + chunk_size, codebooks.device)
        c = codes[start:start + chunk_size].to(codebooks.device)
        norm += float((x * x).sum())
        for k in prefixes:
            err[k] += float(((x - rvq_decode(c, codebooks, k)) ** 2).sum())
    return {k: e / max(norm, 1e-30) for k, e in err.items()}
