"""``denoiser_layers_decode``: the AdaLN denoiser layers for the few rows of a decoding step, in one call.

The fast engine (``inference/fast.py``) runs every Two-Tower denoiser layer on one or two rows per
document at each DDIM step. Issued from Python as ~20 small ops per layer, a layer took 4.6x as long
at model dim 256 (1.8x at 512; bench/RESULTS.md) as in one C++ call; the CPU kernel
(``csrc/decode/``) runs the same sequence (the skinny-linear and AdaLN kernels, attention over the
cached keys) for every layer of the step without leaving C++. On CUDA, or without the extension, the
layers run as the composed ops of :func:`denoiser_layers_decode_ref`, each still dispatching to its own
fused kernel.

What one layer computes for rows ``h`` [R, D] (``models/two_tower.py`` ``DenoiserLayer`` at inference),
with ``(sh, sc, g)`` the step's AdaLN shift/scale/gate of each sublayer (rows of ``modulations``)::

    y = norm_sa(h) (1 + sc_sa) + sh_sa
    a = out_sa(v(y))                    # self-attention over one position [+ normformer norm];
                                        # v(y) alone when out_sa's weight is None (v = out_sa o v)
    h = h + g_sa a;   y = norm_ca(h) (1 + sc_ca) + sh_ca
    c = out_ca(attn(q(y), K, V))        # rows < num_cond: SDPA over batch row rows[r]'s cached keys
    c = uncond_cross                    # rows >= num_cond: they see only the zero key
    h = h + g_ca c;   y = norm_ff(h) (1 + sc_ff) + sh_ff
    h = h + g_ff ffn(y)

With ``io_params`` (:data:`IO_TENSORS`) the call is the whole denoiser of a step: ``h`` holds the latents
[R, S], projected in first (``h = in(x) + offset``, the position-0 encoding) and normed and projected out
after the layers (``out(norm(h))``) -> [R, S]. That saves the fast engine four more dispatches per step.

``length`` may be a 0-d int64 tensor (composed path only): cross-attention then reads the caches' whole
capacity with the positions >= length masked, so that every shape of a step is fixed and a CUDA graph of
the step replays for any context length (the caches must hold finite values past ``length``).

Queries sit at position 0, where RoPE is the identity, so cross-attention queries are never rotated
(cached keys carry their own rotation).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _ext
from ._dispatch import OpSpec, register
from .adaln import adaln_gated_residual_norm_modulate, adaln_norm_modulate
from .linear import in_features, skinny_linear, skinny_linear_multi

#: what a layer's FFN sublayer contributes to ``params``, last in both decoding ops (``csrc/decode/layer_decode.h``
#: ``FfnParam``); the models list their own tensors in this order (``FeedForward.decode_tensors``)
FFN_TENSORS = (
    "ffn_norm_weight", "ffn_norm_bias",
    "gate_weight", "gate_bias",  # SwiGLU only
    "inner_weight", "inner_bias",
    "prelu_weight",  # PReLU only
    "inner_norm_weight", "inner_norm_bias",  # normformer without SwiGLU
    "ffn_out_weight", "ffn_out_bias",
)
#: one layer's tensors in ``params`` (``csrc/decode/denoiser_layers_cpu.cpp`` ``Param``), None where a layer has
#: none; ``DenoiserLayer.decode_tensors`` lists a layer's
LAYER_TENSORS = (
    "self_attn_norm_weight", "self_attn_norm_bias",
    "value_weight", "value_bias",
    "self_attn_out_weight", "self_attn_out_bias",  # None: the value projection is the composed output o value
    "self_attn_post_norm_weight", "self_attn_post_norm_bias",  # normformer only
    "cross_norm_weight", "cross_norm_bias",
    "query_weight", "query_bias",
    "query_norm_weight", "query_norm_bias",  # q/k norm only
    "cross_out_weight", "cross_out_bias",
    *FFN_TENSORS,
)
#: ``io_params``: the denoiser's input projection, the constant position-0 encoding added after it (None without
#: one), its final norm and output projection, projections without activation (``Denoiser.decode_io_tensors``)
IO_TENSORS = ("in_weight", "in_bias", "position_0", "norm_weight", "norm_bias", "out_weight", "out_bias")
#: FFN activations (``nn/activation.py`` names); ``swiglu`` is ``silu(gate_proj(y)) * inner_proj(y)``
ACTIVATIONS = {
    "swiglu": F.silu, "relu": F.relu, "tanh": torch.tanh, "elu": F.elu, "leaky_relu": F.leaky_relu,
    "prelu": F.prelu, "selu": F.selu, "gelu": F.gelu, "silu": F.silu, "softsign": F.softsign,
    "sigmoid": torch.sigmoid, "hardsigmoid": F.hardsigmoid,
}


# CPU only: on CUDA the layers run as their fused sub-ops (launch overhead there is for CUDA graphs to remove)
SPEC = register(OpSpec("denoiser_layers_decode", devices=("cpu",)))


def check_layer_lists(op: str, params: Sequence[Optional[Tensor]], keys: Sequence[Tensor], values: Sequence[Tensor],
                      names: str, per_layer: int, activation: str) -> None:
    """What the decode ops share: one keys and one values tensor per layer, ``per_layer`` params each (the
    constant ``names``), a known activation."""
    layers = len(keys)
    if layers == 0 or len(values) != layers:
        raise ValueError(f"{op}: one keys and one values tensor per layer, got {len(keys)} and {len(values)}")
    if len(params) != layers * per_layer:
        raise ValueError(f"{op}: params needs {per_layer} entries per layer ({names}), {layers * per_layer} for "
                         f"{layers} layers, got {len(params)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: unknown activation '{activation}'; expected one of {sorted(ACTIVATIONS)}")


def _check_args(h: Tensor, modulations: Tensor, params: Sequence[Optional[Tensor]], keys: Sequence[Tensor],
                values: Sequence[Tensor], uncond_cross: Tensor, activation: str,
                io_params: Sequence[Optional[Tensor]]) -> None:
    op, layers = "denoiser_layers_decode", len(keys)
    check_layer_lists(op, params, keys, values, "LAYER_TENSORS", len(LAYER_TENSORS), activation)
    if io_params and (len(io_params) != len(IO_TENSORS) or io_params[0] is None or io_params[5] is None):
        raise ValueError(f"{op}: io_params must be empty or the {len(IO_TENSORS)} IO_TENSORS with both projection "
                         f"weights, got {len(io_params)} entries")
    dim = io_params[0].shape[0] if io_params else h.shape[-1]
    if io_params and h.shape[-1] != in_features(io_params[0]):
        raise ValueError(f"{op}: latents h [R, {h.shape[-1]}] do not match the input projection "
                         f"{tuple(io_params[0].shape)}")
    if h.dim() != 2 or modulations.shape != (layers, 9, dim) or uncond_cross.shape != (layers, dim):
        raise ValueError(f"{op}: h must be [R, D] ([R, S] with io_params), modulations [layers, 9, D] and uncond_cross "
                         f"[layers, D], got {tuple(h.shape)}, {tuple(modulations.shape)} and {tuple(uncond_cross.shape)}")


def denoiser_layers_decode_ref(
    h: Tensor, modulations: Tensor, params: Sequence[Optional[Tensor]], keys: Sequence[Tensor],
    values: Sequence[Tensor], length: int | Tensor, rows: Optional[Tensor], num_cond: int, uncond_cross: Tensor,
    rms: bool, eps: float, activation: str, post_norms: bool, qk_norm: bool,
    io_params: Sequence[Optional[Tensor]] = (), *, backend: Optional[str] = "ref",
) -> Tensor:
    """Composed twin: h [R, D] -> [R, D] through every layer, or latents [R, S] -> [R, S] through the whole
    denoiser with ``io_params`` (see the module docstring).

    modulations: [layers, 9, D] (shift, scale, gate of self-attention, cross-attention, FFN); params:
    each layer's :data:`LAYER_TENSORS`, layer after layer; keys, values: per layer the [B, H, capacity,
    D / H] cross-attention cache, the first ``length`` positions valid (an int, or a 0-d int64 tensor:
    see the module docstring); rows: [num_cond] int64 batch row of each conditional row (None: row r); uncond_cross: [layers, D]; rms / eps: the layers' norm style;
    activation: a key of :data:`ACTIVATIONS`; post_norms: normformer (norm after self-attention, and the
    FFN inner norm without SwiGLU); qk_norm: the query norm; io_params: empty, or :data:`IO_TENSORS` (the
    final norm has the layers' style). ``backend`` goes to every sub-op: "ref" makes this plain PyTorch
    (the specification), None lets each sub-op take its fused kernel (the composed fallback).
    """
    _check_args(h, modulations, params, keys, values, uncond_cross, activation, io_params)
    n, layers = len(LAYER_TENSORS), len(keys)
    if io_params:
        in_w, in_b, offset, norm_w, norm_b, out_w, out_b = io_params
        h = skinny_linear(h, in_w, in_b, backend=backend)
        h = h + offset if offset is not None else h
    if isinstance(length, Tensor):  # [1, 1, 1, capacity]: 0 where a cached position is valid, -inf past length
        length = attention_bias(keys[0].shape[2], length, h.dtype)
    # Each layer's FFN residual is fused with the next norm (the next layer's self-attention norm + modulate,
    # or the final norm): one op per layer boundary instead of three.
    sh_sa, sc_sa = modulations[0, 0], modulations[0, 1]
    y = adaln_norm_modulate(h, sh_sa, sc_sa, params[0], params[1], rms=rms, eps=eps, backend=backend)
    for i, (mods, k, v, uncond) in enumerate(zip(modulations, keys, values, uncond_cross)):
        h, f = _layer_ref(h, y, mods, params[i * n : (i + 1) * n], k, v, length, rows, num_cond, uncond, rms, eps,
                          activation, post_norms, qk_norm, backend)
        if i + 1 < layers:
            nxt = modulations[i + 1]
            h, y = adaln_gated_residual_norm_modulate(h, f, mods[8], nxt[0], nxt[1], params[(i + 1) * n],
                                                      params[(i + 1) * n + 1], rms=rms, eps=eps, backend=backend)
        elif io_params:
            zero = uncond_cross.new_zeros(h.shape[-1])
            _, y = adaln_gated_residual_norm_modulate(h, f, mods[8], zero, zero, norm_w, norm_b, rms=rms, eps=eps,
                                                      backend=backend)
            return skinny_linear(y, out_w, out_b, backend=backend)
        else:
            h = h + mods[8] * f
    return h


def attention_bias(capacity: int, length: Tensor, dtype: torch.dtype, inclusive: bool = False) -> Tensor:
    """[1, 1, 1, capacity] additive attention mask of a static-shape step: 0 at the cached positions < ``length``
    (<= with ``inclusive``), -inf past them. Built once per step: SDPA turns a boolean mask into this in every layer."""
    positions = torch.arange(capacity, device=length.device)
    valid = positions <= length if inclusive else positions < length
    bias = torch.full((capacity,), float("-inf"), dtype=dtype, device=length.device).masked_fill_(valid, 0.0)
    return bias[None, None, None]


def plain_norm(x: Tensor, w: Optional[Tensor], b: Optional[Tensor], rms: bool, eps: float,
               backend: Optional[str], zero: Optional[Tensor] = None) -> Tensor:
    """The layers' norm without modulation (the AdaLN op with zero shift and scale; ``zero`` [D], made once per
    step by a caller that has one)."""
    zero = x.new_zeros(x.shape[-1]) if zero is None else zero
    return adaln_norm_modulate(x, zero, zero, w, b, rms=rms, eps=eps, backend=backend)


def ffn_ref(y: Tensor, params: Sequence[Optional[Tensor]], rms: bool, eps: float, activation: str, post_norms: bool,
            backend: Optional[str]) -> Tensor:
    """The FFN sublayer's branch on normed rows y [R, D] -> [R, D]; params: :data:`FFN_TENSORS` after the norm."""
    gate_w, gate_b, in_w, in_b, act_w, inn_w, inn_b, out_w, out_b = params

    def linear(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
        return skinny_linear(x, w, b, backend=backend)

    act = ACTIVATIONS[activation]
    if activation == "swiglu":  # one op: both projections and the product
        u = skinny_linear_multi(y, (gate_w, in_w), (gate_b, in_b), glu=True, backend=backend)
    else:
        u = act(linear(y, in_w, in_b), act_w) if activation == "prelu" else act(linear(y, in_w, in_b))
        if post_norms:
            u = plain_norm(u, inn_w, inn_b, rms, eps, backend)
    return linear(u, out_w, out_b)


def _layer_ref(h: Tensor, y: Tensor, modulations: Tensor, params: Sequence[Optional[Tensor]], keys: Tensor,
               values: Tensor, length: int | Tensor, rows: Optional[Tensor], num_cond: int, uncond_cross: Tensor,
               rms: bool, eps: float, activation: str, post_norms: bool, qk_norm: bool,
               backend: Optional[str]) -> tuple[Tensor, Tensor]:
    """One layer up to its FFN branch: h [R, D] and y, its self-attention norm + modulate, -> (h after the
    cross-attention residual, the FFN branch f), the layer's output being h + gate_ff f. modulations [9, D]
    (one row for every row); params in LAYER_TENSORS order; keys/values its cache; uncond_cross [D]; length: the
    number of valid cached positions, or their additive mask [1, 1, 1, capacity]."""
    (sa_w, sa_b, v_w, v_b, sao_w, sao_b, san_w, san_b, ca_w, ca_b, q_w, q_b, qn_w, qn_b, cao_w, cao_b,
     ff_w, ff_b, gate_w, gate_b, in_w, in_b, act_w, inn_w, inn_b, out_w, out_b) = params
    _, _, g_sa, sh_ca, sc_ca, g_ca, sh_ff, sc_ff, _ = modulations.unbind(0)

    def linear(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
        return skinny_linear(x, w, b, backend=backend)

    a = linear(y, v_w, v_b)
    if sao_w is not None:
        a = linear(a, sao_w, sao_b)
    if post_norms:
        a = plain_norm(a, san_w, san_b, rms, eps, backend)
    h, y = adaln_gated_residual_norm_modulate(h, a, g_sa, sh_ca, sc_ca, ca_w, ca_b, rms=rms, eps=eps, backend=backend)
    c = uncond_cross.expand(h.shape[0] - num_cond, -1)
    if num_cond:
        q = linear(y[:num_cond], q_w, q_b)
        if qk_norm:
            q = plain_norm(q, qn_w, qn_b, rms, eps, backend)
        mask = length if isinstance(length, Tensor) else None
        k, v = (keys, values) if mask is not None else (keys[:, :, :length], values[:, :, :length])
        if rows is not None:
            k, v = k.index_select(0, rows), v.index_select(0, rows)
        else:
            k, v = k[:num_cond], v[:num_cond]
        o = F.scaled_dot_product_attention(q.unflatten(-1, (keys.shape[1], -1))[:, :, None], k, v,
                                           attn_mask=mask)  # [C, H, 1, hd]
        c = linear(o.flatten(1), cao_w, cao_b)
        if num_cond < h.shape[0]:  # the unconditional rows see only the zero key: a constant
            c = torch.cat((c, uncond_cross.expand(h.shape[0] - num_cond, -1)))
    h, y = adaln_gated_residual_norm_modulate(h, c, g_ca, sh_ff, sc_ff, ff_w, ff_b, rms=rms, eps=eps, backend=backend)
    return h, ffn_ref(y, (gate_w, gate_b, in_w, in_b, act_w, inn_w, inn_b, out_w, out_b), rms, eps, activation,
                      post_norms, backend)


if _ext.EXT_AVAILABLE:

    @torch.library.register_fake("lcm_fast::denoiser_layers_decode")
    def _denoiser_layers_decode_fake(h, modulations, params, keys, values, length, rows, num_cond, uncond_cross, rms,
                                     eps, activation, post_norms, qk_norm, io_params):
        return h.new_empty(h.shape[0], io_params[5].shape[0]) if io_params else torch.empty_like(h)


def denoiser_layers_decode_for(device_type: str, dtype: torch.dtype,
                               backend: Optional[str] = None) -> Callable[..., Tensor]:
    """The implementation :func:`denoiser_layers_decode` takes for inputs on this device and of this dtype,
    resolved once for a generation call (choosing and checking per call costs ~10 us, per step).
    Takes the op's positional arguments."""
    if device_type not in SPEC.devices or SPEC.choose(device_type, dtype, backend) == "ref":
        # a forced "ref" means plain PyTorch throughout; otherwise each sub-op makes its own choice
        return functools.partial(denoiser_layers_decode_ref, backend=backend)
    return torch.ops.lcm_fast.denoiser_layers_decode.default


def denoiser_layers_decode(
    h: Tensor, modulations: Tensor, params: Sequence[Optional[Tensor]], keys: Sequence[Tensor],
    values: Sequence[Tensor], length: int | Tensor, rows: Optional[Tensor], num_cond: int, uncond_cross: Tensor,
    rms: bool, eps: float, activation: str, post_norms: bool = False, qk_norm: bool = False,
    io_params: Sequence[Optional[Tensor]] = (), *, backend: Optional[str] = None,
) -> Tensor:
    """The denoiser layers (or with ``io_params`` the whole denoiser) for decoding rows; arguments and shapes
    as :func:`denoiser_layers_decode_ref`. Inference only (not differentiable). A tensor ``length`` takes
    the composed path (the CPU kernel's length is an int)."""
    _check_args(h, modulations, params, keys, values, uncond_cross, activation, io_params)
    if isinstance(length, Tensor):
        fn = functools.partial(denoiser_layers_decode_ref, backend=backend)
    else:
        fn = denoiser_layers_decode_for(h.device.type, h.dtype, backend)
    return fn(h, modulations, list(params), list(keys), list(values), length, rows, num_cond, uncond_cross, rms, eps,
              activation, post_norms, qk_norm, list(io_params))
