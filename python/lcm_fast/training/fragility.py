"""Fragility of sentence embeddings and fragility-aware loss weights (paper section 2.5.2 and
equations 18-19, 24-27).

fragility(w) = -E_{alpha, eps}[score(w, decode(x_{alpha,eps}))], with the variance-preserving
perturbation x_{alpha,eps} = denormalize(sqrt(1 - alpha) normalize(x) + sqrt(alpha) eps) (eq. 27) and
score = cosine similarity under an external text encoder between the original text w and each perturbed
decoding (eq. 26). As exact scores are costly, a small MLP F is fitted to them, and training weights each target
by omega(x) = sigmoid(a F(x) + b) (eq. 25; the paper uses a = -4, b = 3.5), so that fragile sentences contribute less.

The scale of F: a raw score is minus a mean cosine, in [-1, 1], where (a, b) = (-4, 3.5) give every sentence with a
non-negative mean cosine a weight >= 0.97 and the most fragile one possible 0.38, so the paper's "extremely fragile
sentences contribute ~0" cannot happen on that scale; the paper does not state F's. Here F predicts the
*standardized* score (z-score over the sentences it is fitted on): a typical sentence (F = 0) weighs 0.97, one
2 standard deviations more fragile than the mean 0.01, and the weights rise smoothly with robustness, as the paper
describes (its Figure 12).
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
    texts: Sequence[str],
    x: Tensor,
    decode: Decoder,
    encode: Encoder,
    normalizer: SonarNormalizer,
    *,
    alphas: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    draws: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """texts: N sentences; x: [N, D] their SONAR embeddings -> [N] fragility (higher = more fragile; in [-1, 1]).

    The score is the cosine similarity of the external embeddings of each original sentence and of each perturbed
    decoding (paper: "external cosine similarity"), averaged over ``alphas`` x ``draws`` perturbations. The
    reference is the text itself, not ``decode(x)``: a sentence that does not survive its own round trip is the
    most fragile of all, and scoring against its decoding would hide it.
    """
    if len(texts) != x.shape[0]:
        raise ValueError(f"fragility_scores: {len(texts)} texts for {x.shape[0]} embeddings")
    reference = encode(list(texts)).float()
    z = normalizer.normalize(x.float())
    total = torch.zeros(x.shape[0])
    for alpha in alphas:
        for _ in range(draws):
            eps = torch.randn(z.shape, generator=generator)
            perturbed = normalizer.denormalize((1 - alpha) ** 0.5 * z + alpha**0.5 * eps)
            total += F.cosine_similarity(reference, encode(decode(perturbed)).float(), dim=-1)
    return -total / (len(alphas) * draws)


class FragilityMLP(nn.Module):
    """F: the 3-layer MLP approximating the standardized fragility (module docstring) of a (normalized) embedding
    [..., D] -> [...]; ``score_mean`` and ``score_std`` (buffers) are the raw scores' statistics it was fitted on."""

    def __init__(self, dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, 1))
        self.register_buffer("score_mean", torch.zeros(()))
        self.register_buffer("score_std", torch.ones(()))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)

    def raw(self, x: Tensor) -> Tensor:
        """The predicted fragility on the scores' own scale ([-1, 1]), no gradient."""
        with torch.no_grad():
            return self(x) * self.score_std + self.score_mean

    def weights(self, x: Tensor, a: float = -4.0, b: float = 3.5) -> Tensor:
        """omega(x) = sigmoid(a F(x) + b) (eq. 25), no gradient. x: [..., D] -> [...] in (0, 1)."""
        with torch.no_grad():
            return torch.sigmoid(a * self(x) + b)


def fit_fragility_mlp(x: Tensor, scores: Tensor, *, steps: int = 500, lr: float = 1e-3, hidden: int = 256,
                      seed: int = 0) -> FragilityMLP:
    """Regresses the standardized fragility scores [N] on (normalized) embeddings x [N, D] with MSE; full-batch
    Adam."""
    if x.shape[0] < 2:
        raise ValueError(f"fit_fragility_mlp: {x.shape[0]} scored sentences; standardizing needs at least 2")
    torch.manual_seed(seed)
    model = FragilityMLP(x.shape[1], hidden)
    model.score_mean.fill_(scores.mean())
    model.score_std.fill_(scores.std().clamp_min(1e-6))
    target = (scores - model.score_mean) / model.score_std
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = F.mse_loss(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()
