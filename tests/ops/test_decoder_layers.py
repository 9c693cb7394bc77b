"""decoder_layers_decode: the reference against the model's DecoderLayer on its KV cache, the CPU kernel
against the reference over layer variants, stacks, shapes and dtypes (outputs and cache writes); a tensor
length; opcheck; errors."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lcm_fast.config import TransformerConfig
from lcm_fast.nn.attention import KVCache
from lcm_fast.nn.norm import norm_args
from lcm_fast.nn.position import RotaryEncoder
from lcm_fast.nn.transformer import DecoderLayer, decode_args
from lcm_fast.ops import decoder_layers_decode, decoder_layers_decode_ref
from lcm_fast.ops.decoder import SPEC

from ..tolerances import LAYER_DECODE_FP32, PARITY_FORWARD

needs_kernel = pytest.mark.skipif(not SPEC.has_kernel("cpu"), reason="lcm_fast._C not built")

# (norm style, activation or "swiglu", normformer, q/k norm, rope)
VARIANTS = [
    ("rms", "swiglu", False, False, True),  # the released 1.6B recipe
    ("standard", "relu", False, False, False),  # the official defaults (learned positions in the frontend)
    ("unit", "gelu", True, True, True),
    ("fp32", "prelu", True, False, False),
    ("standard", "swiglu", True, True, True),
    ("rms", "tanh", False, True, False),
]
_LAYERS: dict = {}


def _stack(variant, n=1, dim=64, heads=4) -> list[DecoderLayer]:
    """n different layers of one configuration (sharing one RoPE table, as a Decoder's layers do)."""
    key = (variant, n, dim, heads)
    if key not in _LAYERS:
        norm, act, normformer, qk_norm, rope = variant
        config = TransformerConfig(
            num_attn_heads=heads, ffn_inner_dim=3 * dim, use_swiglu=act == "swiglu",
            ffn_inner_activation_name="relu" if act == "swiglu" else act, layer_normalization_style=norm,
            norm_order_style="normformer" if normformer else "pre", enable_qk_layernorm=qk_norm,
            mha_output_proj_bias=norm == "rms",
        )
        torch.manual_seed(len(_LAYERS))
        encoder = RotaryEncoder(dim // heads, 64, 10000.0) if rope else None
        layers = [DecoderLayer(dim, config, encoder).eval() for _ in range(n)]
        with torch.no_grad():  # norms and PReLU away from their identity initialisation
            for layer in layers:
                for name, p in layer.named_parameters():
                    if "norm" in name or "activation" in name:
                        p.add_(0.3 * torch.randn_like(p))
        _LAYERS[key] = layers
    return _LAYERS[key]


def _rope(layers) -> torch.Tensor | None:
    encoder = layers[0].self_attn.pos_encoder
    return torch.stack(encoder.tables(torch.device("cpu")), dim=-1).contiguous() if encoder is not None else None


def _caches(layers, batch, length, capacity, seed=0, dtype=None) -> list[KVCache]:
    """Per layer a cache holding ``length`` positions of random keys/values, garbage past them."""
    g = torch.Generator().manual_seed(seed)
    heads, dim = layers[0].self_attn.num_heads, layers[0].self_attn.q_proj.weight.shape[0]
    dtype = dtype or layers[0].self_attn.q_proj.weight.dtype
    caches = []
    for _ in layers:
        cache = KVCache(capacity)
        cache.k, cache.v = (torch.randn(batch, heads, capacity, dim // heads, generator=g).to(dtype) for _ in "kv")
        cache.length, cache.batch = length, batch
        caches.append(cache)
    return caches


def _call(layers, h, caches, backend, length=None, rows=None, num_cond=None, final_norm=()):
    """The op on copies of the caches -> (output, [keys], [values]); num_cond None: every row of h."""
    caches = copy.deepcopy(caches)
    params, rms, eps, act, post_norms, qk_norm = decode_args(layers)
    fn = decoder_layers_decode_ref if backend == "ref" else decoder_layers_decode
    keys, values = [c.k for c in caches], [c.v for c in caches]
    length = caches[0].length if length is None else length
    num_cond = h.shape[0] if num_cond is None else num_cond
    with torch.no_grad():
        out = fn(h, params, keys, values, length, rows, num_cond, _rope(layers), rms, eps, act, post_norms, qk_norm,
                 final_norm, backend=backend)
    return out, keys, values


def _assert_same(got, want, tol=LAYER_DECODE_FP32):
    for a, b in zip([got[0], *got[1], *got[2]], [want[0], *want[1], *want[2]]):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("variant", VARIANTS)
def test_reference_is_the_model_layer(variant):
    """The specification: the new position through DecoderLayer.forward on its cache (output and the cache's
    new key/value), the layers one after another."""
    layers = _stack(variant, 2)
    caches = _caches(layers, 3, length=5, capacity=8)
    h = torch.randn(3, 64)
    with torch.no_grad():
        modules = copy.deepcopy(caches)
        want = h[:, None]
        for layer, cache in zip(layers, modules):
            want = layer(want, None, cache)
        got, keys, values = _call(layers, h, caches, "ref")
    torch.testing.assert_close(got, want[:, 0], **PARITY_FORWARD)
    for k, v, cache in zip(keys, values, modules):
        torch.testing.assert_close(k[:, :, :6], cache.k[:, :, :6], **PARITY_FORWARD)
        torch.testing.assert_close(v[:, :, :6], cache.v[:, :, :6], **PARITY_FORWARD)


@pytest.mark.parametrize("variant", VARIANTS[:3])
def test_reference_rows_and_unconditional_rows(variant):
    """Conditional rows through a row index write and attend over their batch row's cache; rows past num_cond
    are DecoderLayer.forward without a cache (each attends to itself only; without RoPE, whose position the
    module would take as 0)."""
    layers = _stack(variant, 2)
    caches = _caches(layers, 4, length=5, capacity=8)
    rows, h = torch.tensor([2, 0]), torch.randn(3, 64)  # rows 0, 1 -> batch rows 2, 0; row 2 unconditional
    with torch.no_grad():
        modules = [c.select(rows) for c in caches]
        cond, uncond = h[:2, None], h[2:, None]
        for layer, cache in zip(layers, modules):
            cond, uncond = layer(cond, None, cache), layer(uncond, None, None)
    got, keys, values = _call(layers, h, caches, "ref", rows=rows, num_cond=2)
    torch.testing.assert_close(got[:2], cond[:, 0], **PARITY_FORWARD)
    if layers[0].self_attn.pos_encoder is None:
        torch.testing.assert_close(got[2:], uncond[:, 0], **PARITY_FORWARD)
    for k, cache, before in zip(keys, modules, caches):
        torch.testing.assert_close(k[rows, :, :6], cache.k[:, :, :6], **PARITY_FORWARD)
        assert torch.equal(k[[1, 3]], before.k[[1, 3]])  # the other batch rows untouched


@pytest.mark.parametrize("backend", ["ref", None])
def test_tensor_length_masks_the_whole_capacity(backend):
    """A 0-d length (static shapes, for CUDA graphs): the same output and cache writes as an int length, whatever
    the caches hold past it."""
    layers = _stack(VARIANTS[0], 2)
    caches, h = _caches(layers, 3, length=4, capacity=9), torch.randn(3, 64)
    want = _call(layers, h, caches, backend)
    _assert_same(_call(layers, h, caches, backend, length=torch.tensor(4)), want)


@needs_kernel
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("batch,length,capacity", [(1, 0, 1), (1, 7, 11), (4, 3, 4), (20, 5, 9)])
@pytest.mark.parametrize("cfg", [False, True])  # One-Tower's CFG: shuffled conditional rows, then as many alone
def test_kernel_matches_reference(variant, batch, length, capacity, cfg):
    layers = _stack(variant, 2)
    caches = _caches(layers, batch, length, capacity)
    rows = torch.randperm(batch, generator=torch.Generator().manual_seed(batch)) if cfg else None
    h = torch.randn(2 * batch if cfg else batch, 64) * 2
    args = dict(rows=rows, num_cond=batch)
    _assert_same(_call(layers, h, caches, "ext", **args), _call(layers, h, caches, "ref", **args))


@needs_kernel
@pytest.mark.parametrize("activation", ["elu", "leaky_relu", "selu", "silu", "softsign", "sigmoid", "hardsigmoid"])
def test_kernel_activations(activation):
    layers = _stack(("standard", activation, False, False, True), dim=136, heads=2)
    caches, h = _caches(layers, 6, 3, 5), torch.randn(6, 136)
    _assert_same(_call(layers, h, caches, "ext"), _call(layers, h, caches, "ref"))


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(dim_heads=st.sampled_from([(8, 1), (24, 3), (64, 4), (96, 2), (136, 2)]), batch=st.integers(1, 6),
       length=st.integers(0, 9), spare=st.integers(1, 3), n=st.integers(1, 3), variant=st.sampled_from(VARIANTS),
       num_cond=st.integers(0, 6), uncond=st.integers(0, 3), seed=st.integers(0, 100))
def test_hypothesis_shapes(dim_heads, batch, length, spare, n, variant, num_cond, uncond, seed):
    dim, heads = dim_heads
    layers = _stack(variant, n, dim, heads)
    caches = _caches(layers, batch, length, length + spare, seed=seed)
    g = torch.Generator().manual_seed(seed)
    num_cond = min(num_cond, batch)
    rows = torch.randperm(batch, generator=g)[:num_cond] if seed % 2 else None
    h = torch.randn(max(num_cond + uncond, 1), dim, generator=g)
    args = dict(rows=rows, num_cond=num_cond)
    _assert_same(_call(layers, h, caches, "ext", **args), _call(layers, h, caches, "ref", **args))


@needs_kernel
def test_many_rows_take_the_gemm():
    layers = _stack(VARIANTS[0])
    caches, h = _caches(layers, 70, 4, 5), torch.randn(70, 64)  # 70 rows > skinny_linear.MAX_ROWS
    _assert_same(_call(layers, h, caches, "ext"), _call(layers, h, caches, "ref"))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_types_two_x_rule(dtype):
    """err(kernel vs fp32 reference) <= 2 err(same-dtype reference vs fp32 reference) + one ulp at |h| ~ 8,
    the fp32 reference running on the half-rounded weights, inputs and caches."""
    half = [copy.deepcopy(layer).to(dtype) for layer in _stack(VARIANTS[0], 2)]
    exact_layers = [copy.deepcopy(layer).float() for layer in half]
    caches, h = _caches(half, 3, 6, 8, dtype=dtype), torch.randn(3, 64).to(dtype)
    got, ref = _call(half, h, caches, "ext")[0], _call(half, h, caches, "ref")[0]
    exact_caches = copy.deepcopy(caches)
    for cache in exact_caches:
        cache.k, cache.v = cache.k.float(), cache.v.float()
    exact = _call(exact_layers, h.float(), exact_caches, "ref")[0]
    assert got.dtype == dtype
    ulp = 8 * (2**-8 if dtype == torch.bfloat16 else 2**-11)
    err_got, err_ref = (got.float() - exact).abs().max(), (ref.float() - exact).abs().max()
    assert err_got <= 2 * err_ref + ulp, (err_got, err_ref, ulp)


@needs_kernel
@pytest.mark.parametrize("variant", VARIANTS)
def test_final_norm(variant):
    """final_norm: the stack's final norm (here one of the layers' style) applied to the layers' output, fused with
    the last residual on the composed path, after the layers in the kernel."""
    layers = _stack(variant, 2)
    caches = _caches(layers, 3, length=5, capacity=8)
    h = torch.randn(3, 64)
    norm = copy.deepcopy(layers[0].ffn_layer_norm)
    with torch.no_grad():
        for p in norm.parameters():
            p.add_(0.3 * torch.randn_like(p))
        want = norm(_call(layers, h, caches, "ref")[0])
    final_norm = norm_args(norm)[:2]
    torch.testing.assert_close(_call(layers, h, caches, "ref", final_norm=final_norm)[0], want, **PARITY_FORWARD)
    torch.testing.assert_close(_call(layers, h, caches, "ext", final_norm=final_norm)[0], want, **LAYER_DECODE_FP32)


@needs_kernel
def test_opcheck():
    layers = _stack(VARIANTS[0], 2)
    caches = _caches(layers, 3, 4, 6)
    params, rms, eps, act, post_norms, qk_norm = decode_args(layers)
    params = [p.detach() if p is not None else None for p in params]  # inference only, as the engine passes them
    args = (torch.randn(4, 64), params, [c.k for c in caches], [c.v for c in caches], 4, torch.tensor([2, 0]), 2,
            _rope(layers), rms, eps, act, post_norms, qk_norm, [None, None])
    torch.library.opcheck(torch.ops.lcm_fast.decoder_layers_decode, args)


@needs_kernel
def test_bad_input_is_named():
    layers = _stack(VARIANTS[0], 2)
    caches, h, rope = _caches(layers, 2, 3, 4), torch.randn(2, 64), _rope(layers)
    params, rms, eps, act, post_norms, qk_norm = decode_args(layers)

    def call(**kw):
        a = dict(h=h, params=params, keys=[c.k for c in caches], values=[c.v for c in caches], length=3, rows=None,
                 num_cond=2, rope=rope, rms=rms, eps=eps, activation=act)
        a.update(kw)
        return decoder_layers_decode(**a, backend="ext")

    with pytest.raises(ValueError, match="params needs 27 entries per layer"):
        call(params=params[:-1])
    with pytest.raises(ValueError, match="one keys and one values tensor per layer"):
        call(values=[caches[0].v])
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        call(activation="swish")
    with pytest.raises(ValueError, match=r"num_cond in \[0, R\], got \(2, 64\), \(2, 4, 4, 16\) and 3"):
        call(num_cond=3)
    with pytest.raises(RuntimeError, match="3 conditional rows but the cache has 2"):
        call(h=torch.randn(3, 64), num_cond=3)
    with pytest.raises(RuntimeError, match=r"rows\[1\] = 0 twice"):
        call(rows=torch.tensor([0, 0]))
    with pytest.raises(RuntimeError, match=r"rows\[0\] = 5 is not a batch row"):
        call(rows=torch.tensor([5, 0]))
    with pytest.raises(ValueError, match=r"rope must be fp32 \[positions, head_dim / 2, 2\]"):
        call(rope=rope[:, :4])
    with pytest.raises(ValueError, match=r"final_norm must be empty or \[weight, bias\], got 1"):
        call(final_norm=[params[0]])
    with pytest.raises(RuntimeError, match="length 4 outside .0, 4.: the caches need room"):
        call(length=4)
    with pytest.raises(RuntimeError, match=r"params\[29\] must be contiguous"):
        call(params=[p.T if i == 29 else p for i, p in enumerate(params)])
    with pytest.raises(RuntimeError, match="layer 1 has"):
        call(keys=[caches[0].k, caches[1].k[:, :, :3].contiguous()], values=[caches[0].v, caches[1].v[:, :, :3]])
    with pytest.raises(RuntimeError, match="position 3 has no RoPE entry"):
        call(rope=rope[:3])


def test_cpu_only_op_says_so():
    assert any("cpu only" in r for r in SPEC.reasons("cuda", torch.float32))
