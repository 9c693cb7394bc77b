"""denoiser_layers_decode: the reference against the model's DenoiserLayer, the CPU kernel against the
reference over layer variants, stacks, shapes, dtypes and row layouts; opcheck; errors."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lcm_fast.config import DenoiserConfig
from lcm_fast.inference.fast import decoding_tables
from lcm_fast.models.two_tower import DenoiserLayer
from lcm_fast.nn.attention import KVCache
from lcm_fast.nn.position import RotaryEncoder
from lcm_fast.nn.transformer import decode_args
from lcm_fast.ops import denoiser_layers_decode, denoiser_layers_decode_ref
from lcm_fast.ops.denoiser import IO_TENSORS, SPEC

from ..conftest import random_model, tiny_config
from ..tolerances import LAYER_DECODE_FP32, PARITY_FORWARD

needs_kernel = pytest.mark.skipif(not SPEC.has_kernel("cpu"), reason="lcm_fast._C not built")

# (norm style, activation or "swiglu", normformer, q/k norm, rope)
VARIANTS = [
    ("rms", "swiglu", False, False, False),  # the released 1.6B recipe
    ("standard", "relu", False, False, False),  # the official defaults
    ("unit", "gelu", True, True, True),
    ("fp32", "prelu", True, False, False),
    ("standard", "swiglu", True, True, False),
    ("rms", "tanh", False, True, True),
]
OTHER_ACTIVATIONS = ["elu", "leaky_relu", "selu", "silu", "softsign", "sigmoid", "hardsigmoid"]
_LAYERS: dict = {}


def _layer(variant, dim=64, heads=4) -> DenoiserLayer:
    key = (variant, dim, heads)
    if key not in _LAYERS:
        norm, act, normformer, qk_norm, rope = variant
        config = DenoiserConfig(
            num_attn_heads=heads, ffn_inner_dim=3 * dim, use_swiglu=act == "swiglu",
            ffn_inner_activation_name="relu" if act == "swiglu" else act, layer_normalization_style=norm,
            norm_order_style="normformer" if normformer else "pre", enable_qk_layernorm=qk_norm,
            mha_output_proj_bias=norm == "rms", timestep_embed_dim=dim,
        )
        torch.manual_seed(len(_LAYERS))
        layer = DenoiserLayer(dim, config, RotaryEncoder(dim // heads, 64, 10000.0) if rope else None).eval()
        with torch.no_grad():  # norms and PReLU away from their identity initialisation
            for name, p in layer.named_parameters():
                if "norm" in name or "activation" in name:
                    p.add_(0.3 * torch.randn_like(p))
        _LAYERS[key] = layer
    return _LAYERS[key]


def _stack(variant, n, dim=64, heads=4) -> list[DenoiserLayer]:
    """n different layers of one configuration (a denoiser's stack)."""
    base, out = _layer(variant, dim, heads), []
    for i in range(n):
        layer = copy.deepcopy(base)
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(0.05 * i * torch.randn_like(p))
        out.append(layer)
    return out


def _inputs(layers, batch, rows_per_doc, length, capacity, num_cond=None, shuffled=False, seed=0):
    """(h [R, D], modulations [L, 9, D], caches, rows, num_cond) for a layer or a list of layers:
    conditional rows first, then unconditional."""
    layers = layers if isinstance(layers, list) else [layers]
    g = torch.Generator().manual_seed(seed)
    dtype = layers[0].self_attn.v_proj.weight.dtype
    dim = layers[0].self_attn.v_proj.weight.shape[0]
    caches = []
    for layer in layers:
        caches.append(KVCache(capacity))
        with torch.no_grad():
            caches[-1].append(*layer.cross_attention.project_kv(torch.randn(batch, length, dim, generator=g).to(dtype)))
    num_cond = batch if num_cond is None else num_cond
    rows = torch.randperm(batch, generator=g)[:num_cond] if shuffled else None
    R = num_cond + (rows_per_doc - 1) * batch
    h = (torch.randn(R, dim, generator=g) * 2).to(dtype)
    modulations = (torch.randn(len(layers), 9, dim, generator=g) * 0.5).to(dtype)
    return h, modulations, caches, rows, num_cond


def _uncond(layers):
    dim = layers[0].self_attn.v_proj.weight.shape[0]
    zero = layers[0].self_attn.v_proj.weight.new_zeros(1, 1, dim)
    with torch.no_grad():
        return torch.stack([layer.cross_attention(zero, zero)[0, 0] for layer in layers])


def _args(layers, h, modulations, caches, rows, num_cond, compose=False):
    """The op's positional arguments (compose: the fast engine's composed self-attention projection)."""
    layers = layers if isinstance(layers, list) else [layers]
    params, rms, eps, act, post_norms, qk_norm = decode_args(layers, compose_value_output=compose)
    return (h, modulations, params, [c.k for c in caches], [c.v for c in caches], caches[0].length, rows, num_cond,
            _uncond(layers), rms, eps, act, post_norms, qk_norm, [])


def _call(layers, h, modulations, caches, rows, num_cond, backend, compose=False):
    fn = denoiser_layers_decode_ref if backend == "ref" else denoiser_layers_decode
    return fn(*_args(layers, h, modulations, caches, rows, num_cond, compose), backend=backend)


@pytest.mark.parametrize("variant", VARIANTS)
def test_reference_is_the_model_layer(variant):
    """The specification: conditional rows == DenoiserLayer.forward over [zero key; context], unconditional
    rows == DenoiserLayer.forward over the zero key alone, with t_emb's modulations."""
    layer = _layer(variant)
    dim = 64
    context = torch.randn(3, 5, dim)
    keys = torch.cat((torch.zeros(3, 1, dim), context), 1)
    t_emb = torch.randn(1, 1, dim)
    with torch.no_grad():
        modulations = layer.modulator.fc(torch.nn.functional.silu(t_emb))[0, 0].unflatten(0, (9, dim))
        x = torch.randn(5, 1, dim)
        want_cond = layer(x[:3], t_emb.expand(3, 1, dim), keys, None)[:, 0]
        want_uncond = layer(x[3:], t_emb.expand(2, 1, dim), torch.zeros(2, 1, dim), None)[:, 0]
        cache = KVCache(8)
        cache.append(*layer.cross_attention.project_kv(keys))
        got = _call(layer, x[:, 0], modulations[None], [cache], None, 3, "ref")
    torch.testing.assert_close(got, torch.cat((want_cond, want_uncond)), **PARITY_FORWARD)


@pytest.mark.parametrize("backend", ["ref", None])
@pytest.mark.parametrize("shuffled", [False, True])
def test_tensor_length_masks_the_whole_capacity(backend, shuffled):
    """A 0-d length (static shapes, for CUDA graphs) attends over the whole capacity with the positions past
    it masked: the same rows as an int length, whatever finite values the cache holds there."""
    layers = _stack(VARIANTS[0], 2)
    h, modulations, caches, rows, num_cond = _inputs(layers, 3, 2, length=5, capacity=9, shuffled=shuffled)
    for cache in caches:  # stale keys/values past the valid positions
        cache.k[:, :, 5:].normal_(), cache.v[:, :, 5:].normal_()
    args = list(_args(layers, h, modulations, caches, rows, num_cond))
    want = denoiser_layers_decode_ref(*args, backend=backend)
    args[5] = torch.tensor(5)
    torch.testing.assert_close(denoiser_layers_decode_ref(*args, backend=backend), want, **LAYER_DECODE_FP32)
    torch.testing.assert_close(denoiser_layers_decode(*args, backend=backend), want, **LAYER_DECODE_FP32)


@needs_kernel
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("batch,rows_per_doc,num_cond,shuffled", [(1, 2, None, False), (1, 1, None, False),
                                                                   (3, 2, 2, True), (20, 2, None, True),
                                                                   (5, 2, 0, False)])
def test_kernel_matches_reference(variant, batch, rows_per_doc, num_cond, shuffled):
    layer = _layer(variant)
    args = _inputs(layer, batch, rows_per_doc, length=7, capacity=11, num_cond=num_cond, shuffled=shuffled)
    got = _call(layer, *args, backend="ext")
    torch.testing.assert_close(got, _call(layer, *args, backend="ref"), **LAYER_DECODE_FP32)


@needs_kernel
@pytest.mark.parametrize("activation", OTHER_ACTIVATIONS + ["swiglu", "prelu"])
def test_kernel_activations(activation):
    # 12 rows x 408 inner features: the activation runs in several parallel chunks, with vector tails
    layer = _layer(("standard", activation, False, False, False), dim=136, heads=2)
    args = _inputs(layer, 6, 2, length=3, capacity=4)
    torch.testing.assert_close(_call(layer, *args, backend="ext"), _call(layer, *args, backend="ref"),
                               **LAYER_DECODE_FP32)


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(dim_heads=st.sampled_from([(8, 1), (24, 3), (64, 4), (96, 2), (136, 2)]), batch=st.integers(1, 6),
       rows_per_doc=st.integers(1, 2), length=st.integers(1, 9), spare=st.integers(0, 3),
       variant=st.sampled_from(VARIANTS), seed=st.integers(0, 100))
def test_hypothesis_shapes(dim_heads, batch, rows_per_doc, length, spare, variant, seed):
    dim, heads = dim_heads
    layer = _layer(variant, dim, heads)
    args = _inputs(layer, batch, rows_per_doc, length, length + spare, shuffled=seed % 2 == 1, seed=seed)
    torch.testing.assert_close(_call(layer, *args, backend="ext"), _call(layer, *args, backend="ref"),
                               **LAYER_DECODE_FP32)


@needs_kernel
def test_many_rows_take_the_gemm():
    layer = _layer(VARIANTS[0])
    args = _inputs(layer, 40, 2, length=4, capacity=4)  # 80 rows > skinny_linear.MAX_ROWS
    torch.testing.assert_close(_call(layer, *args, backend="ext"), _call(layer, *args, backend="ref"),
                               **LAYER_DECODE_FP32)


@needs_kernel
@pytest.mark.parametrize("variant", VARIANTS[:3])
def test_layer_stack(variant):
    """Three different layers in one call == the reference through the same three layers."""
    layers = _stack(variant, 3)
    args = _inputs(layers, 3, 2, length=5, capacity=7, shuffled=True)
    got = _call(layers, *args, backend="ext")
    torch.testing.assert_close(got, _call(layers, *args, backend="ref"), **LAYER_DECODE_FP32)
    h = args[0]
    for i, layer in enumerate(layers):  # the stack is the layers one after another
        h = _call(layer, h, args[1][i : i + 1], args[2][i : i + 1], *args[3:], backend="ref")
    torch.testing.assert_close(got, h, **LAYER_DECODE_FP32)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", ["ref", pytest.param("ext", marks=needs_kernel)])
def test_composed_value_output(variant, backend):
    """The fast engine's params (self-attention as the one projection W_o W_v, output_proj None) give the
    layers' output within fp32 rounding, through the kernel and the reference."""
    layers = _stack(variant, 2)
    args = _inputs(layers, 3, 2, length=5, capacity=7, shuffled=True)
    torch.testing.assert_close(_call(layers, *args, backend=backend, compose=True), _call(layers, *args, backend="ref"),
                               **LAYER_DECODE_FP32)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_types_two_x_rule(dtype):
    """err(kernel vs fp32 reference) <= 2 err(same-dtype reference vs fp32 reference) + one ulp at |h| ~ 8,
    the fp32 reference running on the half-rounded weights and inputs."""
    half = copy.deepcopy(_layer(VARIANTS[0])).to(dtype)
    exact_layer = copy.deepcopy(half).float()
    h, mods, (cache,), rows, num_cond = _inputs(_layer(VARIANTS[0]), 3, 2, length=6, capacity=8)
    h, mods = h.to(dtype), mods.to(dtype)
    cache.k, cache.v = cache.k.to(dtype), cache.v.to(dtype)
    got = _call(half, h, mods, [cache], rows, num_cond, "ext")
    ref = _call(half, h, mods, [cache], rows, num_cond, "ref")
    exact_cache = copy.copy(cache)
    exact_cache.k, exact_cache.v = cache.k.float(), cache.v.float()
    exact = _call(exact_layer, h.float(), mods.float(), [exact_cache], rows, num_cond, "ref")
    assert got.dtype == dtype
    ulp = 8 * (2**-8 if dtype == torch.bfloat16 else 2**-11)
    err_got, err_ref = (got.float() - exact).abs().max(), (ref.float() - exact).abs().max()
    assert err_got <= 2 * err_ref + ulp, (err_got, err_ref, ulp)


@needs_kernel
def test_opcheck():
    layers = _stack(VARIANTS[0], 2)
    args = _args(layers, *_inputs(layers, 3, 2, length=5, capacity=6, shuffled=True))
    torch.library.opcheck(torch.ops.lcm_fast.denoiser_layers_decode, args)


@needs_kernel
def test_bad_input_is_named():
    layers = _stack(VARIANTS[0], 2)
    h, mods, caches, rows, num_cond, uncond = *_inputs(layers, 2, 2, length=3, capacity=4), _uncond(layers)
    params, rms, eps, act, post_norms, qk_norm = decode_args(layers)

    def call(**kw):
        a = dict(h=h, modulations=mods, params=params, keys=[c.k for c in caches], values=[c.v for c in caches],
                 length=3, rows=rows, num_cond=num_cond, uncond_cross=uncond, rms=rms, eps=eps, activation=act)
        a.update(kw)
        return denoiser_layers_decode(**a, backend="ext")

    with pytest.raises(ValueError, match="params needs 27 entries per layer"):
        call(params=params[:-1])
    with pytest.raises(ValueError, match="one keys and one values tensor per layer"):
        call(values=[caches[0].v])
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        call(activation="swish")
    with pytest.raises(ValueError, match=r"modulations \[layers, 9, D\]"):
        call(modulations=mods[:, :8])
    with pytest.raises(RuntimeError, match=r"rows\[1\] = 7 is not a batch row"):
        call(rows=torch.tensor([0, 7]))
    with pytest.raises(RuntimeError, match="length 0 outside"):
        call(length=0)
    with pytest.raises(RuntimeError, match=r"params\[29\] must be contiguous"):
        call(params=[p.T if i == 29 else p for i, p in enumerate(params)])
    with pytest.raises(RuntimeError, match="layer 1 has"):
        call(keys=[caches[0].k, caches[1].k[:, :, :3]], values=[caches[0].v, caches[1].v[:, :, :3]])
    with pytest.raises(ValueError, match="io_params must be empty or the 7 IO_TENSORS"):
        call(io_params=[None] * 7)
    w = torch.randn(64, 24)
    with pytest.raises(ValueError, match=r"latents h \[R, 64\] do not match the input projection \(64, 24\)"):
        call(io_params=[w, None, None, None, None, w.T.contiguous(), None])


# (norm style, activation, denoiser pos_embedding_style, projection bias)
DENOISERS = [("rms", "swiglu", "none", True), ("standard", "relu", "learned", False), ("fp32", "gelu", "sine", True)]


def _step_args(den, x, context, step=0, rows=None, num_cond=2):
    """The op's positional arguments for one fast-engine step of Denoiser ``den`` (decoding_tables of the
    schedule [37, 10], io_params included) on latents x [R, S], with [zero; context] [B, C, D] cached."""
    tables = decoding_tables(den, [37, 10])
    dtype = den.initial_proj.fc.weight.dtype
    caches = [KVCache(context.shape[1] + 3) for _ in den.layers]
    keys = torch.cat((context.new_zeros(context.shape[0], 1, context.shape[2]), context), 1).to(dtype)
    for layer, c in zip(den.layers, caches):
        c.append(*layer.cross_attention.project_kv(keys))
    params, rms, eps, act, post_norms, qk_norm = tables.layers_args
    return (x.to(dtype), tables.modulations[step], params, [c.k for c in caches], [c.v for c in caches], keys.shape[1],
            rows, num_cond, tables.uncond_cross, rms, eps, act, post_norms, qk_norm, tables.io_params)


def _step(den, x, context, backend):
    fn = denoiser_layers_decode_ref if backend == "ref" else denoiser_layers_decode
    with torch.no_grad():
        return fn(*_step_args(den, x, context), backend=backend)


@pytest.mark.parametrize("norm,activation,positions,bias", DENOISERS)
@pytest.mark.parametrize("backend", ["ref", None, pytest.param("ext", marks=needs_kernel)])
def test_whole_denoiser_with_io_params(norm, activation, positions, bias, backend):
    """With io_params the call is the model's denoiser at inference: input projection + position 0, the
    layers, final norm, output projection (the fast engine's arguments, composed self-attention included)."""
    stack = dict(layer_normalization_style=norm, use_swiglu=activation == "swiglu", ffn_inner_activation_name=
                 "relu" if activation == "swiglu" else activation, pos_embedding_style=positions,
                 pre_denoiser=dict(linear_bias=bias), post_denoiser=dict(linear_bias=bias))
    model = random_model(tiny_config("two_tower_diffusion_lcm", denoiser=stack))
    den, S = model.denoiser, model.sonar_dim
    context, x, t = torch.randn(2, 4, 16), torch.randn(3, 1, S), 37
    with torch.no_grad():
        want_cond = den(x[:2], torch.full((2, 1), t), context, inference=True)
        want_uncond = den(x[2:], torch.full((1, 1), t), context[:1, :0], inference=True)
    io_params = decoding_tables(den, [37, 10]).io_params
    assert len(io_params) == len(IO_TENSORS) and (io_params[2] is None) == (positions == "none")
    torch.testing.assert_close(_step(den, x[:, 0], context, backend), torch.cat((want_cond, want_uncond))[:, 0],
                               **PARITY_FORWARD)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_whole_denoiser_half_types_two_x_rule(dtype):
    """io_params in half types: err(kernel vs fp32 reference) <= 2 err(same-dtype reference vs fp32
    reference) + one output ulp, the fp32 reference running on the half-rounded weights."""
    half = random_model(tiny_config("two_tower_diffusion_lcm", denoiser=dict(pos_embedding_style="learned")))
    half = half.to(dtype).denoiser
    x, context = torch.randn(3, 24), torch.randn(2, 4, 16)
    got, ref = _step(half, x, context, "ext"), _step(half, x, context, "ref")
    exact = _step(copy.deepcopy(half).float(), x, context, "ref")
    assert got.dtype == dtype
    ulp = exact.abs().max() * (2**-8 if dtype == torch.bfloat16 else 2**-11)
    err_got, err_ref = (got.float() - exact).abs().max(), (ref.float() - exact).abs().max()
    assert err_got <= 2 * err_ref + ulp, (err_got, err_ref, ulp)


@needs_kernel
def test_opcheck_with_io_params():
    model = random_model(tiny_config("two_tower_diffusion_lcm", denoiser=dict(pos_embedding_style="learned")))
    with torch.no_grad():
        args = list(_step_args(model.denoiser, torch.randn(4, 24), torch.randn(2, 3, 16), step=1,
                               rows=torch.tensor([1, 0])))
    # as the fast engine passes them: inference only, nothing requires grad
    args[2], args[-1] = ([p.detach() if p is not None else None for p in ps] for ps in (args[2], args[-1]))
    torch.library.opcheck(torch.ops.lcm_fast.denoiser_layers_decode, tuple(args))


def test_cpu_only_op_says_so():
    assert any("cpu only" in r for r in SPEC.reasons("cuda", torch.float32))
