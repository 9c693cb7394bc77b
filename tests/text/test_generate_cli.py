"""`lcm-fast generate` with the shipped demo model: offline, text in, text out (with similarities)."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from lcm_fast.text import RetrievalDecoder, segment
from lcm_fast.text.pipeline import DEMO_DIR

PROMPT = "A hacker is a person who enjoys exploring the details of programmable systems. Crashes are no fun."


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lcm_fast", "generate", *args], capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=300)


def test_demo_generates_text_offline():
    result = _run(PROMPT, "--json", "--sentences", "2")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["prompt"] == segment(PROMPT) and len(out["sentences"]) == 2
    bank = RetrievalDecoder.load(DEMO_DIR / "bank")
    for sentence in out["sentences"]:
        assert sentence["text"] in bank.sentences and -1.0 <= sentence["similarity"] <= 1.0
    plain = _run(PROMPT, "--sentences", "2", "--bank-index", "torch")  # another exact search
    assert plain.returncode == 0 and plain.stdout.splitlines() == [
        f"[{s['similarity']:.2f}] {s['text']}" for s in out["sentences"]]  # same seed, same sentences


def test_demo_generates_in_bfloat16():
    result = _run(PROMPT, "--json", "--sentences", "2", "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    bank = RetrievalDecoder.load(DEMO_DIR / "bank")
    assert [s["text"] in bank.sentences for s in json.loads(result.stdout)["sentences"]] == [True, True]


def test_generate_errors(tmp_path):
    assert "is not a model directory" in _run(PROMPT, "--model", str(tmp_path)).stderr
    RetrievalDecoder(["one.", "two."], torch.randn(2, 16)).save(tmp_path / "bank16")
    wrong = _run(PROMPT, "--decoder", str(tmp_path / "bank16"))
    assert wrong.returncode != 0 and "the decoder on 16-d ones" in wrong.stderr
    empty = _run("   ")
    assert empty.returncode != 0 and "no sentences" in empty.stderr


DOMAIN_PROMPTS = {
    "jargon": PROMPT,
    "kjv": "In the beginning the king gathered his servants. They went out to the field.",
    "python_docs": "A class definition creates a new type. Its methods take self as the first argument.",
}


def test_demo_continues_each_domain_in_kind_and_seeds_differ():
    """The demo is trained on three domains (lcm_fast.text.corpus): a prompt's first generated sentence comes from
    its own domain's sentences, and five seeds do not all give the same sentence (bench/RESULTS.md measures both)."""
    import lcm_fast
    from lcm_fast.text import load_encoder
    from lcm_fast.text.corpus import load_corpus
    from lcm_fast.text.pipeline import continue_text

    model, encoder = lcm_fast.from_pretrained(DEMO_DIR), load_encoder("minilm")
    decoder = RetrievalDecoder.load(DEMO_DIR / "bank")
    for source, prompt in DOMAIN_PROMPTS.items():
        own = {s for doc in load_corpus([source]) for s in segment(doc.text)}
        firsts = [continue_text(prompt, model, encoder, decoder, n_sentences=1,
                                options=lcm_fast.GenerationOptions.recommended(seed=seed))["sentences"][0]["text"]
                  for seed in range(5)]
        assert all(text in own for text in firsts), (source, firsts)
        assert len(set(firsts)) > 1, (source, firsts)
