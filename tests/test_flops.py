"""lcm_fast.flops: the analytic FLOP model against FlopCounterMode on instantiated small models.

The counter sees matmuls (mm/addmm/bmm) and, with lcm_fast.flops.counting, the CPU SDPA kernel; it
does not see norms, activations, softmax, embeddings lookups or the sampler's elementwise maths, which
the analytic model leaves out too. Agreement is required within 2 % (it is exact in practice).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lcm_fast
from lcm_fast.flops import (
    LLAMA,
    SONAR_DECODER,
    TokenModel,
    TokenTransformer,
    count_flops,
    crossover_sentence_length,
    lcm_pipeline_flops,
    llm_flops,
    sonar_decode_flops,
    sonar_encode_flops,
    two_tower_flops,
)
from lcm_fast.inference.fast import clear_caches

from .conftest import tiny_config

REL = 0.02


@pytest.mark.parametrize("spec", [TokenModel(2, 64, 96, 100, 4, 4), TokenModel(3, 64, 80, 50, 8, 2)],
                         ids=["mha", "gqa"])
def test_llm_matches_counter(spec):
    model = TokenTransformer(spec).eval()
    for tokens in (1, 9, 30):
        counted, _ = count_flops(model.generate, torch.zeros(2, 1, dtype=torch.long), tokens)
        assert counted == pytest.approx(2 * llm_flops(spec, tokens), rel=REL)


@pytest.mark.parametrize("length", [1, 7, 20])
def test_sonar_encoder_and_decoder_match_counter(length):
    spec = TokenModel(3, 48, 80, 50, 4, 4, gated=False)
    encoder, decoder = TokenTransformer(spec).eval(), TokenTransformer(spec, cross=True).eval()
    counted, _ = count_flops(encoder.encode, torch.zeros(3, length, dtype=torch.long))
    assert counted == pytest.approx(3 * sonar_encode_flops(spec, length), rel=REL)
    counted, _ = count_flops(decoder.generate, torch.zeros(3, 1, dtype=torch.long), length, torch.randn(3, 48))
    assert counted == pytest.approx(3 * sonar_decode_flops(spec, length), rel=REL)


@pytest.mark.parametrize("algorithm", ["reference", "fast"])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("swiglu", [False, True])
def test_two_tower_matches_counter(algorithm, guidance, swiglu):
    """The reference and fast engines, counted while generating, against the analytic model. The
    official algorithm differs from the reference engine only by the self-attention's dead q/k
    projections and its one-key attention (checked below, not runnable here)."""
    stack = dict(use_swiglu=swiglu, ffn_inner_dim=48)
    config = tiny_config("two_tower_diffusion_lcm", context_encoder=stack, denoiser=stack)
    model = lcm_fast.build_model(config).eval()
    options = lcm_fast.GenerationOptions(inference_timesteps=6, official_timestep_stride=False,
                                         guidance_scale=guidance, seed=0)
    for n in (1, 5):
        clear_caches()  # the analytic count includes building the fast engine's timestep tables
        counted, _ = count_flops(lcm_fast.generate, model, torch.randn(2, 1, 24), max_gen_len=n, options=options,
                                 engine=algorithm)
        expected = two_tower_flops(config, n, 6, cfg=guidance != 1.0, algorithm=algorithm, batch=2)
        assert counted == pytest.approx(expected, rel=REL)
    D, L, rows = config.model_dim, config.denoiser.num_layers, (2 if guidance != 1.0 else 1) * 6
    dead = rows * 5 * L * (2 * D * 2 * D + 4 * D)  # q/k projections and QK^T/AV over one key, per row
    assert two_tower_flops(config, 5, 6, cfg=guidance != 1.0, algorithm="official") == pytest.approx(
        two_tower_flops(config, 5, 6, cfg=guidance != 1.0, algorithm="reference") + dead)


def test_cpu_attention_is_counted_forward_and_backward():
    """torch has no formulas for the CPU flash-attention kernels: ours count 4 b h s s d forward and
    2.5x that backward (the standard SDPA formulas), with and without a mask."""
    b, h, s, d = 2, 3, 16, 8
    q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))
    forward = 4 * b * h * s * s * d
    for mask in (None, torch.ones(s, s, dtype=torch.bool).tril()):
        counted, _ = count_flops(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward())
        assert counted == forward + 10 * b * h * s * s * d


def test_paper_scale_facts():
    """The 1.6B Two-Tower per-sentence cost of reference-lcm-spec.md 10.2 (50 executed steps, CFG):
    ~127 G + 10.9 G * C MAC for the official algorithm, ~61.5 GMAC for the fast one."""
    config = lcm_fast.get_arch("two_tower_diffusion_lcm_1_6B")
    per_sentence = lambda C, algorithm: (two_tower_flops(config, C, 50, algorithm=algorithm)
                                         - two_tower_flops(config, C - 1, 50, algorithm=algorithm)) / 2
    slope = per_sentence(101, "official") - per_sentence(100, "official")
    assert slope == pytest.approx(10.9e9, rel=0.01)
    assert per_sentence(50, "official") == pytest.approx(683e9, rel=0.02)
    fast = per_sentence(50, "fast")
    assert 55e9 < fast < 70e9 and per_sentence(200, "fast") < 1.1 * fast  # nearly independent of C
    # SONAR's decoder pays its 256k-vocabulary head per token: 0.52 of the ~1.64 GFLOP per token
    per_token = sonar_decode_flops(SONAR_DECODER, 21) - sonar_decode_flops(SONAR_DECODER, 20)
    assert 2 * 1024 * 256206 / per_token == pytest.approx(0.32, abs=0.01)


def test_crossover_and_scaling():
    """Paper Figure 13 (1.6B LCM vs Llama-2-7B): only very short sentences (<= 10 tokens) favour the LLM
    and the LCM scales better with context. That holds for an algorithm that caches the context's
    cross-attention keys/values (the fast engine); the official one recomputes them at every step of
    both CFG halves, its cost grows with context^2 and its crossover moves to long sentences."""
    config, llm = lcm_fast.get_arch("two_tower_diffusion_lcm_1_6B"), LLAMA["llama2-7b"]
    fast = crossover_sentence_length(config, llm, 2000, algorithm="fast")
    official = crossover_sentence_length(config, llm, 2000)
    assert fast is not None and fast <= 10 and official is not None and official > 3 * fast
    ratio = lambda total, algorithm: (lcm_pipeline_flops(config, total, 20, algorithm=algorithm).total
                                      / llm_flops(llm, total))
    assert ratio(8000, "fast") < ratio(1000, "fast")
    assert ratio(8000, "official") > ratio(1000, "official")
    with pytest.raises(ValueError, match="unknown algorithm"):
        two_tower_flops(config, 3, 40, algorithm="cached")


def test_cli_flops_plot(tmp_path):
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "lcm_fast.cli", "flops", "--plot", str(tmp_path / "f.png"), "--json",
                          str(tmp_path / "f.json")], check=True, capture_output=True, text=True).stdout
    assert "crossover sentence length" in out and (tmp_path / "f.png").stat().st_size > 10_000
    data = json.loads((tmp_path / "f.json").read_text())
    assert len(data["crossover"]["fast"]) == len(data["contexts"]) and set(data["lcm_flops"]) == {"official", "fast"}
