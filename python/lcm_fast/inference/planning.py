"""The Large Planning Concept Model's structure in generated sequences (paper section 4.3).

An LPCM (``lcm-fast train --variant lpcm``) writes *break* concepts at paragraph ends and a *plan* concept, what the
next paragraph is about, after each break. A generated concept is a break when its cosine to the dataset's break
concept (``lpcm.pt`` of ``lcm-fast prepare --paragraphs``) reaches a threshold; the concept after a break is its
plan. Text outputs show the sentences only; the raw sequences keep every concept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SENTENCE, BREAK, PLAN = 0, 1, 2
ROLE_NAMES = ("sentence", "break", "plan")  # by role


def _roles(sequences: Tensor, break_vec: Tensor, threshold: float) -> Tensor:
    """sequences: [..., L, D] -> int8 [..., L] roles (see :func:`concept_roles`)."""
    is_break = F.cosine_similarity(sequences.float(), break_vec.float().to(sequences.device), dim=-1) >= threshold
    after = F.pad(is_break[..., :-1], (1, 0))
    roles = torch.full(is_break.shape, SENTENCE, dtype=torch.int8, device=sequences.device)
    roles[after & ~is_break] = PLAN
    roles[is_break] = BREAK
    return roles


def concept_roles(sequence: Tensor, break_vec: Tensor, threshold: float) -> Tensor:
    """sequence: [L, D]; break_vec: [D] -> int8 [L] (on the CPU): ``BREAK`` where cos(concept, break_vec) >= threshold,
    ``PLAN`` for a concept right after a break (and not one itself), ``SENTENCE`` otherwise."""
    return _roles(sequence, break_vec, threshold).cpu()


def latest_plans(sequences: Tensor, break_vec: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """The plan each sequence is on: sequences [R, L, D] -> (plans [R, D], found [R] bool); a row without a plan yet
    gets its first concept and ``found`` False."""
    is_plan = _roles(sequences, break_vec, threshold) == PLAN  # [R, L]
    positions = torch.arange(sequences.shape[1], device=sequences.device)
    last = torch.where(is_plan, positions, -1).amax(-1)  # [R]
    found = last >= 0
    return sequences[torch.arange(len(sequences), device=sequences.device), last.clamp(min=0)], found
