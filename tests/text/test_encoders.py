"""Encoders: the packaged MiniLM offline, the encoder -> bank -> decoder round trip (SONAR: test_sonar.py)."""

from __future__ import annotations

import pytest
import torch

from lcm_fast.text import RetrievalDecoder, segment
from lcm_fast.text.encoders import load_encoder


@pytest.fixture(scope="module")
def minilm():
    return load_encoder("minilm")


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    from pydoc_data.topics import topics  # stdlib prose: always present

    text = " ".join(topics[k] for k in sorted(topics)[:6])
    return list(dict.fromkeys(s for s in segment(text) if len(s) > 20))[:150]


def test_minilm_encodes_offline(minilm, corpus, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    emb = minilm.encode(corpus[:40], batch_size=16)
    assert emb.shape == (40, 384) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=1), torch.ones(40), atol=1e-5)
    assert torch.allclose(minilm.encode(corpus[:3]), emb[:3], atol=1e-5)  # batch-independent
    assert minilm.encode([]).shape == (0, 384)


def test_round_trip_through_the_bank(minilm, corpus):
    """Encoder -> bank -> decoder returns the exact sentence for every bank sentence."""
    bank = RetrievalDecoder(corpus, minilm.encode(corpus))
    out = bank.decode_with_scores(minilm.encode(corpus))
    assert [t for t, _ in out] == corpus and min(s for _, s in out) > 0.999


def test_encoder_errors(minilm):
    with pytest.raises(TypeError, match="list of sentences"):
        minilm.encode("one string")
    with pytest.raises(ValueError, match="sentence 1 is empty"):
        minilm.encode(["fine.", "  "])
    with pytest.raises(ValueError, match="unknown encoder"):
        load_encoder("laser")
