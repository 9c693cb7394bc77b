"""Fragility scores (an invertible stand-in encoder/decoder; the packaged encoder and a sentence bank with planted
fragile sentences), the MLP F on standardized scores, the CLI, and fragility-weighted training."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from lcm_fast.cli.__main__ import main
from lcm_fast.text import load_encoder
from lcm_fast.text.corpus import load_corpus
from lcm_fast.text.retrieval import RetrievalDecoder
from lcm_fast.text.segment import segment

from lcm_fast.nn.normalizer import SonarNormalizer
from lcm_fast.training import TrainConfig, Trainer
from lcm_fast.training.fragility import FragilityMLP, fit_fragility_mlp, fragility_scores

from .test_trainer import DIM, _dataset, _model


def decode(x: torch.Tensor) -> list[str]:
    """Stand-in SONAR decoder: the 'text' of an embedding is its values (invertible up to rounding)."""
    return [",".join(f"{v:.5f}" for v in row.tolist()) for row in x]


def encode(texts) -> torch.Tensor:
    """Stand-in external encoder: parses the values back."""
    return torch.tensor([[float(v) for v in t.split(",")] for t in texts])


def _normalizer(dim: int) -> SonarNormalizer:
    norm = SonarNormalizer(dim)
    norm.center.normal_(0, 0.01)
    norm.scale.uniform_(0.5, 2.0)
    return norm


def test_fragility_orders_samples_by_robustness():
    torch.manual_seed(0)
    norm = _normalizer(16)
    z = torch.randn(200, 16)
    size = torch.rand(200) * 3 + 0.1  # embeddings far from the normalizer's center are robust
    x = norm.denormalize(z / z.norm(dim=1, keepdim=True) * size[:, None] * 4)
    scores = fragility_scores(decode(x), x, decode, encode, norm, draws=2, generator=torch.Generator().manual_seed(0))
    assert scores.shape == (200,) and bool(((scores >= -1) & (scores <= 1)).all())
    assert torch.corrcoef(torch.stack((scores, size)))[0, 1] < -0.8  # bigger = less fragile
    mlp = fit_fragility_mlp(norm.normalize(x), scores, steps=400, hidden=64)
    predicted = mlp(norm.normalize(x)).detach()
    assert torch.corrcoef(torch.stack((predicted, scores)))[0, 1] > 0.9
    weights = mlp.weights(norm.normalize(x))
    assert bool(((weights > 0) & (weights < 1)).all())
    assert weights[size.argmin()] < weights[size.argmax()]  # fragile samples weigh less


def test_fragility_weighted_training(tmp_path):
    data = _dataset(tmp_path / "train.parquet", n_docs=6)

    mlp = FragilityMLP(DIM, 32)
    torch.save(mlp.state_dict(), tmp_path / "fragility.pt")
    cfg = TrainConfig(variant="two_tower", steps=3, warmup_steps=1, save_every=10, log_every=1,
                      loss_weighting="fragility", fragility_model=str(tmp_path / "fragility.pt"),
                      out_dir=str(tmp_path / "run"))
    Trainer(_model("two_tower"), cfg, data).train()
    assert (tmp_path / "run/checkpoints/step_3").is_dir()
    missing = TrainConfig(variant="two_tower", steps=1, loss_weighting="fragility", out_dir=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="fragility weighting needs a fitted FragilityMLP"):
        Trainer(_model("two_tower"), missing, data).train()


def _planted(n: int, seed: int = 0) -> list[str]:
    """Sentences the paper calls fragile: URLs and ids."""
    rng = random.Random(seed)
    urls = [f"https://{''.join(rng.choices('abcdefghijklmnop0123456789', k=8))}.example.org/{rng.randint(1000, 99999)}"
            f"?id={''.join(rng.choices('ABCDEF0123456789', k=12))}" for _ in range(n // 2)]
    ids = [f"ID {''.join(rng.choices('ABCDEFGHJK0123456789', k=6))}-{rng.randint(100, 999)}" for _ in range(n - n // 2)]
    return urls + ids


def _prose(n: int) -> list[str]:
    return [s for doc in load_corpus(("jargon",)) for s in segment(doc.text)][:n]


def test_planted_fragile_sentences_get_weights_near_zero():
    """eq. 26 against the original text: with the packaged encoder and a bank of prose (the decoder), URLs and ids
    decode to unrelated prose (fragility ~ -0.2) where prose survives every noise level (~ -1); F on standardized
    scores then spans (0, 1) with (a, b) = (-4, 3.5): planted sentences ~0.01, prose ~1."""
    encoder = load_encoder("minilm")
    prose, planted = _prose(80), _planted(10)
    bank = RetrievalDecoder(prose, encoder.encode(prose))
    texts = prose[:30] + planted
    x = encoder.encode(texts)
    norm = SonarNormalizer.fit(encoder.encode(prose))
    scores = fragility_scores(texts, x, bank.decode, encoder.encode, norm, generator=torch.Generator().manual_seed(0))
    assert scores[30:].min() > scores[:30].max() + 0.3  # every planted sentence is more fragile than any prose
    weights = FragilityMLP.weights(fit_fragility_mlp(norm.normalize(x), scores, steps=300, hidden=64), norm.normalize(x))
    assert weights[30:].max() < 0.1 and weights[:30].min() > 0.9
    with pytest.raises(ValueError, match="2 texts for 40 embeddings"):
        fragility_scores(texts[:2], x, bank.decode, encoder.encode, norm)


def test_cli_fit_fragility_then_train(tmp_path, monkeypatch, capsys):
    """prepare a bank of prose and data of other prose with planted sentences -> fit-fragility (refusing a bank that
    holds the scored sentences) -> train --fragility."""
    monkeypatch.chdir(tmp_path)
    prose, planted = _prose(90), _planted(8)

    def prepare(name: str, docs: list[str]) -> list[str]:
        Path(f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        main(["prepare", "--input", f"{name}.jsonl", "--output", name])
        return sorted(str(p) for p in Path(name).glob("shard-*.parquet"))

    prepare("other", [" ".join(prose[i : i + 6]) for i in range(0, 60, 6)])
    shards = prepare("data", [" ".join(prose[i : i + 6]) for i in range(60, 90, 6)] +
                     [" ".join(planted[i : i + 4]) for i in (0, 4)])
    with pytest.raises(ValueError, match="--bank holds .* of the .* scored sentences"):
        main(["--debug", "fit-fragility", "--data", *shards, "--bank", "data/bank", "--out", "fragility.pt"])
    main(["fit-fragility", "--data", *shards, "--bank", "other/bank", "--out", "fragility.pt"])
    summary = capsys.readouterr().out.splitlines()[-1]
    low, high = (float(v) for v in summary.split("min/10%/50%/90%/max ")[1].split(" ")[0].split("/")[::4])
    assert low < 0.1 and high > 0.9, summary  # the weights span (0, 1)
    main(["fit-normalizer", "--data", *shards, "--out", "normalizer.pt"])  # --normalizer: a given one, not refitted
    main(["fit-fragility", "--data", *shards, "--bank", "other/bank", "--normalizer", "normalizer.pt",
          "--out", "fragility-n.pt"])
    main(["train", "--variant", "two_tower", "--data", *shards, "--fragility", "fragility.pt", "--steps", "2",
          "--out", "run"])
    metrics = [json.loads(line) for line in Path("run/metrics.jsonl").read_text().splitlines()]
    assert metrics and all(math.isfinite(m["loss"]) for m in metrics if "loss" in m)


def test_cli_fit_fragility_needs_the_sentences(tmp_path):
    data = _dataset(tmp_path / "train.parquet", n_docs=2)  # embeddings only, no text
    with pytest.raises(ValueError, match="0 sentences with their text in --data: fit-fragility needs prepared shards"):
        main(["--debug", "fit-fragility", "--data", *data.files, "--bank", str(tmp_path), "--out", "f.pt"])
