"""Small token transformers for the FLOP comparison: a Llama-style decoder-only LLM with a static KV
cache (gpt-fast style), and SONAR-like sentence encoder/decoder stand-ins. Random weights: they exist
to be timed and FLOP-counted at the shapes of :class:`lcm_fast.flops.model.TokenModel`, not to be good.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import TokenModel


class _Layer(nn.Module):
    def __init__(self, spec: TokenModel, cross: bool) -> None:
        super().__init__()
        d, kv = spec.dim, spec.kv_dim
        self.heads, self.kv_heads, self.split_sizes = spec.heads, spec.kv_heads, [d, kv, kv]
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv = nn.Linear(d, d + 2 * kv, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        if cross:  # attention to the sentence embedding: q and output per token, K/V once per sentence
            self.norm_x = nn.RMSNorm(d)
            self.cross_q, self.cross_kv = nn.Linear(d, d, bias=False), nn.Linear(d, 2 * kv, bias=False)
            self.cross_out = nn.Linear(d, d, bias=False)
        self.gated = spec.gated
        self.up = nn.Linear(d, spec.ffn_inner * (2 if spec.gated else 1), bias=False)
        self.down = nn.Linear(spec.ffn_inner, d, bias=False)

    def _split(self, x: Tensor, heads: int) -> Tensor:  # [B, S, h * hd] -> [B, h, S, hd]
        return x.unflatten(-1, (heads, -1)).transpose(1, 2)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
        q = self._split(q, self.heads)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=self.kv_heads != self.heads)
        return out.transpose(1, 2).flatten(2)

    def forward(self, x: Tensor, cache: Optional[tuple[Tensor, Tensor]], pos: int, memory_kv: Optional[Tensor],
                causal: bool) -> Tensor:
        """x: [B, S, d]; cache: (k, v) [B, kv_heads, capacity, hd] written at pos..pos+S (None: no cache,
        attention within x); memory_kv: [B, kv_heads, 2, 1, hd] projected sentence embedding or None."""
        q, k, v = self.qkv(self.norm1(x)).split(self.split_sizes, dim=-1)
        k, v = self._split(k, self.kv_heads), self._split(v, self.kv_heads)
        if cache is not None:
            cache[0][:, :, pos:pos + x.shape[1]] = k
            cache[1][:, :, pos:pos + x.shape[1]] = v
            k, v = cache[0][:, :, :pos + x.shape[1]], cache[1][:, :, :pos + x.shape[1]]
            causal = causal and x.shape[1] > 1
        x = x + self.out(self._attend(q, k, v, causal))
        if memory_kv is not None:
            x = x + self.cross_out(self._attend(self.cross_q(self.norm_x(x)), memory_kv[:, :, 0], memory_kv[:, :, 1],
                                                False))
        h = self.up(self.norm2(x))
        h = F.silu(h[..., : self.down.in_features]) * h[..., self.down.in_features:] if self.gated else F.relu(h)
        return x + self.down(h)


class TokenTransformer(nn.Module):
    """A token transformer of shape ``spec``: decoder-only LLM (``cross=False``), SONAR-like decoder
    (``cross=True``: every layer cross-attends to one sentence embedding) or, through :meth:`encode`,
    a bidirectional SONAR-like encoder with mean pooling."""

    def __init__(self, spec: TokenModel, *, cross: bool = False) -> None:
        super().__init__()
        self.spec, self.cross = spec, cross
        self.embed = nn.Embedding(spec.vocab, spec.dim)
        self.layers = nn.ModuleList(_Layer(spec, cross) for _ in range(spec.layers))
        self.norm = nn.RMSNorm(spec.dim)
        self.head = nn.Linear(spec.dim, spec.vocab, bias=False)

    def encode(self, tokens: Tensor) -> Tensor:
        """Sentence embeddings [B, d] of tokens [B, L] (bidirectional attention, mean pooling)."""
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, None, 0, None, causal=False)
        return self.norm(x).mean(1)

    @torch.no_grad()
    def generate(self, prompt: Tensor, total: int, memory: Optional[Tensor] = None) -> Tensor:
        """Greedy tokens [B, total]: the prompt [B, P] is run token by token through the static KV
        cache, then the model continues; memory [B, d] is the sentence embedding (decoder only)."""
        B = prompt.shape[0]
        spec = self.spec
        hd = spec.dim // spec.heads
        caches = [(prompt.new_zeros(B, spec.kv_heads, total, hd, dtype=self.head.weight.dtype),
                   prompt.new_zeros(B, spec.kv_heads, total, hd, dtype=self.head.weight.dtype)) for _ in self.layers]
        memory_kv = [None] * len(self.layers)
        if self.cross:
            if memory is None:
                raise ValueError("a cross-attending decoder needs the sentence embedding (memory [B, d])")
            # [B, 1, 2 kv] -> [B, kv_heads, 2 (k, v), 1, hd]
            memory_kv = [layer.cross_kv(memory[:, None]).unflatten(-1, (2, spec.kv_heads, hd)).permute(0, 3, 2, 1, 4)
                         for layer in self.layers]
        out = torch.empty(B, total, dtype=torch.long, device=prompt.device)
        out[:, : prompt.shape[1]] = prompt
        for pos in range(total - 1):
            x = self.embed(out[:, pos : pos + 1])
            for layer, cache, mkv in zip(self.layers, caches, memory_kv):
                x = layer(x, cache, pos, mkv, causal=True)
            logits = self.head(self.norm(x[:, -1]))
            if pos + 1 >= prompt.shape[1]:
                out[:, pos + 1] = logits.argmax(-1)
        # the last token also goes through the model (the LLM count runs every token through it)
        x = self.embed(out[:, -1:])
        for layer, cache, mkv in zip(self.layers, caches, memory_kv):
            x = layer(x, cache, total - 1, mkv, causal=True)
        self.head(self.norm(x[:, -1]))
        return out
