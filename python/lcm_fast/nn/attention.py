"""Multi-head attention (fairseq2 ``StandardMultiheadAttention`` semantics) and its KV cache."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .init import init_linear, init_qkv
from ..config import TransformerConfig
from .linear import LinearFn, apply_linear
from .norm import make_norm
from .position import RotaryEncoder


class KVCache:
    """Keys/values of one attention module for incremental decoding, preallocated to ``capacity``.

    Rows can be dropped or reordered with :meth:`reorder` (finished documents leave the batch). ``zeroed``:
    positions past ``length`` hold zeros, not garbage (for attention over the whole capacity under a mask).
    ``batch_capacity``: rows to allocate (default: the first append's batch); with it, :meth:`reorder` moves the
    kept rows to the front in place, so the storage, and CUDA graphs recorded on it, stay put. The active rows
    are ``[0, batch)`` of ``k`` and ``v``; rows past them are stale but finite (padding for batch-size buckets).
    """

    def __init__(self, capacity: int, zeroed: bool = False, batch_capacity: Optional[int] = None) -> None:
        self.capacity, self.zeroed, self.batch_capacity = capacity, zeroed, batch_capacity
        self.length = 0
        self.batch = 0
        self.k: Optional[Tensor] = None  # [batch_capacity or batch, H, capacity, head_dim]
        self.v: Optional[Tensor] = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v: [batch, H, S, head_dim] -> all cached keys/values [batch, H, length + S, head_dim]."""
        B, end = k.shape[0], self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache overflow: {end} positions > capacity {self.capacity}")
        if self.k is None:
            shape = (self.batch_capacity or B, k.shape[1], self.capacity, k.shape[3])
            new = k.new_zeros if self.zeroed else k.new_empty
            self.k, self.v = new(shape), new(shape)
        if self.length == 0:  # the first append (or the first after reset) sets the batch
            if B > self.k.shape[0]:
                raise ValueError(f"KV cache: a batch of {B} rows > batch_capacity {self.k.shape[0]}")
            self.batch = B
        elif B != self.batch:
            raise ValueError(f"KV cache: appending {B} rows to a cache of {self.batch}")
        self.k[:B, :, self.length : end] = k
        self.v[:B, :, self.length : end] = v
        self.length = end
        return self.k[:B, :, :end], self.v[:B, :, :end]

    def reset(self) -> None:
        """Empty, keeping the storage (and graphs recorded on it): stale positions stay finite, and a zeroed cache's
        attention masks them."""
        self.length = self.batch = 0

    def extended(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Cached keys/values followed by k, v ([B, H, S, head_dim]) without storing the new ones."""
        if self.k is None:
            return k, v
        cached = slice(0, self.batch), slice(None), slice(0, self.length)
        return torch.cat((self.k[cached], k), 2), torch.cat((self.v[cached], v), 2)

    def select(self, index: Tensor) -> "KVCache":
        """A new cache holding rows ``index`` ([n]) of this one (for a subset of the batch)."""
        out = KVCache(self.capacity, self.zeroed)
        out.length = self.length
        if self.k is not None:
            out.k, out.v, out.batch = self.k.index_select(0, index), self.v.index_select(0, index), index.numel()
        return out

    def reorder(self, index: Tensor) -> None:  # index: [B_new] active rows to keep, in order
        if self.k is None:
            return
        if self.batch_capacity is None:
            self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)
        else:
            self.k[: index.numel()] = self.k.index_select(0, index)
            self.v[: index.numel()] = self.v.index_select(0, index)
        self.batch = index.numel()


class MultiheadAttention(nn.Module):
    """q/k/v projections (always with bias), optional q/k LayerNorm over the full model dim (before the
    head split), optional RoPE, SDPA with scale 1/sqrt(head_dim), output projection.

    Keys: ``q_proj``, ``k_proj``, ``v_proj``, ``output_proj``, [``q_layer_norm``, ``k_layer_norm``].
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        output_bias: bool,
        qk_norm_style: Optional[str] = None,
        rope: Optional[RotaryEncoder] = None,
        dropout_p: float = 0.0,
        output_init: str = "xavier",
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"model dim {dim} is not divisible by num_attn_heads={num_heads}")
        self.num_heads = num_heads
        self.dropout_p = dropout_p
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim, bias=output_bias)
        self.q_layer_norm = make_norm(qk_norm_style, dim) if qk_norm_style else None
        self.k_layer_norm = make_norm(qk_norm_style, dim) if qk_norm_style else None
        self.pos_encoder = rope
        self.output_init = output_init

    def reset_parameters(self) -> None:
        """The official init (:mod:`lcm_fast.nn.init`): q/k/v fairseq2's, the output projection ``output_init``."""
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            init_qkv(proj)
        init_linear(self.output_proj, self.output_init)

    @classmethod
    def from_config(cls, dim: int, config: TransformerConfig, rope: Optional[RotaryEncoder]) -> "MultiheadAttention":
        """The attention of a layer of ``config`` (self- or cross-attention alike)."""
        return cls(
            dim,
            config.num_attn_heads,
            output_bias=config.mha_output_proj_bias,
            qk_norm_style=config.layer_normalization_style if config.enable_qk_layernorm else None,
            rope=rope,
            dropout_p=config.attention_dropout_p,
            output_init=config.attention_output_init_fn,
        )

    def _heads(self, x: Tensor) -> Tensor:  # [B, S, dim] -> [B, H, S, head_dim]
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def project_q(self, x: Tensor, start: int = 0, linear: Optional[LinearFn] = None) -> Tensor:
        """x: [B, S, dim] -> queries [B, H, S, head_dim] at positions start.."""
        q = apply_linear(self.q_proj, x, linear)
        if self.q_layer_norm is not None:
            q = self.q_layer_norm(q)
        q = self._heads(q)
        return self.pos_encoder(q, start) if self.pos_encoder is not None else q

    def project_kv(self, x: Tensor, start: int = 0, linear: Optional[LinearFn] = None) -> tuple[Tensor, Tensor]:
        """x: [B, S, dim] -> keys, values [B, H, S, head_dim] at positions start.."""
        k = apply_linear(self.k_proj, x, linear)
        if self.k_layer_norm is not None:
            k = self.k_layer_norm(k)
        k, v = self._heads(k), self._heads(apply_linear(self.v_proj, x, linear))
        return (self.pos_encoder(k, start) if self.pos_encoder is not None else k), v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None,
               linear: Optional[LinearFn] = None) -> Tensor:
        """q: [B, H, S_q, hd]; k, v: [B, H, S_k, hd] -> output projection of SDPA, [B, S_q, dim]."""
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout_p if self.training else 0.0
        )
        return apply_linear(self.output_proj, out.transpose(1, 2).flatten(2), linear)

    def forward(
        self,
        x: Tensor,
        keys: Optional[Tensor] = None,
        *,
        mask: Optional[Tensor] = None,
        cache: Optional[KVCache] = None,
        store: bool = True,
        linear: Optional[LinearFn] = None,
    ) -> Tensor:
        """x: [B, S_q, dim]; keys: [B, S_k, dim] (cross-attention) or None (self-attention).

        mask: bool, True = may attend, broadcastable to [B, H, S_q, S_total_k].
        cache: self-attention only; attention runs over all cached keys and the new ones, which are
            appended to the cache unless ``store`` is False (a query that must not stay in the context).
        linear: replaces the projections' GEMM (an inference engine's kernel).
        """
        start = cache.length if cache is not None and keys is None else 0
        q = self.project_q(x, start, linear)
        k, v = self.project_kv(x if keys is None else keys, start, linear)
        if cache is not None:
            k, v = cache.append(k, v) if store else cache.extended(k, v)
        return self.attend(q, k, v, mask, linear)


class ValueOutputAttention(nn.Module):
    """The denoiser's self-attention, reduced to what it computes.

    The official denoiser masks its self-attention with ``log(eye(S))``: every query sees only its own
    key, the softmax weight is exactly 1, and the output is ``output_proj(v_proj(x))`` bit for bit.
    The q/k projections of official checkpoints are dead weights and are dropped on load.
    Keys: ``v_proj``, ``output_proj``.
    """

    def __init__(self, dim: int, *, output_bias: bool, output_init: str = "xavier") -> None:
        super().__init__()
        self.v_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim, bias=output_bias)
        self.output_init = output_init

    def reset_parameters(self) -> None:  # as MultiheadAttention's
        init_qkv(self.v_proj)
        init_linear(self.output_proj, self.output_init)

    def forward(self, x: Tensor, linear: Optional[LinearFn] = None) -> Tensor:  # [B, S, dim] -> [B, S, dim]
        return apply_linear(self.output_proj, apply_linear(self.v_proj, x, linear), linear)

    @torch.no_grad()
    def composed(self) -> tuple[Tensor, Tensor]:
        """The block as one projection: output_proj(v_proj(y)) = W y + b with W = W_o W_v, b = W_o b_v + b_o,
        formed in at least fp32 -> (W [dim, dim], b [dim]) in the weights' dtype. A decoding step then reads
        one dim x dim weight per row instead of two (it reassociates the sum: equal within rounding)."""
        v, out = self.v_proj, self.output_proj
        dtype = torch.promote_types(v.weight.dtype, torch.float32)
        # one matmul forms both: W_o [W_v | b_v]
        composed = out.weight.to(dtype) @ torch.cat((v.weight, v.bias[:, None]), dim=1).to(dtype)
        weight, bias = composed[:, :-1], composed[:, -1]
        if out.bias is not None:
            bias = bias + out.bias
        return weight.to(v.weight.dtype).contiguous(), bias.to(v.weight.dtype).contiguous()


def causal_mask(q_len: int, k_len: int, device: torch.device) -> Optional[Tensor]:
    """[q_len, k_len] bool mask for queries at the last q_len of k_len positions; None if all visible."""
    if q_len == 1:
        return None
    q_pos = torch.arange(k_len - q_len, k_len, device=device)
    return torch.arange(k_len, device=device)[None, :] <= q_pos[:, None]


def key_padding_mask(seq_lens: Tensor, k_len: int) -> Tensor:
    """seq_lens: [B] -> [B, 1, 1, k_len] bool, True for valid keys."""
    return (torch.arange(k_len, device=seq_lens.device)[None, :] < seq_lens[:, None])[:, None, None, :]
