"""An offline corpus of several domains: the shipped public-domain excerpts and Python's own reference prose.

Sources (``SOURCES``), each a list of multi-sentence documents:

- ``jargon``: entries of the Jargon File 4.4.7 (hacker slang and computing culture; public domain), shipped;
- ``kjv``: chapters of the King James Bible (narrative, law, poetry, wisdom, letters; public domain), shipped;
- ``python_docs``: sections of the Python language reference as every CPython carries it
  (``pydoc_data.topics``; PSF licence), with grammar and code blocks removed. It varies a little with the
  Python version, so a run that must be exactly repeatable names the other sources only.

The shipped excerpts are built by ``scripts/jargon_excerpt.py`` and ``scripts/kjv_excerpt.py``
(``data/corpus/ATTRIBUTION.md``). The demo model is trained on this corpus (``scripts/make_demo.py``).
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

CORPUS_DIR = Path(__file__).resolve().parents[1] / "data" / "corpus"
SOURCES = ("jargon", "kjv", "python_docs")
_UNDERLINE = re.compile(r"^[*=\-~^\"]{3,}$")
_CODE_MARKS = ("::=", ">>>")  # grammar rules and the few unindented interactive sessions


@dataclass(frozen=True)
class Document:
    """One document: its source (a name of ``SOURCES``), a title unique within the source, and its text."""

    source: str
    title: str
    text: str

    @property
    def held_out(self) -> bool:
        """True for about one document in 20, chosen by a hash of the title: the same split on every machine."""
        return zlib.crc32(f"{self.source}/{self.title}".encode()) % 20 == 0


def _shipped(source: str) -> list[Document]:
    with open(CORPUS_DIR / f"{source}.jsonl", encoding="utf-8") as f:
        return [Document(source, row["title"], row["text"]) for row in map(json.loads, f) if row["text"].strip()]


def _python_docs(paragraph_separator: str = " ") -> list[Document]:
    """One document per section of each reference topic: its unindented prose paragraphs, lines joined, paragraphs
    joined by ``paragraph_separator`` ("\n\n" keeps them apart: the LPCM ablation's paragraphs)."""
    from pydoc_data.topics import topics

    docs = []
    for topic, body in sorted(topics.items()):
        lines = body.splitlines() + [""]
        title, paragraphs, current = topic, [], []
        for i, line in enumerate(lines):
            heading = i + 1 < len(lines) and _UNDERLINE.match(lines[i + 1].strip() or "-")
            if _UNDERLINE.match(line.strip()) or (heading and line.strip() and not line[0].isspace()):
                if heading:
                    if paragraphs:
                        docs.append(Document("python_docs", title, paragraph_separator.join(paragraphs)))
                    title, paragraphs = f"{topic}: {line.strip()}", []
                continue
            if line and not line[0].isspace():
                current.append(line.strip())
                continue
            if current:  # a blank or indented line ends a prose paragraph; indented blocks are code or grammar
                paragraph = " ".join(current)
                if len(paragraph) >= 40 and not any(mark in paragraph for mark in _CODE_MARKS):
                    paragraphs.append(paragraph)
                current = []
        if paragraphs:
            docs.append(Document("python_docs", title, paragraph_separator.join(paragraphs)))
    return docs


def load_corpus(sources: Sequence[str] = SOURCES) -> list[Document]:
    """The documents of ``sources``, source by source in the order given, each in its own order."""
    unknown = sorted(set(sources) - set(SOURCES))
    if unknown:
        raise ValueError(f"unknown corpus source(s) {unknown}; known: {list(SOURCES)}")
    return [doc for source in sources for doc in (_python_docs() if source == "python_docs" else _shipped(source))]
