"""Sentence segmentation with the paper's length cap (appendix A: sentences over 200 characters are split).

Base splitter: blingfire when importable (its model ships inside the wheel; x86-64), else a regex over
terminal punctuation with an abbreviation list. A sentence longer than ``max_chars`` is split at the
separator nearest its middle, trying the strongest separator class first (sentence punctuation, line
breaks, ``;``, ``,``, ``:``, whitespace) and only at points that leave both pieces at least
``max_chars // 4`` long; text without such a point is cut at the middle. Splitting recurses until every
piece fits, so no piece of a capped sentence is ever a stub of a few characters.

Every segment keeps its span in the source: ``text[seg.start:seg.end] == seg.text``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

BACKENDS = ("auto", "blingfire", "regex")
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


def segment_spans(text: str, max_chars: int = MAX_CHARS, backend: str = "auto") -> list[Segment]:
    """Sentences of ``text`` with their spans, each at most ``max_chars`` characters.

    backend: ``auto`` (blingfire when importable, else regex), ``blingfire`` or ``regex``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown segmentation backend {backend!r}; expected one of {BACKENDS}")
    if max_chars < 4:
        raise ValueError(f"max_chars must be >= 4, got {max_chars}")
    spans = None
    if backend in ("auto", "blingfire"):
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


def segment(text: str, max_chars: int = MAX_CHARS, backend: str = "auto") -> list[str]:
    """The sentences of ``text`` (see :func:`segment_spans`)."""
    return [s.text for s in segment_spans(text, max_chars, backend)]
