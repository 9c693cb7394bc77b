"""The fast engine against the reference engine on random models, prompts and options."""

from __future__ import annotations

import copy
import dataclasses
import functools
import warnings
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lcm_fast
from lcm_fast.inference import graphs
from lcm_fast.inference.graphs import batch_bucket, pad_batch
from lcm_fast.nn.attention import KVCache
from lcm_fast.ops.denoiser import LAYER_TENSORS

from .conftest import SAMPLED_UNITS, random_model, tiny_config
from .tolerances import CUDA_GRAPHS_VS_EAGER, FAST_ENGINE_ATOL, FAST_ENGINE_ERR_FACTOR

_MODELS: dict = {}


def _model(key: tuple):
    if key not in _MODELS:
        heads, layers, rope, rms, prediction = key
        stack = dict(num_attn_heads=heads, num_layers=layers, pos_embedding_style="rope" if rope else "learned",
                     layer_normalization_style="rms" if rms else "standard", use_swiglu=rms, mha_output_proj_bias=rms)
        cfg = tiny_config(
            "two_tower_diffusion_lcm", context_encoder=stack,
            denoiser=dict(stack, pos_embedding_style="none", enable_qk_layernorm=not rms),
            noise_scheduler=dict(prediction_type=prediction),
        )
        _MODELS[key] = random_model(cfg, seed=zlib.crc32(repr(key).encode()))  # not the order of first use: replayable
    return _MODELS[key]


def _max_abs_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest |got - expected| (NaNs agree, checked apart); 0 for no rows."""
    return (got.double() - expected).nan_to_num().abs().max().item() if got.numel() else 0.0


def _assert_as_close_to_float64(fast, ref, oracle, lens: torch.Tensor) -> None:
    """The fast engine's sequences are about as close to the float64 reference engine's (``oracle``) as the
    reference engine's: generated sentences feed the next ones, so fp32 rounding grows along the chain (epsilon
    models at t = T-1 divide by 0: NaNs must agree)."""
    assert fast.lengths.tolist() == ref.lengths.tolist()
    for a, b, o, start in zip(fast.sequences, ref.sequences, oracle.sequences, lens.tolist()):
        assert torch.equal(a.isnan(), b.isnan())
        # the first generated sentence, then the later ones (their inputs carry the earlier ones' rounding,
        # which the model amplifies alike in both engines, so the first ratio carries over: FACTOR squared)
        for part, factor in ((slice(start, start + 1), FAST_ENGINE_ERR_FACTOR),
                             (slice(start + 1, None), FAST_ENGINE_ERR_FACTOR**2)):
            err_fast, err_ref = (_max_abs_err(t[part], o[part]) for t in (a, b))
            assert err_fast <= factor * err_ref + FAST_ENGINE_ATOL, (part, err_fast, err_ref)


@settings(max_examples=40, deadline=None)
@given(
    model_key=st.tuples(st.sampled_from([1, 2, 4]), st.integers(1, 3), st.booleans(), st.booleans(),
                        st.sampled_from(["sample", "epsilon", "v_prediction"])),
    lens=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    guidance=st.sampled_from([1.0, 2.0, 3.0]),
    rescale=st.floats(0.0, 1.0),
    eta=st.sampled_from([0.0, 0.5]),
    scaling=st.sampled_from([None, 1.00045]),
    steps=st.integers(1, 12),
    thresholding=st.booleans(),
    max_gen_len=st.integers(1, 3),
    seed=st.integers(1, 2**16),
    static=st.booleans(),
)
def test_fast_equals_reference(model_key, lens, guidance, rescale, eta, scaling, steps, thresholding, max_gen_len, seed,
                               static):
    """static: the fast engine's static-buffer sentence loop (replayed as a CUDA graph on a GPU; no graph here)."""
    model = _model(model_key)
    lens = torch.tensor(lens)
    prompts = torch.randn(len(lens), int(lens.max()), model.sonar_dim, generator=torch.Generator().manual_seed(seed))
    options = lcm_fast.GenerationOptions(
        guidance_scale=guidance, guidance_rescale=rescale, ddim_eta=eta, epsilon_scaling=scaling,
        inference_timesteps=steps, thresholding=thresholding, sample_max_value=3.0, initial_noise_scale=0.8,
        seed=seed, eos_threshold=None,
    )
    ref = lcm_fast.generate(model, prompts, lens, options=options, max_gen_len=max_gen_len, engine="reference")
    fast = lcm_fast.generate(model, prompts, lens, options=options, max_gen_len=max_gen_len, engine="fast",
                             cuda_graphs=static)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fused ops run their references in float64, and say so
        oracle = lcm_fast.generate(copy.deepcopy(model).double(), prompts.double(), lens, options=options,
                                   max_gen_len=max_gen_len, engine="reference")
    _assert_as_close_to_float64(fast, ref, oracle, lens)


def _base_model(key: tuple):
    if key not in _MODELS:
        heads, layers, rope, rms, order, qk_norm, scale_residual = key
        stack = dict(num_attn_heads=heads, num_layers=layers, pos_embedding_style="rope" if rope else "learned",
                     layer_normalization_style="rms" if rms else "standard", use_swiglu=rms, mha_output_proj_bias=rms,
                     norm_order_style=order, enable_qk_layernorm=qk_norm, scale_residual=scale_residual)
        _MODELS[key] = random_model(tiny_config("base_lcm", lcm=stack), seed=zlib.crc32(repr(key).encode()))
    return _MODELS[key]


@settings(max_examples=30, deadline=None)
@given(
    model_key=st.tuples(st.sampled_from([1, 2, 4]), st.integers(1, 3), st.booleans(), st.booleans(),
                        st.sampled_from(["pre", "normformer", "post"]), st.booleans(), st.sampled_from([None, 0.5])),
    lens=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    sample=st.booleans(),
    max_gen_len=st.integers(1, 4),
    seed=st.integers(1, 2**16),
    static=st.booleans(),
)
def test_fast_base_lcm_equals_reference(model_key, lens, sample, max_gen_len, seed, static):
    """Base-LCM: one decoder_layers_decode call per sentence (post-norm layers and scale_residual keep the
    modules), with or without the latent noise; prompts of length 1 have no prefill. static: the static-shape
    decoder (replayed as a CUDA graph on a GPU; no graph here)."""
    model = _base_model(model_key)
    static = static and model_key[4] != "post" and model_key[6] is None
    lens = torch.tensor(lens)
    prompts = torch.randn(len(lens), int(lens.max()), model.sonar_dim, generator=torch.Generator().manual_seed(seed))
    options = lcm_fast.GenerationOptions(sample_latent_variable=sample, lcm_temperature=0.3, seed=seed,
                                         eos_threshold=None)
    run = functools.partial(lcm_fast.generate, options=options, max_gen_len=max_gen_len)
    ref, fast = run(model, prompts, lens, engine="reference"), run(model, prompts, lens, cuda_graphs=static)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oracle = run(copy.deepcopy(model).double(), prompts.double(), lens, engine="reference")
    _assert_as_close_to_float64(fast, ref, oracle, lens)


@settings(max_examples=25, deadline=None)
@given(
    model_key=st.tuples(st.sampled_from([1, 2, 4]), st.integers(1, 3), st.booleans(),
                        st.sampled_from(["pre", "normformer", "post"]), st.booleans()),
    lens=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    guidance=st.sampled_from([1.0, 3.0]),
    eta=st.sampled_from([0.0, 0.5]),
    steps=st.integers(1, 8),
    max_gen_len=st.integers(1, 3),
    seed=st.integers(1, 2**16),
)
def test_fast_one_tower_equals_reference(model_key, lens, guidance, eta, steps, max_gen_len, seed):
    """One-Tower: every denoising step in one decoder_layers_decode call (conditional rows on their cached
    context, the CFG rows on themselves; teacher-forced rows skipped through a row index)."""
    key = ("one_tower", *model_key)
    if key not in _MODELS:
        heads, layers, rms, order, qk_norm = model_key
        stack = dict(num_attn_heads=heads, num_layers=layers, layer_normalization_style="rms" if rms else "standard",
                     use_swiglu=rms, norm_order_style=order, enable_qk_layernorm=qk_norm)
        _MODELS[key] = random_model(tiny_config("one_tower_diffusion_lcm", lcm=stack), seed=zlib.crc32(repr(key).encode()))
    model = _MODELS[key]
    lens = torch.tensor(lens)
    prompts = torch.randn(len(lens), int(lens.max()), model.sonar_dim, generator=torch.Generator().manual_seed(seed))
    options = lcm_fast.GenerationOptions(guidance_scale=guidance, guidance_rescale=0.7, ddim_eta=eta,
                                         inference_timesteps=steps, initial_noise_scale=0.8, seed=seed,
                                         eos_threshold=None)
    run = functools.partial(lcm_fast.generate, options=options, max_gen_len=max_gen_len)
    ref, fast = run(model, prompts, lens, engine="reference"), run(model, prompts, lens)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oracle = run(copy.deepcopy(model).double(), prompts.double(), lens, engine="reference")
    _assert_as_close_to_float64(fast, ref, oracle, lens)


@pytest.mark.parametrize("target", ["discrete", "continuous"])
@pytest.mark.parametrize("stack", [{}, dict(layer_normalization_style="rms", use_swiglu=True, norm_order_style="normformer",
                                            enable_qk_layernorm=True, num_attn_heads=1, num_layers=3)])
@pytest.mark.parametrize("sampling", [dict(top_k=1), dict(SAMPLED_UNITS, guidance_scale=2.5)])
@pytest.mark.parametrize("static", [False, True])
def test_fast_quant_lcm_equals_reference(target, stack, sampling, static):
    """Quant-LCM: every codebook pass's tokens (and their CFG twins) in one decoder_layers_decode call, teacher-forced
    rows skipped through a row index: the same units as the module path (the scores differ by fp32 rounding only,
    far from a tie here), hence bit-identical sentences. static: a sentence's passes on static buffers, the unit
    draws made up front (replayed as a CUDA graph on a GPU; no graph here)."""
    model = random_model(tiny_config("quant_lcm", target=target, lcm=stack), seed=len(stack))
    prompts = torch.randn(3, 4, model.sonar_dim, generator=torch.Generator().manual_seed(2))
    options = lcm_fast.GenerationOptions(seed=5, eos_threshold=None, **sampling)
    run = functools.partial(lcm_fast.generate, model, prompts, torch.tensor([4, 1, 3]), options=options, max_gen_len=4)
    ref, fast = run(engine="reference"), run(cuda_graphs=static)
    assert all(torch.equal(a, b) for a, b in zip(ref.sequences, fast.sequences))


def test_unknown_engine():
    with pytest.raises(ValueError, match="unknown engine 'turbo'"):
        lcm_fast.Generator(_model((2, 1, False, False, "sample")), engine="turbo")


def test_cuda_graphs_need_the_fast_engine_and_a_graphable_model():
    with pytest.raises(ValueError, match="cuda_graphs needs the fast engine and a model its decode step runs "
                                         r"\(not post-norm layers or scale_residual\), got engine 'reference'"):
        lcm_fast.Generator(_model((2, 1, False, False, "sample")), engine="reference", cuda_graphs=True)
    with pytest.raises(ValueError, match="and a BaseLCM"):
        lcm_fast.Generator(_base_model((2, 1, True, True, "post", False, None)), cuda_graphs=True)
    with pytest.raises(ValueError, match="and a QuantLCM"):
        lcm_fast.Generator(random_model(tiny_config("quant_lcm", lcm=dict(norm_order_style="post"))), cuda_graphs=True)
    with pytest.warns(UserWarning, match="the static-shape path runs without graphs"):
        lcm_fast.Generator(_model((2, 1, False, False, "sample")), cuda_graphs=True)


@pytest.fixture
def captured(monkeypatch) -> list[int]:
    """The batch size of every graph captured from here on (on CPU: every CapturedCall made)."""
    sizes: list[int] = []

    class RecordedCapture(graphs.CapturedCall):
        def __init__(self, fn, *inputs):
            sizes.append(inputs[0].shape[0])
            super().__init__(fn, *inputs)

    monkeypatch.setattr(graphs, "CapturedCall", RecordedCapture)
    return sizes


FAMILIES = ["two_tower_diffusion_lcm", "base_lcm", "one_tower_diffusion_lcm", "quant_lcm"]


def _static_options(family: str, **overrides) -> lcm_fast.GenerationOptions:
    """Options whose every draw is used: Quant-LCM samples its units (top-k, top-p) under CFG."""
    if family == "quant_lcm":
        overrides = dict(overrides, **SAMPLED_UNITS)
    return lcm_fast.GenerationOptions.recommended(seed=3, ddim_eta=0.3, inference_timesteps=6, eos_threshold=None,
                                                  **overrides)


@pytest.mark.parametrize("family", FAMILIES)
def test_static_shapes_run_finishing_batches_in_buckets(family, captured):
    """cuda_graphs (static shapes; on CPU without graphs): as documents finish, the active rows run padded to
    their power-of-two bucket on caches compacted in place; each bucket is captured at its second sentence
    and replayed after later finishes, and the outputs are the per-step fast engine's."""
    model = random_model(tiny_config(family), seed=4)
    options = _static_options(family, lcm_temperature=0.3)
    prompts = torch.randn(5, 5, model.sonar_dim, generator=torch.Generator().manual_seed(0))
    # documents 3 and 4 finish after positions 6 and 8; positions 1-4 teacher-force some rows (Two-Tower
    # denoises those sentences step by step), 5-6 run 5 rows in the bucket of 8, 7-10 4 and then 3 rows in
    # the bucket of 4, the last two after compacting the caches under the captured bucket
    lens = torch.tensor([5, 5, 5, 1, 3])
    static, eager = (lcm_fast.generate(model, prompts, lens, options=options, max_gen_len=6, cuda_graphs=graphs_)
                     for graphs_ in (True, False))
    assert captured == [8, 4]
    assert static.lengths.tolist() == eager.lengths.tolist() == [11, 11, 11, 7, 9]
    for a, b in zip(static.sequences, eager.sequences):
        torch.testing.assert_close(a, b, **CUDA_GRAPHS_VS_EAGER)


@pytest.mark.parametrize("family", FAMILIES)
def test_inductor_compiles_the_static_step(family, captured):
    """cuda_graphs with inductor: the static step's layers in plain PyTorch compiled by Inductor (fullgraph), through
    the batch buckets (captured as without it, each capture's warm-up checked by CaptureGuard with the Python of the
    compiled code) and teacher-forced sentences (the composed ops): the outputs of the composed static step."""
    model = random_model(tiny_config(family), seed=4)
    options = _static_options(family, lcm_temperature=0.3)
    prompts = torch.randn(5, 5, model.sonar_dim, generator=torch.Generator().manual_seed(0))
    lens = torch.tensor([5, 5, 5, 1, 3])
    compiled, composed = (lcm_fast.generate(model, prompts, lens, options=options, max_gen_len=6, cuda_graphs=True,
                                            inductor=inductor) for inductor in (True, False))
    assert captured == [8, 4, 8, 4]
    for a, b in zip(compiled.sequences, composed.sequences):
        torch.testing.assert_close(a, b, **CUDA_GRAPHS_VS_EAGER)
    with pytest.raises(ValueError, match="inductor=True compiles the static .* it needs cuda_graphs=True"):
        lcm_fast.Generator(model, options, inductor=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_static_buffers_and_graphs_are_reused_by_later_calls(family, captured):
    """cuda_graphs: a call that fits the last call's buffers (its batch bucket, its length rounded up to 64) restarts
    that call's stepper on the same storage, captures nothing new and returns what a fresh generator returns; other
    options or an in-place weight update get a new stepper."""
    model = random_model(tiny_config(family), seed=5)
    options = _static_options(family)
    generator = lcm_fast.Generator(model, options, cuda_graphs=True)
    g = torch.Generator().manual_seed(1)
    generator(torch.randn(5, 5, model.sonar_dim, generator=g), torch.tensor([5, 5, 5, 1, 3]), max_gen_len=6)
    stepper = generator._static[1]
    caches = [*stepper.fast.caches, *stepper.cache] if family.startswith("two_tower") else stepper.cache
    storage = [c.k.data_ptr() for c in caches]
    assert captured == [8, 4]

    def call(generator: lcm_fast.Generator) -> list:  # 6 documents (the bucket of 8), 16 positions (within 64)
        prompts = torch.randn(6, 7, model.sonar_dim, generator=torch.Generator().manual_seed(2))
        out = generator(prompts, torch.tensor([7, 7, 2, 7, 7, 7]), max_gen_len=9, temperature=0.4,
                        noise=lcm_fast.TorchNoise(9))
        return out.sequences

    again = call(generator)
    assert generator._static[1] is stepper and [c.k.data_ptr() for c in caches] == storage
    assert captured == [8, 4]  # every sentence of the second call replayed a graph of the first
    fresh = call(lcm_fast.Generator(model, options, cuda_graphs=True))
    assert all(torch.equal(a, b) for a, b in zip(again, fresh))

    generator.options = dataclasses.replace(options, guidance_scale=2.5)
    call(generator)
    assert generator._static[1] is not stepper
    stepper = generator._static[1]
    with torch.no_grad():
        next(model.parameters()).mul_(1.5)
    updated = call(generator)
    assert generator._static[1] is not stepper
    fresh = call(lcm_fast.Generator(model, generator.options, cuda_graphs=True))
    assert all(torch.equal(a, b) for a, b in zip(updated, fresh))


def test_kv_cache_with_batch_capacity_compacts_in_place():
    cache = KVCache(6, zeroed=True, batch_capacity=4)
    k = torch.randn(3, 2, 2, 5)
    keys, _ = cache.append(k, -k)
    assert cache.k.shape == (4, 2, 6, 5) and keys.shape == (3, 2, 2, 5) and cache.batch == 3
    storage = cache.k.data_ptr()
    cache.reorder(torch.tensor([2, 0]))  # document 1 finished
    assert cache.k.data_ptr() == storage and cache.batch == 2
    assert torch.equal(cache.k[:2, :, :2], k[[2, 0]]) and torch.equal(cache.v[:2, :, :2], -k[[2, 0]])
    new = torch.randn(2, 2, 1, 5)
    keys, values = cache.append(new, new)
    assert torch.equal(keys, torch.cat((k[[2, 0]], new), 2)) and torch.equal(values[:, :, 2], new[:, :, 0])
    with pytest.raises(ValueError, match="appending 3 rows to a cache of 2"):
        cache.append(k[:, :, :1], k[:, :, :1])
    with pytest.raises(ValueError, match="a batch of 5 rows > batch_capacity 4"):
        KVCache(6, batch_capacity=4).append(torch.randn(5, 2, 1, 5), torch.randn(5, 2, 1, 5))
    plain = KVCache(6)
    plain.append(k, k)
    plain.reorder(torch.tensor([1]))  # without batch_capacity the storage shrinks to the kept rows
    assert plain.k.shape == (1, 2, 6, 5) and torch.equal(plain.k[:, :, :2], k[[1]])


def test_batch_buckets():
    assert [batch_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 33, 64, 65)] == [1, 2, 4, 4, 8, 8, 16, 64, 64, 128]
    x = torch.randn(3, 2)
    assert pad_batch(x, 3) is x and torch.equal(pad_batch(x, 4), torch.cat((x, torch.zeros(1, 2))))
    assert pad_batch(x, 5, dim=1).shape == (3, 5)


def test_fast_engine_skips_teacher_forced_rows():
    """Rows inside their prompt are not denoised (the reference engine denoises and discards them)."""
    model = _model((2, 2, True, True, "sample"))
    denoised: list = []
    options = lcm_fast.GenerationOptions(inference_timesteps=3, guidance_scale=2.0, seed=5)
    lcm_fast.generate(model, torch.randn(3, 4, model.sonar_dim), torch.tensor([4, 1, 2]), options=options,
                      max_gen_len=1, step_callback=lambda pos, t, out, rows: denoised.append((pos, rows.tolist())))
    # rows index the active batch: doc 1 finishes at position 1, doc 2 (then row 1) at 2; at position 3
    # only doc 0 is left and it is still inside its prompt, so nothing is denoised
    assert {pos: rows for pos, rows in denoised} == {1: [1], 2: [1], 4: [0]}


def test_decoding_tables_are_reused_until_the_schedule_or_a_weight_changes():
    from lcm_fast.inference.fast import decoding_tables

    model = copy.deepcopy(_model((2, 2, True, True, "sample")))
    den, steps = model.denoiser, [99, 50, 10]
    tables = decoding_tables(den, steps)
    assert decoding_tables(den, steps) is tables
    other = decoding_tables(den, [99, 10])  # a new schedule: new modulations, the same composed weights
    assert other.modulations.shape[0] == 2 and other.layers_args is tables.layers_args
    with torch.no_grad():
        den.layers[0].modulator.fc.bias.add_(0.5)  # in place: the version counter moves
        den.layers[1].cross_attention.output_proj.weight.mul_(2.0)
        den.layers[1].self_attn.output_proj.weight.mul_(2.0)
    new = decoding_tables(den, steps)
    mods, uncond = tables.modulations, tables.uncond_cross
    assert not torch.equal(new.modulations[:, 0], mods[:, 0]) and torch.equal(new.modulations[:, 1], mods[:, 1])
    assert torch.equal(new.uncond_cross[0], uncond[0]) and not torch.equal(new.uncond_cross[1], uncond[1])
    # the composed self-attention weight of layer 1 (params entry of v_proj) follows its output_proj
    v_proj = LAYER_TENSORS.index("value_weight")
    layer1 = len(LAYER_TENSORS) + v_proj
    assert torch.allclose(new.layers_args[0][layer1], 2 * tables.layers_args[0][layer1])
    assert torch.equal(new.layers_args[0][v_proj], tables.layers_args[0][v_proj])
    # generation with the updated weights == generation by a fresh copy of them (its own tables)
    prompts, options = torch.randn(2, 3, model.sonar_dim), lcm_fast.GenerationOptions(inference_timesteps=5, seed=3)
    out = lcm_fast.generate(model, prompts, options=options, max_gen_len=2).sequences
    fresh = lcm_fast.generate(copy.deepcopy(model), prompts, options=options, max_gen_len=2).sequences
    assert all(torch.equal(a, b) for a, b in zip(out, fresh))
