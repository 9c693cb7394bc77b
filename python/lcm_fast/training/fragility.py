"""Fragility of sentence embeddings and fragility-aware loss weights (paper section 2.5.2 and
equations 18-19, 24-27).

fragility(w) = -E_{alpha, eps}[score(w, decode(x_{alpha,eps}))], with the variance-preserving
perturbation x_{alpha,eps} = denormalize(sqrt(1 - alpha) normalize(x) + sqrt(alpha) eps) (eq. 27) and
score = cosine similarity under an external text encoder. As exact scores are costly, a small MLP F is
fitted to them, and training weights each target by omega(x) = sigmoid(a F(x) + b) (eq. 25; the paper
uses a = -4, b = 3.5), so that fragile sentences contribute less.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.normalizer import SonarNormalizer

Decoder = Callable[[Tensor], Sequence[str]]  # [N, D] embeddings -> N texts
Encoder = Callable[[Sequence[str]], Tensor]  # N texts -> [N, E] external embeddings


@torch.no_grad()
def fragility_scores(
    x: Tensor,
    decode: Decoder,
    encode: Encoder,
    normalizer: SonarNormalizer,
    *,
    alphas: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    draws: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """x: [N, D] SONAR embeddings -> [N] fragility (higher = more fragile; in [-1, 1]).

    The reference text of each embedding is its own decoding; the score is the cosine similarity of
    the external embeddings of the reference and of each perturbed decoding (paper: "external cosine
    similarity"), averaged over ``alphas`` x ``draws`` perturbations.
    """
    reference = encode(decode(x)).float()
    z = normalizer.normalize(x.float())
    total = torch.zeros(x.shape[0])
    for alpha in alphas:
        for _ in range(draws):
            eps = torch.randn(z.shape, generator=generator)
            perturbed = normalizer.denormalize((1 - alpha) ** 0.5 * z + alpha**0.5 * eps)
            total += F.cosine_similarity(reference, encode(decode(perturbed)).float(), dim=-1)
    return -total / (len(alphas) * draws)


class FragilityMLP(nn.Module):
    """F: the 3-layer MLP approximating fragility from a (normalized) embedding [..., D] -> [...]."""

    def __init__(self, dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)

    def weights(self, x: Tensor, a: float = -4.0, b: float = 3.5) -> Tensor:
        """omega(x) = sigmoid(a F(x) + b) (eq. 25), no gradient. x: [..., D] -> [...] in (0, 1)."""
        with torch.no_grad():
            return torch.sigmoid(a * self(x) + b)


def fit_fragility_mlp(x: Tensor, scores: Tensor, *, steps: int = 500, lr: float = 1e-3, hidden: int = 256,
                      seed: int = 0) -> FragilityMLP:
    """Regresses fragility scores [N] on (normalized) embeddings x [N, D] with MSE; full-batch Adam."""
    torch.manual_seed(seed)
    model = FragilityMLP(x.shape[1], hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = F.mse_loss(model(x), scores)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()
