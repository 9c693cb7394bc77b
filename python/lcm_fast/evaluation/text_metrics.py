"""Text metrics of generated continuations (paper sections 2.4.2 and 4.1).

Words are lowercased ``\\w+`` runs (no stemming). ROUGE-L is the LCS F-measure (Lin, 2004); OVL-3 the
fraction of the source's word 3-grams present in the output; REP-4 the fraction of the output's word
4-grams that repeat an earlier one (Welleck et al., 2019); the word-count ratio is output / reference.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def rouge_l(output: str, reference: str) -> float:
    """ROUGE-L F-measure of ``output`` against ``reference`` (0 when either has no words)."""
    a, b = words(output), words(reference)
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:  # LCS by dynamic programming, one row at a time
        row = [0]
        for j, y in enumerate(b, 1):
            row.append(prev[j - 1] + 1 if x == y else max(prev[j], row[j - 1]))
        prev = row
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def ovl3(source: str, output: str) -> float:
    """OVL-3: the fraction of the source's word 3-grams that appear in the output."""
    src = set(_ngrams(words(source), 3))
    return len(src & set(_ngrams(words(output), 3))) / len(src) if src else 0.0


def rep4(output: str) -> float:
    """REP-4: the fraction of the output's word 4-grams that duplicate an earlier one."""
    grams = _ngrams(words(output), 4)
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def word_count_ratio(output: str, reference: str) -> float:
    """Words of the output per word of the reference."""
    ref = len(words(reference))
    return len(words(output)) / ref if ref else float("nan")


def text_metrics(output: str, reference: str, source: str) -> dict[str, float]:
    """{rouge_l, ovl3, rep4, word_ratio} of one generated text."""
    return {"rouge_l": rouge_l(output, reference), "ovl3": ovl3(source, output), "rep4": rep4(output),
            "word_ratio": word_count_ratio(output, reference)}
