"""Weight formats of the decode step on a trained model: quality (and the time of the same generations).

Run: ``python -m pytest bench/bench_weight_formats.py --benchmark-json=formats.json``.

The shipped demo model (a Two-Tower trained by lcm_fast, d 192, on lcm_fast.text.corpus) continues the held-out
documents of the corpus (the split the demo never saw, at most ``DOCS``, prompts of ``PROMPT`` sentences encoded
with its MiniLM encoder) by ``SENTENCES`` sentences with the paper's sampling and one seed, in each format: fp32,
bf16, fp32 or bf16 activations with int8 weights, and the same with fp8 (e4m3) weights. ``extra_info`` per format: the mean
l2 distance and cosine of the generated concepts to the document's true next sentences (``l2_next``,
``cos_next``: generation's analogue of the paper's l2, in raw embedding space; the paper's CA ranks teacher-forced
predictions, which no weight format of the decode step changes), and the minimum and mean cosine to the fp32
concepts.

``test_weight_formats_teacher_forced``: the paper's pre-training metrics (l2, CA, PAR of teacher-forced predictions,
``lcm_fast.evaluation``) of the demo model on the same held-out windows, in fp32, bf16 and with the decode step's
projection weights rounded through int8 and fp8 (dequantized in place: the parallel DDIM of teacher forcing has no
decode pack). What the pack quantizes: cross-attention's query and output projections and the FFN's weights as they
are, and the self-attention's composed value-output product, which here is rounded as its two factors instead.

``test_weight_formats_random_1_6b`` (marked slow: ``-m slow``; 6.4 GB of fp32 weights per model, about 10 minutes on
2 cores): random models in the paper's 1.6B shapes (Two-Tower, Base-LCM, One-Tower), ``BATCH`` prompts of
``CONTEXT`` SONAR-scale sentences continued by ``SENTENCES_1_6B`` with the paper's sampling; ``extra_info`` per format:
the minimum and mean cosine and the largest absolute difference to the fp32 concepts.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn.functional as F

import lcm_fast
from lcm_fast.evaluation import prediction_metrics, teacher_forced_predictions
from lcm_fast.inference.fast import clear_caches
from lcm_fast.ops.linear import quantize_weight, unpack
from lcm_fast.text import load_encoder, segment
from lcm_fast.text.corpus import load_corpus
from lcm_fast.text.pipeline import DEMO_DIR

DOCS, PROMPT, SENTENCES = 48, 3, 3
FORMATS = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None), "int8": (torch.float32, "int8"),
           "bf16+int8": (torch.bfloat16, "int8"), "fp8": (torch.float32, "fp8"), "bf16+fp8": (torch.bfloat16, "fp8")}


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
        generator(prompts[:1], max_gen_len=1)  # the fast engine's tables and the weight pack
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
    assert rows["fp8"]["min_cos_fp32"] >= 0.97 and rows["bf16+fp8"]["min_cos_fp32"] >= 0.97  # measured 0.992, 0.989


@torch.no_grad()
def _rounded_through(model: lcm_fast.TwoTowerLCM, fmt: str) -> lcm_fast.TwoTowerLCM:
    """A copy of model whose denoiser projections (those of the decode pack, see the module docstring) are their
    ``fmt`` packs dequantized."""
    model = copy.deepcopy(model)
    for layer in model.denoiser.layers:
        ca, ffn = layer.cross_attention, layer.ffn
        for linear in (layer.self_attn.v_proj, layer.self_attn.output_proj, ca.q_proj, ca.output_proj,
                       *(m for m in ffn.modules() if isinstance(m, torch.nn.Linear))):
            q, scale = unpack(quantize_weight(linear.weight, fmt))
            linear.weight.copy_(q.float() * scale[:, None])
    return model


def test_weight_formats_teacher_forced(benchmark):
    model = lcm_fast.from_pretrained(DEMO_DIR)
    docs = _held_out(load_encoder("minilm"))
    if benchmark.disabled:  # the CI smoke run: the same code on a few documents
        docs = docs[:4]
    x = torch.stack(docs)  # [docs, PROMPT + SENTENCES, D]
    lens = torch.full((len(docs),), x.shape[1])
    scored = torch.ones(x.shape[:2], dtype=torch.bool)
    scored[:, 0] = False  # the first sentence has no context
    models = {"fp32": model, "bf16": copy.deepcopy(model).to(torch.bfloat16), "int8": _rounded_through(model, "int8"),
              "fp8": _rounded_through(model, "fp8")}
    rows = {name: prediction_metrics(teacher_forced_predictions(m, x.to(FORMATS[name][0]), lens).float(), x, scored)
            for name, m in models.items()}
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.group = f"weight_formats/demo/teacher_forced/{len(docs)}docs"
    benchmark.extra_info.update(model="demo two-tower d192", documents=len(docs), sentences=x.shape[1], formats=rows)
    assert abs(rows["int8"]["ca"] - rows["fp32"]["ca"]) <= 0.01  # the bar: CA within 1 point of fp32


SHAPES_1_6B = ("two_tower_diffusion_lcm_1_6B", "base_lcm_1_6B", "one_tower_diffusion_lcm_1_6B")
BATCH, CONTEXT, SENTENCES_1_6B = 2, 8, 2


@pytest.mark.slow
@pytest.mark.parametrize("arch", SHAPES_1_6B)
def test_weight_formats_random_1_6b(benchmark, arch):
    torch.manual_seed(0)
    model = lcm_fast.build_model(lcm_fast.get_arch(arch)).eval()
    prompts = torch.randn(BATCH, CONTEXT, model.sonar_dim) * 0.01  # about SONAR's scale
    options = lcm_fast.GenerationOptions.paper(model, seed=0, eos_threshold=None)
    concepts, seconds = {}, {}
    # the fp32 formats first, then the same model converted in place (a copy would not fit 24 GB; bf16 -> fp32 would
    # round the fp32 weights)
    for name in ("fp32", "int8", "fp8", "bf16", "bf16+int8", "bf16+fp8"):
        dtype, weights = FORMATS[name]
        clear_caches()  # the previous format's packs and tables
        model.to(dtype)
        start = time.perf_counter()
        out = lcm_fast.generate(model, prompts.to(dtype), options=options, weights=weights, max_gen_len=SENTENCES_1_6B)
        seconds[name] = time.perf_counter() - start
        concepts[name] = torch.stack([s[CONTEXT:].float() for s in out.sequences])  # [BATCH, SENTENCES_1_6B, D]
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.group = f"weight_formats/{arch}/random"
    rows = {}
    for name, c in concepts.items():
        to_fp32 = F.cosine_similarity(c, concepts["fp32"], dim=-1)
        rows[name] = dict(min_cos_fp32=float(to_fp32.min()), mean_cos_fp32=float(to_fp32.mean()),
                          max_abs_fp32=float((c - concepts["fp32"]).abs().max()), seconds=seconds[name])
    benchmark.extra_info.update(model=f"{arch} random", batch=BATCH, context=CONTEXT, sentences=SENTENCES_1_6B,
                                formats=rows)
