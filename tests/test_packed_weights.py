"""Generation with weight-only int8 and fp8 weights (``Generator(weights="int8" | "fp8")``): every family, the fast
engine's decode step on packed projection weights. Quality against the official fp32 outputs:
tests/parity/test_half_precision.py."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import lcm_fast
from lcm_fast.inference.fast import packed_decode_args
from lcm_fast.ops.linear import PACKED_FORMATS, is_packed

from .conftest import random_model, tiny_config

FAMILIES = ["two_tower_diffusion_lcm", "base_lcm", "one_tower_diffusion_lcm", "quant_lcm"]
# random tiny models (model dim 16) amplify the weights' rounding more than trained ones: measured min cosine
# 0.9914 (One-Tower) to 0.9999 (Two-Tower) over three seeds in int8; the parity fixtures hold the 0.99 of the issue.
# fp8 (3 mantissa bits: ~5x int8's rounding of a per-channel row) keeps Two-Tower and Base-LCM at 0.996-0.9995
# (seeds 0-2) but the random One-Tower falls to 0.66-0.96 and Quant-LCM's unit choices flip: there the fp8 runs are
# only held to the plain-PyTorch twin (test_packed_generation_is_its_reference_twin); bench/RESULTS.md
MIN_COSINE = {"int8": 0.97, "fp8": 0.99}
FP8_DRIFTS = {"one_tower_diffusion_lcm", "quant_lcm"}
FORMATS = list(PACKED_FORMATS)


def _model(family: str, dtype=torch.float32):
    return random_model(tiny_config(family)).to(dtype)


def _options(family: str) -> lcm_fast.GenerationOptions:
    if family == "base_lcm":
        return lcm_fast.GenerationOptions(seed=3, sample_latent_variable=False)
    if family == "quant_lcm":
        return lcm_fast.GenerationOptions(seed=3, top_k=1, guidance_scale=2.0)
    return lcm_fast.GenerationOptions.recommended(seed=3, inference_timesteps=6, eos_threshold=None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family,fmt", [(f, m) for m in FORMATS for f in FAMILIES if m != "fp8" or f not in FP8_DRIFTS])
def test_packed_generation_stays_close_to_the_models_weights(family, dtype, fmt):
    """Ragged prompts (teacher-forced rows), every family: the packed decode step's sentences within MIN_COSINE of
    the model's own, in its dtype, on the same path: the per-step kernels, and the static path (what CUDA graphs
    replay; its composed ops round differently in bf16). Quant-LCM picks discrete units, and a near-tie flipped by
    rounding picks another centroid, a distant sentence: there, one sentence of the batch may differ (measured on
    seeds 0-4: at most one of 9 in bf16, none in fp32)."""
    model = _model(family, dtype)
    prompts = torch.randn(3, 5, model.sonar_dim, generator=torch.Generator().manual_seed(0))
    lens = torch.tensor([5, 2, 4])
    run = lambda **kw: lcm_fast.generate(model, prompts, lens, max_gen_len=3, options=_options(family), **kw).sequences
    for cuda_graphs in (False, True):
        with pytest.warns(UserWarning, match="without graphs") if cuda_graphs else contextlib.nullcontext():
            own, packed = run(cuda_graphs=cuda_graphs), run(weights=fmt, cuda_graphs=cuda_graphs)
        cosines = []
        for a, b, n in zip(own, packed, lens.tolist()):
            assert a.shape == b.shape and b.dtype == dtype and torch.equal(a[:n], b[:n])  # prompts untouched
            cosines.append(F.cosine_similarity(a[n:].float(), b[n:].float(), dim=-1))
        flipped = int((torch.cat(cosines) < MIN_COSINE[fmt]).sum())
        assert flipped <= (1 if family == "quant_lcm" and dtype == torch.bfloat16 else 0), torch.cat(cosines)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_generation_is_its_reference_twin(family, fmt):
    """The packed decode step (C++ kernels, and the static path's composed ops) computes what the plain-PyTorch
    twins compute on the same packed weights (``set_backend("ref")``), in fp32: whatever drift a format has is its
    rounding, not the kernels'."""
    model = _model(family)
    prompts = torch.randn(3, 5, model.sonar_dim, generator=torch.Generator().manual_seed(0))
    lens = torch.tensor([5, 2, 4])
    run = lambda **kw: lcm_fast.generate(model, prompts, lens, max_gen_len=3, options=_options(family),
                                         weights=fmt, **kw).sequences
    with lcm_fast.set_backend("ref"):
        ref = run()
    with pytest.warns(UserWarning, match="without graphs"):
        static = run(cuda_graphs=True)
    for got in (run(), static):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_the_pack_is_made_once_and_follows_the_weights():
    """A pack is kept per layer stack and format: a second generator reuses it; an in-place weight update makes a
    new one. Only projection weights are packed (norms, biases, slopes keep the model dtype)."""
    model = _model("base_lcm")
    first = {fmt: packed_decode_args(model.lcm.layers, fmt) for fmt in FORMATS}
    for fmt, (params, *_) in first.items():
        assert packed_decode_args(model.lcm.layers, fmt) is first[fmt]
        assert {p.dtype for p in params if p is not None and p.dim() == 2} == {PACKED_FORMATS[fmt][0]}
        assert not any(is_packed(p) for p in params if p is not None and p.dim() == 1)
    with torch.no_grad():
        model.lcm.layers[0].ffn.inner_proj.weight.mul_(2)
    assert packed_decode_args(model.lcm.layers, "int8") is not first["int8"]


def test_weight_format_errors():
    model = _model("two_tower_diffusion_lcm")
    with pytest.raises(ValueError, match="unknown weight format 'int4'"):
        lcm_fast.Generator(model, weights="int4")
    with pytest.raises(ValueError, match="needs engine 'fast'"):
        lcm_fast.Generator(model, engine="reference", weights="int8")
    with pytest.raises(ValueError, match="drop disable_cache"):
        lcm_fast.generate(model, torch.randn(1, 2, model.sonar_dim), max_gen_len=1, weights="int8",
                          disable_cache=True)
