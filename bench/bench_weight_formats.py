"""Weight formats of the decode step on a trained model: quality (and the time of the same generations).

Run: ``python -m pytest bench/bench_weight_formats.py --benchmark-json=formats.json``.

The shipped demo model (a Two-Tower trained by lcm_fast, d 192, on lcm_fast.text.corpus) continues the held-out
documents of the corpus (the split the demo never saw, at most ``DOCS``, prompts of ``PROMPT`` sentences encoded
with its MiniLM encoder) by ``SENTENCES`` sentences with the paper's sampling and one seed, in each format: fp32,
bf16, fp32 activations with int8 weights, bf16 activations with int8 weights. ``extra_info`` per format: the mean
l2 distance and cosine of the generated concepts to the document's true next sentences (``l2_next``,
``cos_next``: generation's analogue of the paper's l2, in raw embedding space; the paper's CA ranks teacher-forced
predictions, which no weight format of the decode step changes), and the minimum and mean cosine to the fp32
concepts.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F

import lcm_fast
from lcm_fast.text import load_encoder, segment
from lcm_fast.text.corpus import load_corpus
from lcm_fast.text.pipeline import DEMO_DIR

DOCS, PROMPT, SENTENCES = 48, 3, 3
FORMATS = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None), "int8": (torch.float32, "int8"),
           "bf16+int8": (torch.bfloat16, "int8")}


def _held_out(encoder) -> list[torch.Tensor]:
    docs = [segment(d.text) for d in load_corpus() if d.held_out]
    docs = [d for d in docs if len(d) >= PROMPT + SENTENCES][:DOCS]
    return [encoder.encode(d[: PROMPT + SENTENCES]) for d in docs]


def test_weight_formats_quality(benchmark):
    model = lcm_fast.from_pretrained(DEMO_DIR)
    docs = _held_out(load_encoder("minilm"))
    if benchmark.disabled:  # the CI smoke run: the same code on a few documents
        docs = docs[:4]
    prompts, truth = torch.stack([d[:PROMPT] for d in docs]), torch.stack([d[PROMPT:] for d in docs])
    options = lcm_fast.GenerationOptions.paper(model, seed=0, eos_threshold=None)
    concepts, seconds = {}, {}
    for name, (dtype, weights) in FORMATS.items():
        generator = lcm_fast.Generator(copy.deepcopy(model).to(dtype), options, weights=weights)
        generator(prompts[:1], max_gen_len=1)  # the fast engine's tables and the int8 pack
        start = time.perf_counter()
        out = generator(prompts, max_gen_len=SENTENCES)
        seconds[name] = time.perf_counter() - start
        concepts[name] = torch.stack([s[PROMPT:].float() for s in out.sequences])  # [docs, SENTENCES, D]
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.group = f"weight_formats/demo/{len(docs)}docs"
    rows = {}
    for name, c in concepts.items():
        to_fp32 = F.cosine_similarity(c, concepts["fp32"], dim=-1)
        rows[name] = dict(l2_next=float((c - truth).norm(dim=-1).mean()),
                          cos_next=float(F.cosine_similarity(c, truth, dim=-1).mean()),
                          min_cos_fp32=float(to_fp32.min()), mean_cos_fp32=float(to_fp32.mean()), seconds=seconds[name])
    benchmark.extra_info.update(model="demo two-tower d192", documents=len(docs), prompt=PROMPT, sentences=SENTENCES,
                                formats=rows)
    assert rows["int8"]["min_cos_fp32"] >= 0.99 and rows["bf16+int8"]["min_cos_fp32"] >= 0.98
