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
from torch import Tensor, nn

from ..models import BaseLCM, OneTowerLCM, QuantLCM, TwoTowerLCM
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


def _weighted(err: Tensor, mask: Tensor, batch: Batch, structure_weight: float, shift: int = 0) -> Tensor:
    """err * mask summed, with the LPCM's break and plan targets (``batch.roles`` > 0) weighted by
    ``structure_weight``; ``shift``: err position i scores concept i + shift."""
    weights = mask.to(err.dtype)
    if batch.roles is not None and structure_weight != 1.0:
        structural = batch.roles.to(err.device)[:, shift:] > 0
        weights = weights * torch.where(structural, structure_weight, 1.0)
    return (err * weights).sum()


def base_lcm_loss(model: BaseLCM, batch: Batch, generator: torch.Generator, *, forward=None,
                  structure_weight: float = 1.0, **_) -> tuple[Tensor, int]:
    """Next-concept MSE (paper eqs. 5-6): position i predicts position i + 1."""
    x = _normalized(model, batch)
    pred = (forward or model)(x, batch.seq_lens.to(x.device))
    mask = _targets(batch, 1, x.device)[:, 1:]
    err = (pred[:, :-1].float() - x[:, 1:].float()).pow(2).sum(-1)
    return _weighted(err, mask, batch, structure_weight, shift=1), int(mask.sum())


#: how the rows trained without context are drawn (:func:`cfg_dropout_rows`)
CFG_DROPOUT_RULES = ("paper", "official")


def cfg_dropout_rows(B: int, L: int, rate: float, rule: str, generator: torch.Generator,
                     device: torch.device) -> Optional[Tensor]:
    """Rows trained without context, for classifier-free guidance (None: none).

    ``paper`` (sections 2.3.3-2.3.4: rows dropped "with a rate of p_cfg"): each position of each document
    independently with probability ``rate`` -> [B, L] bool. ``official`` (the released Two-Tower criterion):
    floor((L - 1) rate) of positions 1..L-1, the same in every document -> [L] bool; documents of 7 sentences or
    fewer get none at rate 0.15. Position 0 has no context to drop in either model."""
    if rule not in CFG_DROPOUT_RULES:
        raise ValueError(f"unknown cfg_dropout_rule '{rule}'; expected one of {CFG_DROPOUT_RULES}")
    if rule == "paper":
        drop = torch.rand(B, L, generator=generator) < rate
        drop[:, 0] = False
        return drop.to(device) if drop.any() else None
    n_drop = math.floor((L - 1) * rate)
    if n_drop <= 0:
        return None
    drop = torch.zeros(L, dtype=torch.bool)
    drop[1 + torch.randperm(L - 1, generator=generator)[:n_drop]] = True
    return drop.to(device)


def default_cfg_dropout_rule(model: nn.Module) -> str:
    """The official rule for Two-Tower (parity with the released trainer), the paper's for the others."""
    return "official" if isinstance(model, TwoTowerLCM) else "paper"


def diffusion_loss(model: TwoTowerLCM | OneTowerLCM, batch: Batch, generator: torch.Generator, *, cfg_dropout: float = 0.15,
                   cfg_dropout_rule: Optional[str] = None, weighting: str = "none",
                   snr_clamp: tuple[float, float] = (0.0, 5.0), forward=None, fragility: Optional[FragilityMLP] = None,
                   fragility_ab: tuple[float, float] = (-4.0, 3.5), structure_weight: float = 1.0,
                   **_) -> tuple[Tensor, int]:
    """Diffusion objective (paper section 2.3): every position is noised to a uniform timestep and
    denoised from the clean context before it; the target follows the scheduler's prediction type.

    cfg_dropout: rate p of rows trained unconditionally (only the zero vector visible), drawn by
        ``cfg_dropout_rule`` (:func:`cfg_dropout_rows`; None: :func:`default_cfg_dropout_rule`).
    weighting: ``none``, ``clamp_snr`` (paper eq. 17: max(min(SNR(t), l_max), l_min), ``snr_clamp`` = (l_min,
        l_max); the paper's settings are (0, 10) and (0.001, 5)) or
        ``fragility`` (eq. 25: sigmoid(a F(x0) + b) per target sentence, F = ``fragility`` applied to the
        normalized clean embedding, (a, b) = ``fragility_ab``).
    structure_weight: LPCM data (``batch.roles``): the weight of the break and plan targets' loss.
    """
    x0 = _normalized(model, batch)
    B, L, _ = x0.shape
    sched = model.noise_scheduler
    t = torch.randint(0, sched.num_train_steps, (B, L), generator=generator).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0)
    noisy = sched.add_noise(x0.flatten(0, 1), eps.flatten(0, 1), t.flatten()).view_as(x0)
    drop = cfg_dropout_rows(B, L, cfg_dropout, cfg_dropout_rule or default_cfg_dropout_rule(model), generator,
                            x0.device)
    pred = (forward or model)(x0, noisy, t, batch.seq_lens.to(x0.device), cfg_dropout_rows=drop).float()
    target = {"sample": x0, "epsilon": eps, "v_prediction": None}[sched.config.prediction_type]
    if target is None:
        target = sched.get_velocity(x0.flatten(0, 1), eps.flatten(0, 1), t.flatten()).view_as(x0)
    mask = _targets(batch, 0, x0.device)
    err = (pred - target.float()).pow(2).sum(-1)
    if weighting == "clamp_snr":
        err = err * sched.get_snrs().to(x0.device)[t].clamp(min=snr_clamp[0], max=snr_clamp[1])
    elif weighting == "fragility":
        if fragility is None:
            raise ValueError("fragility weighting needs a fitted FragilityMLP (TrainConfig.fragility_model)")
        err = err * fragility.to(x0.device).weights(x0.float(), *fragility_ab)
    elif weighting != "none":
        raise ValueError(f"unknown loss weighting '{weighting}'; expected none, clamp_snr or fragility")
    return _weighted(err, mask, batch, structure_weight), int(mask.sum())


def quant_loss(model: QuantLCM, batch: Batch, generator: torch.Generator, *, cfg_dropout: float = 0.15,
               cfg_dropout_rule: Optional[str] = None, forward=None, **_) -> tuple[Tensor, int]:
    """Quant-LCM objective (paper section 2.3.5): every position gets a codebook k uniform in 1..M, its
    input is the intermediate representation of its first k-1 codes. Quant-LCM-D: cross-entropy of
    unit k (summed over targets); Quant-LCM-C: squared L2 error to the continuous embedding
    (normalized space). Context dropout for classifier-free guidance as in the diffusion loss."""
    raw = batch.embeddings.to(model.rvq_codebooks.device)
    B, L, _ = raw.shape
    norm = model.normalizer
    x = norm.normalize(raw) if norm is not None else raw
    codes = model.quantize(raw)  # [B, L, M]
    k = torch.randint(1, model.config.n_codebooks + 1, (B, L), generator=generator).to(raw.device)
    inter = model.intermediate(codes, k - 1).to(x.dtype)
    inter = norm.normalize(inter) if norm is not None else inter
    drop = cfg_dropout_rows(B, L, cfg_dropout, cfg_dropout_rule or default_cfg_dropout_rule(model), generator,
                            raw.device)
    out = (forward or model)(x, inter, k - 1, batch.seq_lens.to(raw.device), cfg_dropout_rows=drop).float()
    mask = _targets(batch, 0, raw.device)
    if model.discrete:
        target = codes.gather(-1, (k - 1)[..., None])[..., 0]
        err = torch.nn.functional.cross_entropy(out.flatten(0, 1), target.flatten(), reduction="none").view(B, L)
    else:
        err = (out - x.float()).pow(2).sum(-1)
    return (err * mask).sum(), int(mask.sum())


#: variant name -> loss(model, batch, generator, forward=None, **options) -> (summed loss, number of
#: target concepts); the trainer divides by the targets of the whole (global, accumulated) step.
#: ``forward`` is the callable to run the model with (a DistributedDataParallel wrapper), default model.
LOSSES: dict[str, Callable[..., tuple[Tensor, int]]] = {
    "base": base_lcm_loss, "two_tower": diffusion_loss, "one_tower": diffusion_loss,
    "quant_d": quant_loss, "quant_c": quant_loss,
    "lpcm": diffusion_loss,  # a One-Tower on paragraph-structured data (break and plan concepts: paper 4.3)
}
