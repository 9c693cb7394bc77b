"""lcm_fast.text.segment: the cap, source fidelity, no stubs, both backends."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lcm_fast.text import segment, segment_spans

BACKENDS = ["blingfire", "regex"]
_words = st.text(alphabet="abcdefghij", min_size=1, max_size=14)
_seps = st.sampled_from([" ", " ", " ", ", ", ". ", "; ", "! ", "? ", "\n", ": ", "。", "... ", "  "])
texts = st.lists(st.tuples(_words, _seps), max_size=120).map(lambda parts: "".join(w + s for w, s in parts))


def _squash(s: str) -> str:
    return re.sub(r"\s+", "", s)


@settings(max_examples=150, deadline=None)
@given(text=texts, max_chars=st.sampled_from([20, 50, 200]), backend=st.sampled_from(BACKENDS))
def test_properties(text, max_chars, backend):
    segs = segment_spans(text, max_chars, backend)
    assert all(len(s.text) <= max_chars for s in segs)  # the cap
    assert all(text[s.start:s.end] == s.text and s.text == s.text.strip() and s.text for s in segs)  # spans
    assert "".join(_squash(s.text) for s in segs) == _squash(text)  # nothing lost, nothing reordered
    # capping never leaves stubs: a piece shorter than max_chars // 4 is a whole base sentence
    whole = {(s.start, s.end) for s in segment_spans(text, 10**9, backend)}
    assert all(len(s.text) >= max_chars // 4 or (s.start, s.end) in whole for s in segs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sentences(backend):
    text = "Dr. Smith went to Washington. He said \"hi!\" Then he left... 你好。世界！ The end."
    assert segment(text, backend=backend) == ["Dr. Smith went to Washington.", 'He said "hi!"', "Then he left...",
                                              "你好。", "世界！", "The end."]
    assert segment("", backend=backend) == [] and segment(" \n\t ", backend=backend) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_sentences_split_near_the_middle_at_the_strongest_separator(backend):
    left, right = "a" * 120, "b" * 120
    assert segment(f"{left}, {right}", 200, backend) == [f"{left},", right]
    assert segment(f"x, {left} {right}", 200, backend) == [f"x, {left}", right]  # the comma would leave a stub
    assert [len(s) for s in segment("z" * 450, 200, backend)] == [112, 113, 112, 113]  # no separator: halves


def test_errors():
    with pytest.raises(ValueError, match="unknown segmentation backend"):
        segment("a.", backend="spacy")
    with pytest.raises(ValueError, match="max_chars"):
        segment("a.", max_chars=2)


def test_sat_backend_is_only_used_with_a_local_model(tmp_path, monkeypatch):
    """SaT needs a configured model directory (never downloaded); a configured one that cannot be used
    is an error, not a silent fallback. (No SaT model exists offline here: only these paths run.)"""
    monkeypatch.delenv("LCM_FAST_SAT_MODEL", raising=False)
    with pytest.raises(ValueError, match="needs a local model directory"):
        segment("One. Two.", backend="sat")
    assert segment("One. Two.") == ["One.", "Two."]  # auto without a model: blingfire
    monkeypatch.setenv("LCM_FAST_SAT_MODEL", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no SaT model directory"):
        segment("One. Two.")
    try:
        import wtpsplit  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install wtpsplit"):
            segment("One. Two.", backend="sat", sat_model=tmp_path)
