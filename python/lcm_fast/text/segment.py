"""Sentence segmentation with the paper's length cap (section 2.2: sentences over 200 characters are split).

Base splitter: SaT (wtpsplit, "Segment any Text") when a SaT model directory is configured
(``sat_model=`` or ``LCM_FAST_SAT_MODEL``: it is never downloaded), else blingfire when importable (its
model ships inside the wheel; x86-64), else a regex over terminal punctuation with an abbreviation list. A sentence longer than ``max_chars`` is split at the
separator nearest its middle, trying the strongest separator class first (sentence punctuation, line
breaks, ``;``, ``,``, ``:``, whitespace) and only at points that leave both pieces at least
``max_chars // 4`` long; text without such a point is cut at the middle. Splitting recurses until every
piece fits, so no piece of a capped sentence is ever a stub of a few characters.

Every segment keeps its span in the source: ``text[seg.start:seg.end] == seg.text``.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

BACKENDS = ("auto", "sat", "blingfire", "regex")
#: a local SaT model directory (e.g. a download of segment-any-text/sat-3l-sm) turns SaT on for ``auto``
SAT_MODEL_ENV = "LCM_FAST_SAT_MODEL"
MAX_CHARS = 200

_TERMINAL = ".!?。！？।؟…"
# a sentence ends after terminal punctuation (plus closing quotes/brackets) followed by whitespace, or
# right after CJK full stops; not after common abbreviations or single initials
_SENTENCE_END = re.compile(r"[.!?…؟।]+[\"'”’)\]]*(?=\s)|[。！？]+[\"'”’)\]」』]*")
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc e.g i.e cf al fig no vol ch sec approx dept est inc ltd co corp jan feb mar apr "
    "jun jul aug sep sept oct nov dec mt ft".split())
# split-point classes for capping, strongest first
_SEPARATORS = (re.compile(r"[.!?…。！？؟।]+[\"'”’)\]]*\s*"), re.compile(r"\n+\s*"), re.compile(r";\s*"),
               re.compile(r",\s*"), re.compile(r":\s*"), re.compile(r"\s+"))


@dataclass(frozen=True)
class Segment:
    """One sentence (or capped piece): ``text == source[start:end]``, stripped of surrounding whitespace."""

    text: str
    start: int
    end: int


def _blingfire_spans(text: str) -> Optional[list[tuple[int, int]]]:
    try:
        import blingfire
    except (ImportError, OSError):  # OSError: the bundled .so is x86-64 only
        return None
    if not text.strip():
        return []
    _, offsets = blingfire.text_to_sentences_and_offsets(text)
    # from sentence starts to the next start, so that no character of the source is dropped
    bounds = [0] + [int(a) for a, _ in offsets[1:]] + [len(text)]
    return list(zip(bounds[:-1], bounds[1:]))


@functools.lru_cache(maxsize=2)
def _sat(model_dir: str):
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"no SaT model directory at {model_dir} (download e.g. segment-any-text/sat-3l-sm "
                                f"there, with the facebookAI/xlm-roberta-base tokenizer in the Hugging Face cache)")
    try:
        from wtpsplit import SaT
    except ImportError:
        raise ImportError("the SaT segmentation backend needs wtpsplit: pip install wtpsplit") from None
    return SaT(model_dir)


def _sat_spans(text: str, model_dir: str) -> list[tuple[int, int]]:
    if not text.strip():
        return []
    pieces = _sat(model_dir).split(text)  # unstripped: the pieces concatenate to the text
    bounds = list(itertools.accumulate((len(p) for p in pieces), initial=0))
    if bounds[-1] != len(text):
        raise RuntimeError("SaT returned segments that do not concatenate to the input text")
    return list(zip(bounds[:-1], bounds[1:]))


def _regex_spans(text: str) -> list[tuple[int, int]]:
    spans, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        end = match.end()
        word = re.search(r"(\S+)$", text[start:match.start() + 1])
        token = word.group(1).lower().rstrip(".") if word else ""
        if match.group().startswith(".") and (token in _ABBREVIATIONS or re.fullmatch(r"[a-z]", token)):
            continue
        spans.append((start, end))
        start = end
    spans.append((start, len(text)))
    return spans


def _strip(text: str, start: int, end: int) -> Optional[tuple[int, int]]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if end > start else None


def _cap(text: str, start: int, end: int, max_chars: int) -> list[tuple[int, int]]:
    """Splits text[start:end] into pieces of at most max_chars, balanced (see the module docstring)."""
    if end - start <= max_chars:
        return [(start, end)]
    min_piece = max(1, max_chars // 4)
    middle = (start + end) / 2
    cut = None
    for separator in _SEPARATORS:
        points = [m.end() for m in separator.finditer(text, start, end)]
        # both pieces, stripped, must keep at least min_piece characters
        points = [p for p in points
                  if len(text[start:p].rstrip()) >= min_piece and len(text[p:end].lstrip()) >= min_piece]
        if points:
            cut = min(points, key=lambda p: (abs(p - middle), p))
            break
    if cut is None:
        cut = int(middle)
    pieces = []
    for a, b in ((start, cut), (cut, end)):
        span = _strip(text, a, b)
        if span is not None:
            pieces += _cap(text, *span, max_chars)
    return pieces


def segment_spans(text: str, max_chars: int = MAX_CHARS, backend: str = "auto",
                  sat_model: Optional[str | Path] = None) -> list[Segment]:
    """Sentences of ``text`` with their spans, each at most ``max_chars`` characters.

    backend: ``auto`` (SaT when a model directory is configured, else blingfire when importable, else
    regex), ``sat``, ``blingfire`` or ``regex``. sat_model: the SaT model directory (default: the
    ``LCM_FAST_SAT_MODEL`` environment variable).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown segmentation backend {backend!r}; expected one of {BACKENDS}")
    if max_chars < 4:
        raise ValueError(f"max_chars must be >= 4, got {max_chars}")
    sat_model = sat_model or os.environ.get(SAT_MODEL_ENV)
    if backend == "sat" and not sat_model:
        raise ValueError(f"the SaT segmentation backend needs a local model directory: pass sat_model= or set "
                         f"{SAT_MODEL_ENV}")
    spans = None
    if backend in ("auto", "sat") and sat_model:  # configured explicitly: errors are raised, not skipped
        spans = _sat_spans(text, str(sat_model))
    if spans is None and backend in ("auto", "blingfire"):
        spans = _blingfire_spans(text)
        if spans is None and backend == "blingfire":
            raise ImportError("the blingfire segmentation backend needs blingfire (pip install blingfire; x86-64)")
    if spans is None:
        spans = _regex_spans(text)
    out = []
    for a, b in spans:
        span = _strip(text, a, b)
        if span is not None:
            out += [Segment(text[s:e], s, e) for s, e in _cap(text, *span, max_chars)]
    return out


def segment(text: str, max_chars: int = MAX_CHARS, backend: str = "auto",
            sat_model: Optional[str | Path] = None) -> list[str]:
    """The sentences of ``text`` (see :func:`segment_spans`)."""
    return [s.text for s in segment_spans(text, max_chars, backend, sat_model)]
