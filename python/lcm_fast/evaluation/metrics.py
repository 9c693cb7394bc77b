"""Embedding-space metrics of next-concept predictions (paper section 2.4.1).

Inputs are aligned: ``pred[b, n]`` predicts ``target[b, n]`` from ``target[b, :n]``; ``mask[b, n]`` marks
the scored positions. All metrics are computed in SONAR space (denormalized), in fp32.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def l2_distance(pred: Tensor, target: Tensor, mask: Tensor) -> float:
    """Mean L2 distance between predictions and ground truth. pred, target: [B, L, D]; mask: [B, L]."""
    return (pred - target).float().norm(dim=-1)[mask].mean().item()


def contrastive_accuracy(pred: Tensor, target: Tensor, mask: Tensor, valid: Optional[Tensor] = None) -> float:
    """CA: for each scored prediction, the fraction of the batch's ground-truth embeddings (``valid``
    [B, L] positions, default ``mask``) that are farther from it than its own ground truth, excluding
    that ground truth and its two neighbours (0.5 is chance, 1 is perfect)."""
    B, L, _ = target.shape
    candidates = target.float().flatten(0, 1)  # [B*L, D]
    valid = (mask if valid is None else valid).flatten()
    rows = mask.nonzero()  # [N, 2]
    p = pred.float()[mask]  # [N, D]
    own = (p - target.float()[mask]).norm(dim=-1)  # [N]
    dist = torch.cdist(p, candidates)  # [N, B*L]
    flat = rows[:, 0] * L + rows[:, 1]
    excluded = torch.zeros_like(dist, dtype=torch.bool)
    for offset in (-1, 0, 1):  # the ground truth and its neighbours in the same document
        n = rows[:, 1] + offset
        ok = (n >= 0) & (n < L)
        excluded[ok.nonzero().flatten(), (flat + offset)[ok]] = True
    usable = valid[None, :] & ~excluded
    farther = ((dist > own[:, None]) & usable).sum(1).float()
    count = usable.sum(1).float()
    keep = count > 0
    return (farther[keep] / count[keep]).mean().item() if keep.any() else float("nan")


def paraphrasing(pred: Tensor, target: Tensor, mask: Tensor) -> float:
    """PAR: max_{m<n} cos(pred_n, x_m) / max_{m<n} cos(x_n, x_m), averaged over scored n >= 1
    (> 1: the prediction copies the context more than the reference sentence does)."""
    p, x = pred.float(), target.float()
    pn, xn = F.normalize(p, dim=-1), F.normalize(x, dim=-1)
    cos_pred = pn @ xn.transpose(1, 2)  # [B, L, L]: cos(pred_n, x_m)
    cos_true = xn @ xn.transpose(1, 2)
    L = x.shape[1]
    earlier = torch.ones(L, L, dtype=torch.bool, device=x.device).tril(-1)  # m < n
    neg = torch.finfo(torch.float32).min
    best_pred = cos_pred.masked_fill(~earlier, neg).amax(-1)
    best_true = cos_true.masked_fill(~earlier, neg).amax(-1)
    scored = mask.clone()
    scored[:, 0] = False
    return (best_pred / best_true)[scored].mean().item() if scored.any() else float("nan")


def prediction_metrics(pred: Tensor, target: Tensor, mask: Tensor, valid: Optional[Tensor] = None) -> dict[str, float]:
    """{l2, ca, par} of the scored positions ``mask``; ``valid`` marks non-padding positions."""
    return {"l2": l2_distance(pred, target, mask), "ca": contrastive_accuracy(pred, target, mask, valid),
            "par": paraphrasing(pred, target, mask)}
