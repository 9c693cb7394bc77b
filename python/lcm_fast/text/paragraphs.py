"""Paragraph structure for the Large Planning Concept Model (LPCM, paper section 4.3).

A document becomes paragraphs of sentences: its blank lines where it has them, else SaT's paragraph splitter when
a SaT model is configured (``LCM_FAST_SAT_MODEL``), else its single line breaks, else near-equal groups of at most
``FALLBACK_SENTENCES`` sentences. Then the paper's rules: a paragraph holds at most ``MAX_SENTENCES`` sentences
(a longer one is split into near-equal parts) and a run of one-sentence paragraphs is merged into one.

The LPCM reads a document as ``p1 BREAK PLAN(p2) p2 BREAK PLAN(p3) p3 ... pn BREAK``: a *break* concept after
every paragraph and a *plan* concept, which says what the next paragraph is about, before every paragraph that
follows a break. Each concept carries a role (:mod:`lcm_fast.inference.planning`): sentence, break or plan.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..inference.planning import BREAK, PLAN, SENTENCE
from .segment import SAT_MODEL_ENV, _sat, segment

MAX_SENTENCES = 10  # the paper: "less than 10 sentences"
FALLBACK_SENTENCES = 5
#: the break concept is the encoder's embedding of this text, a typographic section break (a "dinkus"): a real
#: point of the embedding space with the norm statistics of sentences, decodable, and far from prose
BREAK_TEXT = "* * *"
PLAN_SOURCES = ("extractive", "mean", "text")
#: the plan sources computed from the paragraph itself (``text`` comes with the data)
COMPUTED_PLANS = ("extractive", "mean")


def _paragraph_texts(text: str) -> list[str]:
    blocks = [b for b in re.split(r"\n\s*\n", text) if b.strip()]
    if len(blocks) > 1:
        return blocks
    sat_model = os.environ.get(SAT_MODEL_ENV)
    if sat_model:
        paragraphs = _sat(sat_model).split(text, do_paragraph_segmentation=True)
        return [" ".join(sentences) for sentences in paragraphs if "".join(sentences).strip()]
    return [line for line in text.splitlines() if line.strip()]


def _near_equal(items: list, size: int) -> list[list]:
    parts = -(-len(items) // size)
    bounds = [round(i * len(items) / parts) for i in range(parts + 1)]
    return [items[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def apply_rules(paragraphs: Sequence[Sequence[str]], max_sentences: int = MAX_SENTENCES) -> list[list[str]]:
    """The paper's rules: paragraphs over ``max_sentences`` split into near-equal parts; runs of one-sentence
    paragraphs merged (into parts of at most ``max_sentences``). Empty paragraphs are dropped."""
    out: list[list[str]] = []
    run: list[str] = []  # consecutive one-sentence paragraphs
    for paragraph in [list(p) for p in paragraphs if p] + [[]]:
        if len(paragraph) == 1:
            run += paragraph
            continue
        if run:
            out += _near_equal(run, max_sentences)
            run = []
        if paragraph:
            out += _near_equal(paragraph, max_sentences)
    return out


def split_paragraphs(text: str, max_chars: int = 200, max_sentences: int = MAX_SENTENCES) -> list[list[str]]:
    """The paragraphs of ``text`` as lists of sentences (capped at ``max_chars``), after :func:`apply_rules`."""
    paragraphs = [p for p in (segment(block, max_chars) for block in _paragraph_texts(text)) if p]
    if len(paragraphs) == 1 and len(paragraphs[0]) > FALLBACK_SENTENCES:  # no structure found: groups of sentences
        paragraphs = _near_equal(paragraphs[0], FALLBACK_SENTENCES)
    return apply_rules(paragraphs, max_sentences)


def central_sentence(embeddings: Tensor) -> int:
    """embeddings: [n, D] of one paragraph -> the index of its most central sentence (the highest mean cosine to
    the paragraph's sentences; the first on ties): the ``extractive`` plan of that paragraph."""
    unit = F.normalize(embeddings.float(), dim=-1)
    return int((unit @ unit.T).mean(1).argmax())


def computed_plan(embeddings: Tensor, source: str) -> tuple[Tensor, int]:
    """The plan of a paragraph from its sentences, embeddings [n, D] -> (plan [D], the index of the sentence whose
    text stands for it). ``extractive``: its :func:`central_sentence`. ``mean``: the mean of its sentences rescaled to
    their mean norm (an abstract of the paragraph that copies none of its sentences), text: the central sentence."""
    c = central_sentence(embeddings)
    if source == "extractive":
        return embeddings[c], c
    if source != "mean":
        raise ValueError(f"unknown computed plan source {source!r}; expected one of {COMPUTED_PLANS}")
    mean = embeddings.float().mean(0)
    return (mean * embeddings.float().norm(dim=-1).mean() / mean.norm().clamp_min(1e-12)).to(embeddings.dtype), c


def load_break(path: str | Path) -> Tensor:
    """The break concept [D] stored with paragraph-structured data (``DIR/lpcm.pt`` of ``prepare --paragraphs``)."""
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a missing, truncated or foreign file
        raise ValueError(f"{path} is not the lpcm.pt of `lcm-fast prepare --paragraphs` ({type(e).__name__}: {e})") from e
    if not isinstance(stored, dict) or not isinstance(stored.get("break"), Tensor) or stored["break"].dim() != 1:
        raise ValueError(f"{path} is not the lpcm.pt of `lcm-fast prepare --paragraphs` (no 'break' vector)")
    return stored["break"].float()


@dataclass
class Structured:
    """One LPCM document: embeddings [L, D], roles [L] int8 (``SENTENCE``, ``BREAK``, ``PLAN``), texts [L]."""

    embeddings: Tensor
    roles: Tensor
    texts: list[str]


def structure(paragraphs: Sequence[Sequence[str]], embeddings: Tensor, break_embedding: Tensor,
              plans: Optional[tuple[Sequence[str], Tensor]] = None, plan_source: str = "extractive") -> Structured:
    """``p1 BREAK PLAN(p2) p2 ... pn BREAK``. embeddings: [sum of paragraph lengths, D] of the sentences in order;
    break_embedding: [D]; plans: (texts, [n, D] embeddings), one per paragraph (the first one's is unused), or None
    for plans computed from each paragraph by ``plan_source`` (:func:`computed_plan`)."""
    sizes = [len(p) for p in paragraphs]
    if sum(sizes) != embeddings.shape[0]:
        raise ValueError(f"{sum(sizes)} sentences but {embeddings.shape[0]} embeddings")
    if plans is not None and len(plans[0]) != len(paragraphs):
        raise ValueError(f"{len(plans[0])} plans for {len(paragraphs)} paragraphs")
    rows, roles, texts = [], [], []
    for k, (paragraph, emb) in enumerate(zip(paragraphs, embeddings.split(sizes))):
        if k > 0:
            if plans is None:
                plan, c = computed_plan(emb, plan_source)
                rows.append(plan[None]), texts.append(paragraph[c])
            else:
                rows.append(plans[1][k : k + 1]), texts.append(plans[0][k])
            roles.append(PLAN)
        rows.append(emb), texts.extend(paragraph), roles.extend([SENTENCE] * len(paragraph))
        rows.append(break_embedding[None].to(emb)), texts.append(BREAK_TEXT), roles.append(BREAK)
    return Structured(torch.cat(rows), torch.tensor(roles, dtype=torch.int8), texts)
