"""The offline corpus: every source loads, the held-out split is stable, Python's prose carries no code."""

import pytest

from lcm_fast.text.corpus import SOURCES, load_corpus


@pytest.fixture(scope="module")
def corpus():
    return {source: load_corpus([source]) for source in SOURCES}


def test_every_source_has_titled_documents_with_unique_titles(corpus):
    for source, docs in corpus.items():
        assert len(docs) >= 100, source
        assert all(doc.source == source and doc.title and doc.text.strip() for doc in docs)
        assert len({doc.title for doc in docs}) == len(docs), f"{source} repeats a title"


def test_the_held_out_split_is_a_fixed_small_share_of_each_source(corpus):
    for source, docs in corpus.items():
        held = [doc for doc in docs if doc.held_out]
        assert 0 < len(held) < len(docs) / 8, source
    # a hash of source/title, not of the process: these documents are held out on every machine
    assert "Genesis 1" in {doc.title for doc in corpus["kjv"] if doc.held_out}


def test_python_docs_are_prose_without_grammar_or_code(corpus):
    for doc in corpus["python_docs"]:
        assert "::=" not in doc.text and ">>>" not in doc.text, doc.title


def test_sources_come_in_the_order_asked():
    both = load_corpus(["kjv", "jargon"])
    assert both[0].source == "kjv" and both[-1].source == "jargon"


def test_an_unknown_source_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown corpus source\(s\) \['wiki'\]; known: \['jargon', 'kjv', 'python_docs'\]"):
        load_corpus(["jargon", "wiki"])
