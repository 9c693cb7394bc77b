"""Builds python/lcm_fast/data/corpus/jargon.jsonl, one source of the offline corpus: a cleaned excerpt of
the Jargon File 4.4.7 (public domain; Eric S. Raymond et al.), one lexicon entry per line ({"title", "text"}).

Source: Debian's jargon-text package (`apt-get download jargon-text && dpkg-deb -x jargon-text_*.deb x`,
then x/usr/share/doc/jargon-text/jargon.txt.gz). Cleaning: entries are the ":headword: ..." blocks of the
lexicon; the pronunciation line, sense numbers, bracketed etymologies and {cross-reference} braces are
removed and the paragraphs of an entry joined. Entries with fewer than 3 sentences are skipped; entries
are taken in lexicon order until the excerpt reaches --max-bytes.

    python scripts/jargon_excerpt.py PATH/jargon.txt.gz python/lcm_fast/data/corpus/jargon.jsonl
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
from lcm_fast.text import segment  # noqa: E402

HEAD = re.compile(r"^   :(?P<title>[^:]+):(?P<rest>.*)$")


def entries(text: str):
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if HEAD.match(line))
    title, body = None, []
    for line in lines[start:] + ["   :END:"]:
        match = HEAD.match(line)
        if match:
            if title is not None:
                yield title, body
            title, body = match.group("title"), []
        elif line.startswith("Appendix") or line.startswith("Bibliography"):
            break
        else:
            body.append(line.strip())


def clean(body: list[str]) -> str:
    paragraphs, current = [], []
    for line in body + [""]:
        if line:
            current.append(line)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    out = []
    for p in paragraphs:
        p = re.sub(r"^\[[^\]]*\]\s*", "", p)       # bracketed etymology / source tag
        p = re.sub(r"^\d+\.\s+", "", p)            # sense number
        p = re.sub(r"[{}]", "", p)                 # {cross-reference} braces
        p = re.sub(r"\s+", " ", p).strip()
        if p and not p.startswith("See ") and not p.startswith("Prev ") and "---" not in p:
            out.append(p)
    return " ".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="jargon.txt.gz (or .txt) from Debian's jargon-text 4.4.7")
    parser.add_argument("output")
    parser.add_argument("--max-bytes", type=int, default=300_000)
    args = parser.parse_args()
    raw = gzip.open(args.source, "rt", encoding="utf-8").read() if args.source.endswith(".gz") else \
        Path(args.source).read_text(encoding="utf-8")
    rows, size = [], 0
    for title, body in entries(raw):
        text = clean(body)
        if len(segment(text)) < 3:
            continue
        line = json.dumps({"title": title.strip(), "text": text}, ensure_ascii=False)
        if size + len(line) + 1 > args.max_bytes:
            break
        rows.append(line)
        size += len(line.encode()) + 1
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(rows) + "\n", encoding="utf-8")
    print(f"{len(rows)} entries, {size} bytes -> {args.output}")


if __name__ == "__main__":
    main()
