"""``decoder_layers_decode``: the causal decoder layers (Base-LCM, One-Tower) for one new position per row, in one call.

The fast engine's Base-LCM step and One-Tower denoising step (``inference/fast.py``
:class:`~lcm_fast.inference.fast.FastDecoder`) run every layer on one row per document (two with CFG). Issued from Python through the modules, a step at model dim 512 spent
~20 % of its time between ops and read the K/V weights through BLAS at a third of the memory bandwidth
(bench/RESULTS.md); the CPU kernel (``csrc/decode/decoder_layers_cpu.cpp``) runs the layers back to back
with the skinny-linear and norm kernels of ``denoiser_layers_decode``. On CUDA, or without the extension,
the layers run as the composed ops of :func:`decoder_layers_decode_ref`.

What one layer computes for rows ``h`` [R, D], the new position being ``length`` (``nn/transformer.py``
``DecoderLayer`` with a KV cache, pre-norm or normformer order)::

    y = norm_sa(h)
    q, k, v = q(y), k(y), v(y)          # [+ q/k norm over the model dim] [+ RoPE at position length]
    K[b, :, length] = k; V[b, :, length] = v     # rows r < num_cond: b = rows[r] (or r), the cache in place
    a = out(softmax(q K[b, :, :length + 1]^T / sqrt(hd)) V[b, :, :length + 1])   # [+ normformer norm]
    a = out(v)                          # rows >= num_cond attend to themselves only (One-Tower's CFG rows)
    h = h + a;   y = norm_ff(h)
    h = h + ffn(y)                      # [then the stack's final norm, after the last layer]

A row's new key stays in the cache; whether position ``length`` counts as filled afterwards is the caller's
(Base-LCM advances; One-Tower's noisy token is overwritten by the next step).

``length`` may be a 0-d int64 tensor (composed path only, for CUDA graphs): the new keys go in at a 1-d index
tensor (never the length's value read on the host) and attention reads the caches' whole capacity with the
positions past ``length`` masked.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _ext
from ._dispatch import OpSpec, register
from .adaln import adaln_gated_residual_norm_modulate
from .denoiser import FFN_TENSORS, attention_bias, check_layer_lists, ffn_ref, plain_norm
from .linear import skinny_linear, skinny_linear_multi

#: one layer's tensors in ``params`` (``csrc/decode/decoder_layers_cpu.cpp`` ``Param``), None where a layer has
#: none; ``DecoderLayer.decode_tensors`` lists a layer's
DECODER_LAYER_TENSORS = (
    "self_attn_norm_weight", "self_attn_norm_bias",
    "query_weight", "query_bias",
    "key_weight", "key_bias",
    "value_weight", "value_bias",
    "query_norm_weight", "query_norm_bias",  # q/k norm only
    "key_norm_weight", "key_norm_bias",
    "self_attn_out_weight", "self_attn_out_bias",
    "self_attn_post_norm_weight", "self_attn_post_norm_bias",  # normformer only
    *FFN_TENSORS,
)

# CPU only, as denoiser_layers_decode
SPEC = register(OpSpec("decoder_layers_decode", devices=("cpu",)))


def _check_args(h: Tensor, params: Sequence[Optional[Tensor]], keys: Sequence[Tensor], values: Sequence[Tensor],
                num_cond: int, rope: Optional[Tensor], activation: str, final_norm: Sequence[Optional[Tensor]]) -> None:
    op = "decoder_layers_decode"
    check_layer_lists(op, params, keys, values, "DECODER_LAYER_TENSORS", len(DECODER_LAYER_TENSORS), activation)
    if h.dim() != 2 or keys[0].dim() != 4 or not 0 <= num_cond <= h.shape[0]:
        raise ValueError(f"{op}: h must be [R, D], the caches [B, H, capacity, D / H] and num_cond in [0, R], got "
                         f"{tuple(h.shape)}, {tuple(keys[0].shape)} and {num_cond}")
    if rope is not None and (rope.dim() != 3 or 2 * rope.shape[1] != keys[0].shape[3] or rope.shape[2] != 2
                             or rope.dtype != torch.float32):
        raise ValueError(f"{op}: rope must be fp32 [positions, head_dim / 2, 2] (cos, sin), got {rope.dtype} "
                         f"{tuple(rope.shape)} for head_dim {keys[0].shape[3]}")
    if len(final_norm) not in (0, 2):
        raise ValueError(f"{op}: final_norm must be empty or [weight, bias], got {len(final_norm)} entries")


def decoder_layers_decode_ref(
    h: Tensor, params: Sequence[Optional[Tensor]], keys: Sequence[Tensor], values: Sequence[Tensor],
    length: int | Tensor, rows: Optional[Tensor], num_cond: int, rope: Optional[Tensor], rms: bool, eps: float,
    activation: str, post_norms: bool, qk_norm: bool, final_norm: Sequence[Optional[Tensor]] = (), *,
    backend: Optional[str] = "ref",
) -> Tensor:
    """Composed twin: h [R, D] -> [R, D] through every layer (see the module docstring); each layer's new keys
    and values of the conditional rows go to position ``length`` of its cache.

    params: each layer's :data:`DECODER_LAYER_TENSORS`, layer after layer; keys, values: per layer the
    [B, H, capacity, D / H] self-attention cache, positions < ``length`` filled (an int, or a 0-d int64
    tensor); rows: [num_cond] distinct int64 batch rows of the conditional rows (None: row r); rows >= num_cond
    attend to themselves only; rope: fp32 [positions, D / H / 2, 2] (cos, sin) of each pair at every position (None:
    no RoPE); final_norm: empty, or the stack's final norm (weight, bias; the layers' style) applied to the output,
    fused with the last residual; rms / eps: the layers' norm style; activation: a key of :data:`ACTIVATIONS`; post_norms: normformer (norm after
    self-attention, and the FFN inner norm without SwiGLU); qk_norm: the q/k norms. ``backend`` goes to every
    sub-op: "ref" makes this plain PyTorch (the specification), None lets each sub-op take its fused kernel.
    """
    _check_args(h, params, keys, values, num_cond, rope, activation, final_norm)
    n, layers, C, D = len(DECODER_LAYER_TENSORS), len(keys), num_cond, h.shape[-1]
    capacity, static = keys[0].shape[2], isinstance(length, Tensor)
    mask = attention_bias(capacity, length, h.dtype, inclusive=True) if static else None
    # a 1-d index tensor: indexing with the 0-d length would read its value on the host (no CUDA graph then)
    position = length.reshape(1) if static else length
    slot = position if static else slice(length, length + 1)  # [C, H, 1, hd] of a cache's first C rows
    # RoPE at the new position as one complex multiply of q and k side by side: cos + i sin
    cis = torch.view_as_complex(rope)[position] if rope is not None else None  # [hd / 2] or [1, hd / 2]
    one, zero = h.new_ones(D), h.new_zeros(D)  # the gate and modulation of a plain (unmodulated) norm
    heads = keys[0].shape[1]

    def linear(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
        return skinny_linear(x, w, b, backend=backend)

    def rotate(x: Tensor) -> Tensor:  # [R, n * D] -> [R, n * H, hd], rotated to the new position
        x = x.unflatten(-1, (-1, keys[0].shape[3]))
        if cis is None:
            return x
        return torch.view_as_real(torch.view_as_complex(x.float().unflatten(-1, (-1, 2))) * cis).flatten(-2).type_as(x)

    # Each layer's FFN residual is fused with the next layer's self-attention norm (the final norm is the caller's)
    y = plain_norm(h, params[0], params[1], rms, eps, backend, zero)
    for i, (k_cache, v_cache) in enumerate(zip(keys, values)):
        (_, _, q_w, q_b, k_w, k_b, v_w, v_b, qn_w, qn_b, kn_w, kn_b, o_w, o_b, san_w, san_b, ff_w, ff_b,
         *ffn) = params[i * n : (i + 1) * n]
        qkv = skinny_linear_multi(y, (q_w, k_w, v_w), (q_b, k_b, v_b), backend=backend)
        q, k, v = qkv.split((q_w.shape[0], k_w.shape[0], v_w.shape[0]), dim=-1)
        if qk_norm:
            q, k = rotate(plain_norm(q, qn_w, qn_b, rms, eps, backend, zero)), rotate(plain_norm(k, kn_w, kn_b, rms, eps,
                                                                                                 backend, zero))
        else:  # q and k side by side in qkv: one rotation
            q, k = rotate(qkv[:, : q.shape[1] + k.shape[1]]).split((heads, heads), dim=1)
        q, k, v = q[:, :, None], k[:, :, None], v.unflatten(-1, (heads, -1))[:, :, None]  # [R, H, 1, hd]
        if rows is None:  # rows [0, C): the caches' first C rows, as views (no gather of the whole cache)
            k_cache[:C, :, slot], v_cache[:C, :, slot] = k[:C], v[:C]
            k_all, v_all = k_cache[:C], v_cache[:C]
        else:
            k_cache[rows, :, position], v_cache[rows, :, position] = k[:C, :, 0], v[:C, :, 0]
            k_all, v_all = k_cache[rows], v_cache[rows]  # [C, H, capacity, hd]
        if not static:
            k_all, v_all = k_all[:, :, : length + 1], v_all[:, :, : length + 1]
        o = F.scaled_dot_product_attention(q[:C], k_all, v_all, attn_mask=mask)  # [C, H, 1, hd]
        if C < h.shape[0]:  # rows past num_cond attend to themselves only
            o = torch.cat((o, v[C:]))
        a = linear(o.flatten(1), o_w, o_b)
        if post_norms:
            a = plain_norm(a, san_w, san_b, rms, eps, backend, zero)
        h, y = adaln_gated_residual_norm_modulate(h, a, one, zero, zero, ff_w, ff_b, rms=rms, eps=eps, backend=backend)
        f = ffn_ref(y, ffn, rms, eps, activation, post_norms, backend)
        if i + 1 < layers:
            h, y = adaln_gated_residual_norm_modulate(h, f, one, zero, zero, params[(i + 1) * n],
                                                      params[(i + 1) * n + 1], rms=rms, eps=eps, backend=backend)
        elif final_norm:  # the last residual fused with the final norm
            _, h = adaln_gated_residual_norm_modulate(h, f, one, zero, zero, *final_norm, rms=rms, eps=eps,
                                                      backend=backend)
        else:
            h = h + f
    return h


if _ext.EXT_AVAILABLE:

    @torch.library.register_fake("lcm_fast::decoder_layers_decode")
    def _decoder_layers_decode_fake(h, params, keys, values, length, rows, num_cond, rope, rms, eps, activation,
                                    post_norms, qk_norm, final_norm):
        return torch.empty_like(h)


def decoder_layers_decode_for(device_type: str, dtype: torch.dtype,
                              backend: Optional[str] = None) -> Callable[..., Tensor]:
    """The implementation :func:`decoder_layers_decode` takes for inputs on this device and of this dtype,
    resolved once for a generation call. Takes the op's positional arguments."""
    if device_type not in SPEC.devices or SPEC.choose(device_type, dtype, backend) == "ref":
        return functools.partial(decoder_layers_decode_ref, backend=backend)
    return torch.ops.lcm_fast.decoder_layers_decode.default


def decoder_layers_decode(
    h: Tensor, params: Sequence[Optional[Tensor]], keys: Sequence[Tensor], values: Sequence[Tensor],
    length: int | Tensor, rows: Optional[Tensor], num_cond: int, rope: Optional[Tensor], rms: bool, eps: float,
    activation: str, post_norms: bool = False, qk_norm: bool = False, final_norm: Sequence[Optional[Tensor]] = (), *,
    backend: Optional[str] = None,
) -> Tensor:
    """The decoder layers for one new position per row; arguments, shapes and the cache writes as
    :func:`decoder_layers_decode_ref`. Inference only (not differentiable). A tensor ``length`` takes the
    composed path (the CPU kernel's length is an int)."""
    _check_args(h, params, keys, values, num_cond, rope, activation, final_norm)
    if isinstance(length, Tensor):
        fn = functools.partial(decoder_layers_decode_ref, backend=backend)
    else:
        fn = decoder_layers_decode_for(h.device.type, h.dtype, backend)
    return fn(h, list(params), list(keys), list(values), length, rows, num_cond, rope, rms, eps, activation,
              post_norms, qk_norm, list(final_norm))
