"""Builds python/lcm_fast/data/corpus/kjv.jsonl: chapters of the King James Version of the Bible (1611, public
domain), one chapter per line ({"title": "Ruth 1", "text": ...}), from books chosen for the variety of their
prose: narrative, law, poetry, wisdom, prophecy, gospel and letters.

Source: Debian's bible-kjv and bible-kjv-text packages (`apt-get download bible-kjv bible-kjv-text`, then
`dpkg-deb -x` both into X); the `bible` program of bible-kjv reads the compressed text. Verse numbers are
dropped and the verses of a chapter joined. The first --chapters of each book below are taken, in this
order, until the excerpt reaches --max-bytes.

    python scripts/kjv_excerpt.py X python/lcm_fast/data/corpus/kjv.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path

BOOKS = ("Genesis", "Mark", "Proverbs", "Ruth", "Acts", "Ecclesiastes", "Job", "Luke", "Esther", "Romans", "Jonah",
         "Daniel", "James", "1Samuel", "Psalms", "Exodus", "1Corinthians")
VERSE = re.compile(r"^(?P<book>\S+?)(?P<chapter>\d+):(?P<verse>\d+) (?P<text>.*)$")


def chapters(root: Path, book: str):
    """(chapter number, text) of every chapter of ``book``, verses joined."""
    out = subprocess.run([str(root / "usr/bin/bible"), "-p", str(root / "usr/lib"), "-f", f"{book}1:1-150:999"],
                         check=True, capture_output=True, text=True).stdout
    current, verses = None, []
    for line in out.splitlines():
        match = VERSE.match(line)
        if not match:
            continue
        if match["chapter"] != current and verses:
            yield int(current), " ".join(verses)
            verses = []
        current = match["chapter"]
        verses.append(match["text"].strip())
    if verses:
        yield int(current), " ".join(verses)


def title(book: str) -> str:
    return re.sub(r"^(\d)", r"\1 ", book)  # 1Samuel -> 1 Samuel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="directory holding usr/bin/bible and usr/lib/bible.data (the extracted .debs)")
    parser.add_argument("output")
    parser.add_argument("--max-bytes", type=int, default=600_000)
    parser.add_argument("--chapters", type=int, default=12, help="chapters per book")
    args = parser.parse_args()
    lines = (json.dumps({"title": f"{title(book)} {number}", "text": text}, ensure_ascii=False)
             for book in BOOKS for number, text in chapters(Path(args.root), book) if number <= args.chapters)
    rows, size = [], 0
    for line in lines:
        if size + len(line.encode()) + 1 > args.max_bytes:
            break
        rows.append(line)
        size += len(line.encode()) + 1
    Path(args.output).write_text("\n".join(rows) + "\n", encoding="utf-8")
    print(f"{len(rows)} chapters, {size} bytes -> {args.output}")


if __name__ == "__main__":
    main()
