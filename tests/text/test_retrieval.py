"""RetrievalDecoder: round trip on the bank, every index, similarity reporting, files, errors."""

from __future__ import annotations

import pytest
import torch

from lcm_fast.cli.__main__ import BANK_INDEXES
from lcm_fast.text import RetrievalDecoder, check_dims
from lcm_fast.text.retrieval import INDEXES


def _bank(n=500, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [f"sentence number {i}." for i in range(n)], torch.randn(n, d, generator=g)


@pytest.mark.parametrize("index", INDEXES)
def test_round_trip_returns_the_exact_sentence(index):
    sentences, emb = _bank()
    dec = RetrievalDecoder(sentences, emb, index=index)
    # scaled and slightly perturbed embeddings still decode to their own sentence, with cosine ~1
    query = 3.0 * emb + 0.01 * torch.randn(emb.shape, generator=torch.Generator().manual_seed(1))
    out = dec.decode_with_scores(query)
    assert [t for t, _ in out] == sentences
    assert min(s for _, s in out) > 0.99
    far = dec.decode_with_scores(torch.randn(3, 32, generator=torch.Generator().manual_seed(2)))
    assert max(s for _, s in far) < 0.9  # off the bank: a low similarity says so


def test_search_top_k_matches_exact():
    sentences, emb = _bank()
    q = torch.randn(20, 32)
    s_faiss, i_faiss = RetrievalDecoder(sentences, emb, "flat").search(q, 5)
    s_torch, i_torch = RetrievalDecoder(sentences, emb, "torch").search(q, 5)
    assert torch.equal(i_faiss, i_torch) and torch.allclose(s_faiss, s_torch, atol=1e-5)


def test_save_load(tmp_path):
    sentences, emb = _bank(50)
    RetrievalDecoder(sentences, emb).save(tmp_path / "bank")
    back = RetrievalDecoder.load(tmp_path / "bank")
    assert back.sentences == sentences and back.decode(emb) == sentences


def test_errors(tmp_path):
    sentences, emb = _bank(10)
    with pytest.raises(ValueError, match="10 sentences but embeddings of shape"):
        RetrievalDecoder(sentences, emb[:9])
    with pytest.raises(ValueError, match="empty"):
        RetrievalDecoder([], torch.zeros(0, 4))
    dec = RetrievalDecoder(sentences, emb)
    with pytest.raises(ValueError, match="32-d embeddings but the queries have shape"):
        dec.decode(torch.randn(2, 16))
    with pytest.raises(ValueError, match="NaN"):
        dec.decode(torch.full((1, 32), float("nan")))
    with pytest.raises(ValueError, match="different encoders"):
        check_dims(1024, dec)
    with pytest.raises(FileNotFoundError, match="not a sentence bank"):
        RetrievalDecoder.load(tmp_path)
    with pytest.raises(ValueError, match="unknown retrieval index"):
        RetrievalDecoder(sentences, emb, index="ivfpq")


def test_ivf_on_a_larger_bank():
    """IVF over ~4 sqrt(N) cells: the bank's own vectors always come back (a vector's own cell is the
    one nearest to it, and it is probed); off-bank queries agree with the exact search at full nprobe."""
    sentences, emb = _bank(4000, 32)
    ivf = RetrievalDecoder(sentences, emb, "ivf")
    assert ivf._faiss.nlist == 102 and ivf._faiss.nprobe == 16
    assert ivf.decode(emb[::7]) == sentences[::7]
    q = torch.randn(50, 32, generator=torch.Generator().manual_seed(3))
    full = RetrievalDecoder(sentences, emb, "ivf", nprobe=10_000)
    assert torch.equal(full.search(q, 3)[1], RetrievalDecoder(sentences, emb, "flat").search(q, 3)[1])


def test_cli_lists_every_index():
    assert BANK_INDEXES == INDEXES
