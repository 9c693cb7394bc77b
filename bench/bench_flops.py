"""FLOPs and wall time: LCM pipeline (SONAR-like encode + Two-Tower + SONAR-like decode) vs a Llama-style
token LLM, at matching scaled-down sizes on random weights (paper section 2.5.1; the full-size analytic
curves are ``lcm-fast flops --plot``).

Run: ``python -m pytest bench/bench_flops.py -q --benchmark-json=flops.json``. Each benchmark records in
``extra_info`` the analytic FLOPs (``lcm_fast.flops``), the FLOPs counted by ``FlopCounterMode`` during
one run, and the context / sentence length; pytest-benchmark's stats are the wall time. One run
produces every curve: LLM, LCM with the reference engine (the official algorithm's recomputation,
without its dead q/k projections) and with the fast engine.
"""

from __future__ import annotations

import pytest
import torch

import lcm_fast
from lcm_fast.config import TwoTowerConfig, config_from_dict
from lcm_fast.flops import TokenModel, TokenTransformer, count_flops, lcm_pipeline_flops, llm_flops
from lcm_fast.inference.fast import clear_caches

CONTEXTS = [64, 256]
SENTENCE_LENGTHS = [16, 64]
STEPS = 5  # executed DDIM steps per sentence (counting runs ~25x slower than the run itself)
# scaled down ~1/8 in width from the paper's 1.6B LCM / SONAR / Llama-2-7B
STACK = dict(num_layers=4, num_attn_heads=4, ffn_inner_dim=1024, use_swiglu=True, layer_normalization_style="rms",
             dropout_p=0.0, final_dropout_p=0.0)
LCM: TwoTowerConfig = config_from_dict("two_tower_diffusion_lcm", dict(
    sonar_embed_dim=128, model_dim=256, max_seq_len=128, sonar_normalizer_name="n",
    context_encoder=dict(STACK, num_layers=2), denoiser=dict(STACK, timestep_embed_dim=256),
    noise_scheduler=dict(num_diffusion_train_steps=100)))
SONAR = TokenModel(3, 128, 1024, 4096, 4, 4, gated=False)
LLM = TokenModel(4, 512, 1376, 4096, 8, 8)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return (lcm_fast.build_model(LCM).eval(), TokenTransformer(SONAR).eval(), TokenTransformer(SONAR, cross=True).eval(),
            TokenTransformer(LLM).eval())


def _record(benchmark, run, *, analytic: float, **info) -> None:
    clear_caches()  # counted as a first call, like the analytic model (timed runs reuse the fast engine's tables)
    counted, _ = count_flops(run)
    benchmark.group = f"flops/context{info['context']}"
    benchmark.pedantic(run, rounds=1 if benchmark.disabled else 3, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(analytic_flops=analytic, counted_flops=counted, **info)
    assert counted == pytest.approx(analytic, rel=0.02)


@pytest.mark.parametrize("context", CONTEXTS)
def test_llm(benchmark, models, context):
    llm = models[3]
    prompt = torch.zeros(1, 1, dtype=torch.long)
    _record(benchmark, lambda: llm.generate(prompt, context), analytic=llm_flops(LLM, context), model="llm",
            context=context)


@pytest.mark.parametrize("engine", ["reference", "fast"])
@pytest.mark.parametrize("sentence_len", SENTENCE_LENGTHS)
@pytest.mark.parametrize("context", CONTEXTS)
def test_lcm_pipeline(benchmark, models, context, sentence_len, engine):
    lcm, encoder, decoder, _ = models
    n = context // sentence_len
    tokens = torch.zeros(n, sentence_len, dtype=torch.long)
    options = lcm_fast.GenerationOptions(inference_timesteps=STEPS, official_timestep_stride=False,
                                         guidance_scale=3.0, guidance_rescale=0.7, seed=0)

    def pipeline():
        with torch.no_grad():
            concepts = encoder.encode(tokens)  # [n, sonar_dim]
            out = lcm_fast.generate(lcm, concepts[None, :1], max_gen_len=n - 1, options=options, engine=engine) \
                if n > 1 else None
            predicted = out.sequences[0] if out is not None else concepts[:1]
            decoder.generate(tokens[:, :1], sentence_len, memory=predicted.expand(n, -1) if n > 1 else concepts)

    analytic = lcm_pipeline_flops(LCM, context, sentence_len, steps=STEPS, algorithm=engine, encoder=SONAR,
                                  decoder=SONAR).total
    _record(benchmark, pipeline, analytic=analytic, model=f"lcm_{engine}", context=context,
            sentence_len=sentence_len)
