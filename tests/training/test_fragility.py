"""Fragility scores with an invertible stand-in encoder/decoder, the MLP F, and fragility-weighted training."""

from __future__ import annotations

import pytest
import torch

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
    scores = fragility_scores(x, decode, encode, norm, draws=2, generator=torch.Generator().manual_seed(0))
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
