"""Native SONAR (``lcm_fast.text.sonar``): encode and decode sentences/s on the CPU, against sonar-space.

Run: ``python -m pytest bench/bench_sonar.py --benchmark-json=sonar.json``.

Two shapes: the toy fixtures (``tests/fixtures/sonar``, 32-d, 2 layers) and SONAR's real one (24 layers, 1024-d,
16 heads, FFN 8192, 256,206-row vocabulary) with random weights. The work is the fixture script's
(``scripts/make_sonar_fixtures.py --timings``, which timed sonar-space 0.5 / torch 2.9.1 in its own environment
on this machine, best of 3): encoding 20 sentences in one batch, and greedy decoding of 8 embeddings for exactly
32 tokens each (min = max generation length). One thread on both sides (torch.set_num_threads(1)), fp32 (parity)
and bf16 (ours only: bf16 matmuls, AMX where the CPU has it). ``extra_info``: sentences/s, sonar-space's rate from
``sonar_timings.json`` and our ratio to it (the two runs are separate processes: compare ratios, not absolutes,
on a quiet machine).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from lcm_fast.text.sonar import SonarConfig, SonarDecoder, SonarEncoder, SonarTextDecoder, SonarTextEncoder

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "sonar"
SONAR_SPACE = json.loads((FIXTURES / "sonar_timings.json").read_text())
REAL = SonarConfig()  # text_sonar_basic_*


@pytest.fixture(scope="module")
def inputs() -> dict:
    return torch.load(FIXTURES / "outputs.pt", weights_only=True)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _random(module_type, config: SonarConfig, dtype: torch.dtype):
    torch.manual_seed(0)
    model = module_type(config)
    with torch.no_grad():
        model.get_submodule("encoder_frontend" if module_type is SonarTextEncoder else "decoder_frontend").embed.weight.mul_(
            config.model_dim ** -0.5)  # fairseq2's scaled-embedding init
    return model.to(dtype).eval().requires_grad_(False)


def _real(kind: str, dtype: torch.dtype):
    """A pipeline object of the real shape with random weights and the fixtures' tokenizer (its ids < 1024)."""
    pipeline = (SonarEncoder if kind == "encoder" else SonarDecoder)(weights_dir=FIXTURES)
    pipeline.model = _random(SonarTextEncoder if kind == "encoder" else SonarTextDecoder, REAL, dtype)
    pipeline.dim = REAL.model_dim
    return pipeline


def _rate(benchmark, fn, count: int) -> float:
    fn()  # warm-up
    rounds = 1 if benchmark.disabled else 3
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    benchmark.pedantic(fn, rounds=1, iterations=1)
    return count / min(times)


@pytest.mark.filterwarnings("ignore:.*exceed SONAR's")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", ["toy", "real"])
def test_sonar_encode(benchmark, inputs, one_thread, shape, dtype):
    if shape == "real" and benchmark.disabled and dtype == "bfloat16":
        pytest.skip("the CI smoke run builds the 766M-parameter encoder once (fp32)")
    sentences = inputs["encoder_inputs"][:20]
    dt = getattr(torch, dtype)
    encoder = _real("encoder", dt) if shape == "real" else SonarEncoder(weights_dir=FIXTURES, dtype=dt)
    rate = _rate(benchmark, lambda: encoder.encode(sentences, batch_size=len(sentences)), len(sentences))
    benchmark.group = f"sonar_encode/{shape}"
    benchmark.extra_info.update(shape=shape, dtype=dtype, sentences=len(sentences), threads=1, sentences_per_s=rate)
    theirs = SONAR_SPACE[shape]["encode_sentences_per_s"]
    benchmark.extra_info.update(sonar_space_sentences_per_s=theirs, speedup_vs_sonar_space=rate / theirs)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", ["toy", "real"])
def test_sonar_decode(benchmark, inputs, one_thread, shape, dtype):
    if shape == "real" and benchmark.disabled and dtype == "bfloat16":
        pytest.skip("the CI smoke run builds the 867M-parameter decoder once (fp32)")
    dt = getattr(torch, dtype)
    decoder = _real("decoder", dt) if shape == "real" else SonarDecoder(weights_dir=FIXTURES, dtype=dt)
    n = SONAR_SPACE["decode_sentences"]
    tokens = SONAR_SPACE["decode_tokens_per_sentence"]
    embeddings = torch.randn(n, decoder.dim, generator=torch.Generator().manual_seed(0))
    if benchmark.disabled:
        tokens = 2
    # exactly `tokens` tokens and the forced EOS per sentence, greedy: the fixture script's sonar-space run
    run = lambda: decoder.generate(embeddings, beam_size=1, min_gen_len=tokens + 1, max_gen_len=(0, tokens + 1),
                                   batch_size=n)
    assert all(len(h[0].tokens) == tokens + 1 for h in run())
    rate = _rate(benchmark, run, n)
    benchmark.group = f"sonar_decode/{shape}"
    benchmark.extra_info.update(shape=shape, dtype=dtype, sentences=n, tokens_per_sentence=tokens, threads=1,
                                sentences_per_s=rate)
    theirs = SONAR_SPACE[shape]["decode_sentences_per_s"]
    benchmark.extra_info.update(sonar_space_sentences_per_s=theirs, speedup_vs_sonar_space=rate / theirs)
