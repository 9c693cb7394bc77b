"""Training objectives of the LCM variants (paper section 2; official criteria: reference-lcm-spec.md 7.1).

Every loss is the squared L2 error summed over the embedding channels (in normalized space), summed
over target positions (the trainer normalises by the number of targets of the step, across
gradient accumulation and data-parallel ranks, as the official trainer does). Targets are the valid positions at or after a document's prompt (instruction
fine-tuning puts no loss on the prompt).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from ..models import BaseLCM, OneTowerLCM, TwoTowerLCM
from .data import Batch
from .fragility import FragilityMLP


def _normalized(model, batch: Batch) -> Tensor:
    norm = model.normalizer
    x = batch.embeddings.to(next(model.parameters()).device)
    return norm.normalize(x) if norm is not None else x


def _targets(batch: Batch, first: int, device: torch.device) -> Tensor:
    """[B, L] bool: valid positions >= max(first, prompt_len)."""
    pos = torch.arange(batch.embeddings.shape[1], device=device)[None, :]
    lens, prompt = batch.seq_lens.to(device)[:, None], batch.prompt_lens.to(device)[:, None]
    return (pos < lens) & (pos >= torch.clamp(prompt, min=first))


def base_lcm_loss(model: BaseLCM, batch: Batch, generator: torch.Generator, *, forward=None, **_) -> tuple[Tensor, int]:
    """Next-concept MSE (paper eqs. 5-6): position i predicts position i + 1."""
    x = _normalized(model, batch)
    pred = (forward or model)(x, batch.seq_lens.to(x.device))
    mask = _targets(batch, 1, x.device)[:, 1:]
    err = (pred[:, :-1].float() - x[:, 1:].float()).pow(2).sum(-1)
    return (err * mask).sum(), int(mask.sum())


def diffusion_loss(model: TwoTowerLCM | OneTowerLCM, batch: Batch, generator: torch.Generator, *, cfg_dropout: float = 0.15,
                   weighting: str = "none", forward=None, fragility: Optional[FragilityMLP] = None,
                   fragility_ab: tuple[float, float] = (-4.0, 3.5), **_) -> tuple[Tensor, int]:
    """Diffusion objective (paper section 2.3): every position is noised to a uniform timestep and
    denoised from the clean context before it; the target follows the scheduler's prediction type.

    cfg_dropout: fraction p of rows trained unconditionally (only the zero vector visible), chosen as
        the official criterion does: floor((L - 1) p) rows among positions 1..L-1, per batch.
    weighting: ``none``, ``clamp_snr`` (paper eq. 17: min(SNR(t), 5), renormalised over targets) or
        ``fragility`` (eq. 25: sigmoid(a F(x0) + b) per target sentence, F = ``fragility`` applied to the
        normalized clean embedding, (a, b) = ``fragility_ab``).
    """
    x0 = _normalized(model, batch)
    B, L, _ = x0.shape
    sched = model.noise_scheduler
    t = torch.randint(0, sched.num_train_steps, (B, L), generator=generator).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0)
    noisy = sched.add_noise(x0.flatten(0, 1), eps.flatten(0, 1), t.flatten()).view_as(x0)
    drop = None
    n_drop = math.floor((L - 1) * cfg_dropout)
    if n_drop > 0:
        drop = torch.zeros(L, dtype=torch.bool)
        drop[1 + torch.randperm(L - 1, generator=generator)[:n_drop]] = True
        drop = drop.to(x0.device)
    pred = (forward or model)(x0, noisy, t, batch.seq_lens.to(x0.device), cfg_dropout_rows=drop).float()
    target = {"sample": x0, "epsilon": eps, "v_prediction": None}[sched.config.prediction_type]
    if target is None:
        target = sched.get_velocity(x0.flatten(0, 1), eps.flatten(0, 1), t.flatten()).view_as(x0)
    mask = _targets(batch, 0, x0.device)
    err = (pred - target.float()).pow(2).sum(-1)
    if weighting == "clamp_snr":
        gamma = torch.clamp(sched.get_snrs().to(x0.device)[t], max=5.0) * mask
        err = err * gamma * mask.sum() / gamma.sum().clamp_min(1e-12)
    elif weighting == "fragility":
        if fragility is None:
            raise ValueError("fragility weighting needs a fitted FragilityMLP (TrainConfig.fragility_model)")
        err = err * fragility.to(x0.device).weights(x0.float(), *fragility_ab)
    elif weighting != "none":
        raise ValueError(f"unknown loss weighting '{weighting}'; expected none, clamp_snr or fragility")
    return (err * mask).sum(), int(mask.sum())


#: variant name -> loss(model, batch, generator, forward=None, **options) -> (summed loss, number of
#: target concepts); the trainer divides by the targets of the whole (global, accumulated) step.
#: ``forward`` is the callable to run the model with (a DistributedDataParallel wrapper), default model.
LOSSES: dict[str, Callable[..., tuple[Tensor, int]]] = {
    "base": base_lcm_loss, "two_tower": diffusion_loss, "one_tower": diffusion_loss,
}
