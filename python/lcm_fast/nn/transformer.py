"""The causal Transformer stack (fairseq2 ``StandardTransformerDecoderLayer`` / LCM decoder semantics)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..config import TransformerConfig
from .activation import ACTIVATION_NAMES, make_activation
from .attention import KVCache, MultiheadAttention, causal_mask, key_padding_mask
from .linear import LinearFn, apply_linear
from .norm import make_norm, norm_args
from .position import RotaryEncoder


def swiglu_inner_dim(ffn_inner_dim: int) -> int:
    """The official GLU inner dim: int(2/3 * ffn_inner_dim) rounded *up* to a multiple of 256."""
    inner = int(ffn_inner_dim * 2 / 3)
    return 256 * ((inner + 255) // 256)


class FeedForward(nn.Module):
    """ReLU-style FFN ``output_proj(act(inner_proj(x)))`` [+ normformer ``inner_layer_norm``], or with
    ``swiglu`` ``output_proj(silu(gate_proj(x)) * inner_proj(x))``. All projections have biases."""

    def __init__(self, dim: int, config: TransformerConfig) -> None:
        super().__init__()
        self.swiglu = config.use_swiglu
        if self.swiglu:
            inner = swiglu_inner_dim(config.ffn_inner_dim)
            self.gate_proj = nn.Linear(dim, inner)
            self.inner_activation = nn.SiLU()
            self.inner_layer_norm = None
        else:
            inner = config.ffn_inner_dim
            self.inner_activation = make_activation(config.ffn_inner_activation_name)
            normformer = config.norm_order_style == "normformer"
            self.inner_layer_norm = make_norm(config.layer_normalization_style, inner) if normformer else None
        self.inner_proj = nn.Linear(dim, inner)
        self.output_proj = nn.Linear(inner, dim)

    def forward(self, x: Tensor, linear: Optional[LinearFn] = None) -> Tensor:  # [..., dim] -> [..., dim]
        if self.swiglu:
            h = self.inner_activation(apply_linear(self.gate_proj, x, linear)) * apply_linear(self.inner_proj, x, linear)
        else:
            h = self.inner_activation(apply_linear(self.inner_proj, x, linear))
            if self.inner_layer_norm is not None:
                h = self.inner_layer_norm(h)
        return apply_linear(self.output_proj, h, linear)

    @property
    def activation_name(self) -> str:
        """The decode ops' name of the inner activation ("swiglu" for SwiGLU)."""
        return "swiglu" if self.swiglu else ACTIVATION_NAMES[type(self.inner_activation)]

    def decode_tensors(self) -> list[Optional[Tensor]]:
        """gate, inner projection, PReLU weight, inner norm and output projection, the FFN's part of the decode
        ops' per-layer ``params`` (``lcm_fast.ops.denoiser.FFN_TENSORS`` after the norm): None where absent."""
        gate = [self.gate_proj.weight, self.gate_proj.bias] if self.swiglu else [None, None]
        prelu = self.inner_activation.weight if isinstance(self.inner_activation, nn.PReLU) else None
        return [*gate, self.inner_proj.weight, self.inner_proj.bias, prelu, *norm_tensors(self.inner_layer_norm),
                self.output_proj.weight, self.output_proj.bias]


def norm_tensors(norm: Optional[nn.Module]) -> list[Optional[Tensor]]:
    """[weight, bias] of a norm (None where it has none, or for no norm at all)."""
    return list(norm_args(norm)[:2]) if norm is not None else [None, None]


def decode_args(layers: Sequence[nn.Module], **options: bool) -> tuple:
    """The static arguments of the decode ops (``lcm_fast.ops.denoiser_layers_decode``, ``decoder_layers_decode``)
    for layers of one configuration, each with a ``decode_tensors(**options)``: (params, rms, eps, activation,
    post_norms, qk_norm)."""
    first = layers[0]
    _, _, rms, eps = norm_args(first.self_attn_layer_norm)
    attention = getattr(first, "cross_attention", first.self_attn)  # the denoiser's attention is its cross-attention
    params = [t for layer in layers for t in layer.decode_tensors(**options)]
    return params, rms, eps, first.ffn.activation_name, first.self_attn_norm is not None, attention.q_layer_norm is not None


class DecoderLayer(nn.Module):
    """Self-attention + FFN with pre/post/normformer norm order, sublayer dropout and optional
    ``residual_scale`` (multiplies the FFN residual, not the branch)."""

    def __init__(self, dim: int, config: TransformerConfig, rope: Optional[RotaryEncoder]) -> None:
        super().__init__()
        style, self.order = config.layer_normalization_style, config.norm_order_style
        self.self_attn_layer_norm = make_norm(style, dim)
        self.self_attn = MultiheadAttention.from_config(dim, config, rope)
        self.self_attn_norm = make_norm(style, dim) if self.order == "normformer" else None
        self.ffn_layer_norm = make_norm(style, dim)
        self.ffn = FeedForward(dim, config)
        self.dropout = nn.Dropout(config.dropout_p)
        self.scale = config.scale_residual
        self.residual_scale = nn.Parameter(torch.full((dim,), float(self.scale))) if self.scale is not None else None

    @torch.no_grad()
    def reset_parameters(self) -> None:  # the FFN residual's scale starts at the configured constant
        if self.residual_scale is not None:
            self.residual_scale.fill_(float(self.scale))

    def forward(self, x: Tensor, mask: Optional[Tensor], cache: Optional[KVCache], store: bool = True,
                linear: Optional[LinearFn] = None) -> Tensor:
        post = self.order == "post"  # x: [B, S, dim]
        h = self.self_attn(x if post else self.self_attn_layer_norm(x), mask=mask, cache=cache, store=store,
                           linear=linear)
        if self.self_attn_norm is not None:
            h = self.self_attn_norm(h)
        x = self.dropout(h) + x
        if post:
            x = self.self_attn_layer_norm(x)
        h = self.dropout(self.ffn(x if post else self.ffn_layer_norm(x), linear))
        x = h + (x if self.residual_scale is None else self.residual_scale * x)
        return self.ffn_layer_norm(x) if post else x

    def decode_tensors(self) -> list[Optional[Tensor]]:
        """This layer's part of ``decoder_layers_decode``'s ``params`` (``lcm_fast.ops.decoder.DECODER_LAYER_TENSORS``
        order; pre-norm or normformer layers): None where the layer has no such tensor."""
        sa = self.self_attn
        return [*norm_tensors(self.self_attn_layer_norm),
                *(t for proj in (sa.q_proj, sa.k_proj, sa.v_proj) for t in (proj.weight, proj.bias)),
                *norm_tensors(sa.q_layer_norm), *norm_tensors(sa.k_layer_norm), sa.output_proj.weight,
                sa.output_proj.bias, *norm_tensors(self.self_attn_norm), *norm_tensors(self.ffn_layer_norm),
                *self.ffn.decode_tensors()]


class Decoder(nn.Module):
    """Causal stack: ``layers``, final ``layer_norm`` (absent when the final norm order is post),
    final dropout. Keys match the official ``LCMTransformerDecoder``."""

    def __init__(self, dim: int, max_seq_len: int, config: TransformerConfig) -> None:
        super().__init__()
        rope = None
        if config.pos_embedding_style == "rope":
            rope = RotaryEncoder(dim // config.num_attn_heads, max_seq_len, config.rope_theta)
        self.layers = nn.ModuleList(DecoderLayer(dim, config, rope) for _ in range(config.num_layers))
        final_order = config.final_norm_order_style or config.norm_order_style
        self.layer_norm = make_norm(config.layer_normalization_style, dim) if final_order != "post" else None
        self.dropout = nn.Dropout(config.final_dropout_p)

    def new_cache(self, capacity: int) -> list[KVCache]:
        return [KVCache(capacity) for _ in self.layers]

    def forward(
        self,
        x: Tensor,
        seq_lens: Optional[Tensor] = None,
        cache: Optional[list[KVCache]] = None,
        *,
        mask: Optional[Tensor] = None,
        store: bool = True,
        linear: Optional[LinearFn] = None,
    ) -> Tensor:
        """x: [B, S, dim]; seq_lens: [B] valid lengths (right padding) or None.

        With ``cache`` the S new positions follow the cached ones (incremental decoding, no padding);
        ``store=False`` attends over the cache without adding the new positions to it. ``mask``
        ([S, S_total] or [B, 1, S, S_total] bool, True = may attend) replaces the causal mask. ``linear``
        replaces every projection's GEMM (an inference engine's kernel).
        """
        if cache is not None and seq_lens is not None:
            raise ValueError("incremental decoding does not take padding (seq_lens must be None)")
        past = cache[0].length if cache is not None else 0
        if mask is None:
            mask = causal_mask(x.shape[1], past + x.shape[1], x.device)
        if seq_lens is not None:
            pad = key_padding_mask(seq_lens, x.shape[1])
            mask = pad if mask is None else pad & mask
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, cache[i] if cache is not None else None, store, linear)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return self.dropout(x)
