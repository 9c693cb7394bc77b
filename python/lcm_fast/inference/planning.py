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


def concept_roles(sequence: Tensor, break_vec: Tensor, threshold: float) -> Tensor:
    """sequence: [L, D]; break_vec: [D] -> int8 [L]: ``BREAK`` where cos(concept, break_vec) >= threshold, ``PLAN``
    for a concept right after a break (and not one itself), ``SENTENCE`` otherwise."""
    is_break = F.cosine_similarity(sequence.float(), break_vec.float().to(sequence.device)[None], dim=-1) >= threshold
    after = torch.cat((is_break.new_zeros(1), is_break[:-1]))
    roles = torch.full(is_break.shape, SENTENCE, dtype=torch.int8, device=sequence.device)
    roles[after & ~is_break] = PLAN
    roles[is_break] = BREAK
    return roles.cpu()
