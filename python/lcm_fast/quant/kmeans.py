"""k-means and progressive residual k-means in PyTorch (the ``torch`` RVQ training backend).

Runs wherever torch does (CPU or GPU). Assignment is the fused ``rvq_encode`` op with one codebook,
so the ``[n, K]`` distance matrix never exists and residuals never leave the device; with
``search="auto"`` it is the certified bf16 candidate search where bf16 GEMMs are fast (tensor-core GPUs,
CPUs with bf16 dot products), which assigns as the fp32 search does, in every Lloyd iteration and stage.

A residual is always ``x - C[0][c_0] - C[1][c_1] - ...``, subtracted in codebook order (as the encoder
does). Data already on the training device as a tensor keeps its residuals there (one ``[N, d]`` fp32
copy, updated once per stage); other data is streamed: it only has to support ``len()`` and row
slicing (a NumPy array, ``np.memmap``, a tensor elsewhere), and its residuals are rebuilt chunk by chunk
from the codes found so far (``N x M`` integers). Both take the same steps on the same chunks, so
they train the same codebooks, bit for bit.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..ops.rvq import rvq_decode, rvq_encode, search_codebooks, sq_norms

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


def _assign(x: Tensor, centroids: Tensor, search: str) -> Tensor:
    """Nearest of centroids [k, d] for each row of x [n, d] -> [n] int32 (the fp32 search's choice)."""
    cb = centroids[None]
    return rvq_encode(x, cb, sq_norms(cb), search_codebooks=search_codebooks(cb, search))[:, 0]


def kmeans(
    x: Tensor, k: int, *, n_iter: int = 10, init: str = "random", seed: int = 1234, search: str = "auto",
    callback: Optional[Callable[[int, float], None]] = None,
) -> Tensor:
    """Lloyd's k-means of x [n, d] (fp32, any device, n >= k) -> centroids [k, d].

    ``init``: ``random`` (k distinct points, as faiss) or ``kmeans++``. An empty cluster takes half of
    the largest cluster: its centroid is copied and both are pushed apart by ``SPLIT_EPS`` (faiss's rule).
    ``search``: the assignments' search (:func:`lcm_fast.ops.rvq.bf16_search`; every choice assigns as the
    fp32 search does). ``callback(iteration, mean squared error)`` is called after every assignment.
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
        assign = _assign(x, centroids, search).long()
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
    seed: int = 1234, search: str = "auto", progress: bool = True,
) -> tuple[Tensor, Tensor]:
    """Progressive residual k-means: codebook m is k-means on the residuals left by codebooks < m.

    data: [N, d] rows: a tensor on ``device`` (its residuals kept there: one more [N, d] fp32), or
    streamed in ``chunk_size`` slices (ndarray, memmap, a tensor elsewhere). Each step's k-means sees a
    random subsample of ``max_points_per_centroid * K`` residuals (faiss's cap). ``search``: the
    assignments' search (:func:`kmeans`). Returns (codebooks [M, K, d] fp32 on ``device``, codes [N, M]
    int32 of the training data, on the CPU).
    """
    N, d = len(data), int(data.shape[1])
    M, K = n_codebooks, codebook_size
    device = torch.device(device) if device is not None else (data.device if isinstance(data, Tensor) else torch.device("cpu"))
    rng = np.random.default_rng(seed)
    codebooks = torch.zeros(M, K, d, device=device)
    codes = torch.zeros(N, M, dtype=torch.int32)  # host: N x M is what streaming keeps
    residual = data.detach().to(torch.float32, copy=True) if _on(data, device) else None
    bar = tqdm(total=M, disable=not progress, desc=f"rvq {M}x{K} (torch, {device.type})", unit="codebook")
    for m in range(M):
        sample = np.sort(rng.choice(N, size=min(N, max_points_per_centroid * K), replace=False))
        if residual is not None:
            xs = residual[torch.from_numpy(sample).to(device)]
        else:
            xs = _subtract(_rows_at(data, sample, device), codebooks, codes[torch.from_numpy(sample)], m)
        codebooks[m] = kmeans(xs, K, n_iter=n_iter, init=init, seed=seed + m, search=search)
        del xs
        cb = codebooks[m:m + 1]
        sq, search_cb = sq_norms(cb), search_codebooks(cb, search)
        for start in range(0, N, chunk_size):
            stop = min(N, start + chunk_size)
            if residual is not None:
                r = residual[start:stop]
            else:
                r = _subtract(_rows(data, start, stop, device), codebooks, codes[start:stop], m)
            chunk_codes = rvq_encode(r, cb, sq, search_codebooks=search_cb)[:, 0]
            codes[start:stop, m] = chunk_codes.cpu()
            if residual is not None and m + 1 < M:
                r -= codebooks[m][chunk_codes.long()]
        bar.update(1)
    bar.close()
    return codebooks, codes


def _on(data, device: torch.device) -> bool:
    """Whether data is a tensor on ``device`` (its residuals are then kept in memory)."""
    return isinstance(data, Tensor) and data.device.type == device.type and (
        device.index is None or data.device.index == device.index)


def _subtract(x: Tensor, codebooks: Tensor, codes: Tensor, stages: int) -> Tensor:
    """The residuals of rows x [n, d] after the first ``stages`` codebooks: x - C[0][codes[:, 0]] - ...,
    subtracted in codebook order (the same steps, so the same bits, as the in-memory residuals)."""
    codes = codes.to(codebooks.device).long()
    for j in range(stages):
        x = x - codebooks[j][codes[:, j]]
    return x


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
