"""lcm_fast.quant: codebook training (torch and faiss backends), streaming, files, faiss interop, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lcm_fast.quant import ResidualQuantizer, kmeans, train_residual_kmeans

from .ops.test_rvq import assert_codes_match, clustered


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return clustered(6000, 48, seed=7)


@pytest.mark.parametrize("backend,init", [("torch", "random"), ("torch", "kmeans++"), ("faiss", "random")])
def test_training_reduces_error_per_prefix(data, backend, init):
    if backend == "faiss":
        pytest.importorskip("faiss")
    rq = ResidualQuantizer(48, 4, 32).train(data, backend=backend, init=init, progress=False)
    err = rq.prefix_errors(data)
    assert list(err) == [1, 2, 4]
    assert err[1] < 0.5 and err[4] < err[2] < err[1], err  # coarse-to-fine: every prefix helps


def test_torch_and_faiss_codebooks_are_comparable(data, faiss):
    """Either backend's codebooks: the torch trainer's error is within 15 % of faiss IRVQ's."""
    errs = {b: ResidualQuantizer(48, 4, 32).train(data, backend=b, progress=False).prefix_errors(data)[4]
            for b in ("torch", "faiss")}
    assert errs["torch"] < 1.15 * errs["faiss"], errs


@pytest.mark.parametrize("search", ["exact", "bf16"])
def test_streaming_from_memmap_equals_in_memory(data, tmp_path, search):
    """Data larger than memory: a memmap streamed in chunks (residuals rebuilt from the codes) trains the same
    codebooks and codes, bit for bit, as the tensor in memory (residuals kept), with either search."""
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=tuple(data.shape))
    mm[:] = data.numpy()
    mm.flush()
    kw = dict(chunk_size=1500, search=search, progress=False)
    ref_cb, ref_codes = train_residual_kmeans(data, 3, 16, **kw)
    cb, codes = train_residual_kmeans(np.load(tmp_path / "x.npy", mmap_mode="r"), 3, 16, **kw)
    assert torch.equal(cb, ref_cb) and torch.equal(codes, ref_codes)
    # training codes are the greedy codes of the final codebooks
    assert_codes_match(ResidualQuantizer.from_codebooks(cb).encode(data, search=search), codes, data, cb)


def test_kmeans_assignments_take_the_search(data):
    """The candidate search assigns as the fp32 search does, in every Lloyd iteration: the same centroids."""
    assert torch.equal(kmeans(data, 64, search="bf16"), kmeans(data, 64, search="exact"))
    with pytest.raises(ValueError, match="unknown RVQ search 'fast'"):
        kmeans(data, 64, search="fast")


def test_encode_search_modes(data):
    """bf16 candidate search = fp32 search up to near-ties, also after retraining (no stale bf16 copy)."""
    rq = ResidualQuantizer(48, 3, 32)
    for seed in (1, 2):
        rq.train(data, seed=seed, progress=False)
        exact = rq.encode(data, search="exact")
        for search in ("bf16", "auto"):
            assert_codes_match(rq.encode(data, search=search), exact, data, rq.codebooks)
    with pytest.raises(ValueError, match="unknown RVQ search 'fast'"):
        rq.encode(data, search="fast")


def test_training_does_not_modify_the_data(data):
    before = data.clone()
    train_residual_kmeans(data, 2, 16, progress=False)
    assert torch.equal(data, before)


def test_kmeans_refills_empty_clusters():
    """10 distinct points, 16 clusters: empty clusters are split off large ones, never left NaN."""
    x = torch.randn(10, 8).repeat(50, 1)
    c = kmeans(x, 16, n_iter=5)
    assert torch.isfinite(c).all() and c.shape == (16, 8)
    assert torch.unique(c, dim=0).shape[0] == 16


def test_save_load_and_faiss_roundtrip(data, tmp_path, faiss):
    rq = ResidualQuantizer(48, 2, 16).train(data, progress=False)
    path = rq.save(tmp_path / "rq.safetensors")
    back = ResidualQuantizer.load(path)
    assert torch.equal(back.codebooks, rq.codebooks) and (back.d, back.n_codebooks, back.codebook_size) == (48, 2, 16)
    via_faiss = ResidualQuantizer.from_faiss(rq.to_faiss())
    assert torch.equal(via_faiss.codebooks, rq.codebooks)


def test_errors(data, tmp_path):
    rq = ResidualQuantizer(48, 2, 16)
    with pytest.raises(RuntimeError, match="not trained"):
        rq.encode(data)
    with pytest.raises(ValueError, match=r"shape \[N, 48\]"):
        rq.train(data[:, :10], progress=False)
    with pytest.raises(ValueError, match="unknown RVQ training backend"):
        rq.train(data, backend="sklearn")
    with pytest.raises(ValueError, match="K = 2\\^nbits"):
        ResidualQuantizer(48, 2, 12).train(data, backend="faiss")
    rq.train(data, progress=False)
    bad = data[:4].clone()
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/Inf .*rows \[2\]"):
        rq.encode(bad)
    with pytest.raises(ValueError, match=r"\[N, 48\]"):
        rq.encode(data[:, :47])
    for backend in ("ext", "ref"):
        with pytest.raises((ValueError, RuntimeError), match=r"outside \[0, K=16\)"):
            rq.decode(torch.full((3, 2), 16), backend=backend)
    with pytest.raises(ValueError, match="1 <= k <= 2"):
        rq.decode(torch.zeros(3, 2, dtype=torch.long), k=3)
    with pytest.raises(ValueError, match="at least k=16"):
        kmeans(torch.randn(5, 4), 16)
    (tmp_path / "plain.safetensors").write_bytes(b"\x00" * 8)
    with pytest.raises(Exception):
        ResidualQuantizer.load(tmp_path / "plain.safetensors")
    with pytest.raises(FileNotFoundError):
        ResidualQuantizer.load(tmp_path / "missing.safetensors")
