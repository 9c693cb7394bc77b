"""Beam search over sampled concepts: ``GenerationOptions(num_candidates=K, beam_size=B, beam_scorer=...)``.

Diffusion LCMs sample one continuation per sentence; nothing chooses among several. With beam search every document
keeps B partial documents (beams); at each sentence every beam samples K candidate concepts (the K x B rows of a
document go through the engine's step like any other rows, each with its own noise), a *scorer* gives each candidate
a score (higher is better), and the B best continuations, by the sum of their sentences' scores, are kept.

A candidate that stops its document (EOS, repetition; see ``GenerationOptions``) among the B best ends a *hypothesis*
(scored by its mean sentence score, so lengths compare); the best B candidates that do not stop continue. A document
is done when it holds B hypotheses, when no candidate continues, or at ``max_gen_len`` (where the B best candidates
end). When fewer than B candidates continue, the empty beams are *dead*: their rows still run (shapes stay fixed,
CUDA graphs stay valid) but are never chosen. K = B = 1 is plain sampling (the generator then takes no step of this).

Scorers are callables ``scorer(candidates: Candidates) -> Tensor [R]``. Shipped: :class:`DenoisingConsistency` (the
model's own denoising loss of the candidate at one noise level: how close it stays to the model's prediction when
re-noised and denoised) and :class:`PlanSimilarity` (cosine to the plan the document is on: an LPCM's latest plan
concept, or plans the caller gives).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models import OneTowerLCM, TwoTowerLCM
from .planning import latest_plans


@dataclass
class Candidates:
    """What a scorer sees at one sentence position: R candidate rows (every row of the active documents)."""

    concepts: Tensor
    """[R, D] the candidate concepts, SONAR space."""
    context: Tensor
    """[R, P, D] each row's concepts before its candidate: its prompt and what its beam generated."""
    documents: Tensor
    """[R] int64: the input document (row of the prompts) each candidate continues."""
    model: torch.nn.Module
    randn: Callable[[tuple[int, ...]], Tensor]
    """The generation's noise source: a standard-normal fp32 tensor of a shape [R, ...] (site ``beam_score``)."""
    denoise: Optional[Callable[[Tensor, int], Tensor]] = None
    """Diffusion LCMs: (noisy latents [R, D] normalized, training timestep t) -> the model's conditional x0 prediction
    [R, D] fp32, normalized, each row on its context (no guidance)."""
    break_vec: Optional[Tensor] = None
    """[D] an LPCM's break concept (``Generator(break_vec=...)``), else None."""
    break_threshold: float = 0.9


Scorer = Callable[[Candidates], Tensor]


class DenoisingConsistency:
    """The model's own denoising loss of a candidate, negated: re-noise the candidate to the training timestep
    ``level * (T - 1)``, denoise it once on its context and score ``-mean((x0_pred - x)^2)`` in the model's
    normalized space. A one-timestep estimate of the diffusion training loss (a bound on the candidate's
    log-likelihood, up to weights): candidates the model finds typical for their context score higher. Needs a
    diffusion LCM (Two-Tower, One-Tower)."""

    def __init__(self, level: float = 0.5) -> None:
        if not (isinstance(level, (int, float)) and 0 <= level <= 1):
            raise ValueError(f"DenoisingConsistency.level must be in [0, 1], got {level!r}")
        self.level = float(level)

    def check(self, model: torch.nn.Module, break_vec: Optional[Tensor]) -> None:
        if not isinstance(model, (TwoTowerLCM, OneTowerLCM)):
            raise ValueError(f"beam_scorer 'consistency' re-noises and denoises candidates: it needs a diffusion LCM "
                             f"(Two-Tower or One-Tower), got a {type(model).__name__}; use 'plan' (with an LPCM's "
                             "break_vec) or a callable")

    def __call__(self, candidates: Candidates) -> Tensor:
        model, x = candidates.model, candidates.concepts
        schedule = model.noise_scheduler
        t = round(self.level * (schedule.num_train_steps - 1))
        clean = model.normalizer.normalize(x).float()
        timesteps = torch.full((len(x),), t, dtype=torch.long, device=x.device)
        noisy = schedule.add_noise(clean, candidates.randn(tuple(clean.shape)), timesteps)
        return -(candidates.denoise(noisy, t) - clean).pow(2).mean(-1)

    def __repr__(self) -> str:
        return f"DenoisingConsistency(level={self.level})"


class PlanSimilarity:
    """Cosine of a candidate to the plan its document is on. ``plans`` None: an LPCM's latest plan concept in the
    candidate's context (``Generator(break_vec=...)``; 0 before the first plan); else [documents, D] one plan per
    input document (steering any model towards a topic)."""

    def __init__(self, plans: Optional[Tensor] = None) -> None:
        if plans is not None and (not isinstance(plans, Tensor) or plans.dim() != 2):
            raise ValueError(f"PlanSimilarity.plans must be a [documents, dim] tensor, got {getattr(plans, 'shape', plans)}")
        self.plans = plans

    def check(self, model: torch.nn.Module, break_vec: Optional[Tensor]) -> None:
        if self.plans is None and break_vec is None:
            raise ValueError("beam_scorer 'plan' scores candidates by their LPCM plan: give the Generator the "
                             "break_vec of an LPCM, or use PlanSimilarity(plans) with one plan per document")
        if self.plans is not None and self.plans.shape[1] != model.sonar_dim:
            raise ValueError(f"PlanSimilarity.plans has dim {self.plans.shape[1]}, the model's sonar_embed_dim is "
                             f"{model.sonar_dim}")

    def __call__(self, candidates: Candidates) -> Tensor:
        x = candidates.concepts.float()
        if self.plans is None:
            plans, found = latest_plans(candidates.context, candidates.break_vec, candidates.break_threshold)
        else:
            if int(candidates.documents.max()) >= len(self.plans):
                raise ValueError(f"PlanSimilarity has {len(self.plans)} plans, the batch has document "
                                 f"{int(candidates.documents.max())}")
            plans = self.plans.to(x.device)[candidates.documents]
            found = torch.ones(len(x), dtype=torch.bool, device=x.device)
        return torch.where(found, F.cosine_similarity(x, plans.float(), dim=-1), 0.0)

    def __repr__(self) -> str:
        return "PlanSimilarity()" if self.plans is None else f"PlanSimilarity(plans of shape {list(self.plans.shape)})"


#: ``GenerationOptions.beam_scorer`` names
SCORERS: dict[str, Callable[[], Scorer]] = {"consistency": DenoisingConsistency, "plan": PlanSimilarity}


def resolve_scorer(spec: str | Scorer) -> Scorer:
    """A scorer from a name of :data:`SCORERS` or a callable (returned as is)."""
    if isinstance(spec, str):
        if spec not in SCORERS:
            raise ValueError(f"unknown beam_scorer '{spec}'; expected one of {sorted(SCORERS)} or a callable")
        return SCORERS[spec]()
    return spec


class BeamSearch:
    """The bookkeeping of beam search for the active documents of one generation call. Rows are document-major:
    document g's rows are ``[g * width, (g + 1) * width)``, beam b's candidates ``b * K .. b * K + K - 1`` of them.

    ``total`` [R]: the summed scores of the beam each row samples from; ``alive`` [R]: False for a dead beam's rows.
    :meth:`advance` consumes one sentence's scored candidates and says which rows continue."""

    def __init__(self, num_candidates: int, beam_size: int, documents: int, device: torch.device) -> None:
        self.K, self.B = num_candidates, beam_size
        self.width = num_candidates * beam_size
        rows = documents * self.width
        self.total = torch.zeros(rows, dtype=torch.float64)
        self.alive = torch.ones(rows, dtype=torch.bool)
        self.device = device
        #: per input document: its ended hypotheses as (mean score, [L, D] sequence)
        self.hypotheses: list[list[tuple[float, Tensor]]] = [[] for _ in range(documents)]

    def advance(self, seqs: Tensor, step: int, scores: Optional[Tensor], stop: Tensor, at_limit: Tensor,
                forced: Tensor, documents: Tensor, generated: Tensor, trim: Tensor) -> tuple[Tensor, Tensor, list[int]]:
        """One sentence: seqs [R, >= step + 1, D] (position ``step`` holds the candidates); scores [R] (None: every
        row teacher-forced); stop, at_limit, forced [R] bool (a candidate stops its document, the document reached
        max_gen_len, the row is in its prompt); documents [R] each row's input document; generated [R] the
        sentences generated with this one; trim [R] bool: drop the stopping sentence from its hypothesis.

        -> (index [R'] the rows the next step's rows copy, keep [R'] the rows of the documents still running (the
        noise's slots), the input documents that are done)."""
        W, K, B = self.width, self.K, self.B
        cand = self.total + (scores.double().cpu() if scores is not None else 0)
        cand[~self.alive] = -math.inf
        stop, at_limit, forced = stop.cpu(), at_limit.cpu(), forced.cpu()
        index, keep, total, alive, done = [], [], [], [], []
        for g in range(len(documents) // W):
            rows = range(g * W, (g + 1) * W)
            if bool(forced[g * W]):  # in its prompt: every row holds the prompt's sentence
                index += rows
                keep += rows
                total.append(self.total[g * W : (g + 1) * W])
                alive.append(self.alive[g * W : (g + 1) * W])
                continue
            doc = int(documents[g * W])
            order = [g * W + int(r) for r in torch.argsort(cand[g * W : (g + 1) * W], descending=True, stable=True)]
            order = [r for r in order if bool(self.alive[r])]
            going: list[int] = []
            for rank, r in enumerate(order):
                ends = bool(at_limit[r]) or bool(stop[r])
                if ends and rank < B:
                    length = step + 1 - int(bool(trim[r]) and bool(stop[r]))
                    self.hypotheses[doc].append((float(cand[r]) / int(generated[r]), seqs[r, :length].clone()))
                elif not ends and len(going) < B:
                    going.append(r)
            if len(self.hypotheses[doc]) >= B or not going:
                done.append(doc)
                continue
            for b in range(B):  # beam b continues from candidate going[b]; missing ones are dead copies
                parent = going[min(b, len(going) - 1)]
                index += [parent] * K
                total.append(torch.full((K,), float(cand[parent]), dtype=torch.float64))
                alive.append(torch.full((K,), b < len(going)))
            keep += rows
        if index:
            self.total, self.alive = torch.cat(total), torch.cat(alive)
        as_tensor = lambda rows: torch.tensor(rows, dtype=torch.long, device=self.device)  # noqa: E731
        return as_tensor(index), as_tensor(keep), done

    def best(self, doc: int) -> tuple[list[Tensor], Tensor]:
        """Document ``doc``'s (at most B) hypotheses best first ([L_i, D] each) and their scores [n] (mean sentence
        score)."""
        ranked = sorted(self.hypotheses[doc], key=lambda h: -h[0])[: self.B]
        return [seq for _, seq in ranked], torch.tensor([score for score, _ in ranked], dtype=torch.float64)
