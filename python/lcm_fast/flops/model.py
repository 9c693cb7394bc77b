"""Analytic inference FLOPs: LCM pipelines vs a token LLM (paper section 2.5.1, Figure 13).

Counts matrix multiplications and attention (2 FLOPs per multiply-add), the parts that dominate and that
``torch.utils.flop_counter.FlopCounterMode`` sees; norms, activations, softmax and the sampler's
elementwise maths are left out. Every autoregressive model runs incrementally with a KV cache, so token
(or sentence) p attends to p + 1 keys.

The workload: a text of ``total_tokens`` tokens made of N = total_tokens / sentence_len sentences.
- LLM: runs all ``total_tokens`` tokens through the model and its LM head.
- LCM pipeline: SONAR-encodes each of the N sentences, predicts the N - 1 after the first with the
  Two-Tower LCM (prediction i from i sentences of context), SONAR-decodes each sentence
  (``sentence_len`` tokens, cross-attending to its embedding). As in the paper's count every sentence is
  encoded and decoded once; a continuation needs only the prompt's encodes and the output's decodes.

Two-Tower algorithms: ``official`` (the reference implementation: every diffusion step recomputes the
timestep MLP, the AdaLN modulators, q/k/v of the one-key self-attention and the cross-attention keys and
values of the whole context, for both CFG halves), ``reference`` (lcm_fast's reference engine: the same
without the dead q/k projections) and ``fast`` (lcm_fast's fast engine: a modulation table per
weights and schedule, counted as built by the call, i.e. the engine's first call),
context K/V projected once per sentence, a constant unconditional cross-attention, no unconditional half
at the first CFG step, self-attention as one composed W_o W_v projection).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import TwoTowerConfig
from ..nn.timestep import FREQUENCY_DIM
from ..nn.transformer import swiglu_inner_dim

ALGORITHMS = ("official", "reference", "fast")


@dataclass(frozen=True)
class TokenModel:
    """A token transformer: decoder-only LLM (``cross=False``) or SONAR-like encoder/decoder."""

    layers: int
    dim: int
    ffn_inner: int
    """Inner width as run: for gated FFNs the width of each of the three projections."""
    vocab: int
    heads: int
    kv_heads: int
    gated: bool = True
    """SwiGLU FFN (three projections) rather than ReLU (two)."""

    @property
    def kv_dim(self) -> int:
        return self.dim * self.kv_heads // self.heads

    def token_projections(self) -> float:
        """Per token and layer: q/k/v/output projections and the FFN."""
        d = self.dim
        return 2 * d * (d + 2 * self.kv_dim) + 2 * d * d + 2 * d * self.ffn_inner * (3 if self.gated else 2)


#: decoder-only LLMs (public configs). Llama 2 (the paper's token counts) and Llama 3.
LLAMA: dict[str, TokenModel] = {
    "llama2-7b": TokenModel(32, 4096, 11008, 32000, 32, 32),
    "llama2-13b": TokenModel(40, 5120, 13824, 32000, 40, 40),
    "llama3-8b": TokenModel(32, 4096, 14336, 128256, 32, 8),
}
#: SONAR text encoder / decoder (NLLB-1B-sized: 24 layers, d 1024, ReLU FFN 8192, 256k vocabulary)
SONAR_ENCODER = TokenModel(24, 1024, 8192, 256206, 16, 16, gated=False)
SONAR_DECODER = TokenModel(24, 1024, 8192, 256206, 16, 16, gated=False)


def _series(n: int) -> int:
    """sum_{p=0}^{n-1} (p + 1): keys attended over n incremental steps."""
    return n * (n + 1) // 2


def llm_flops(model: TokenModel, tokens: int) -> float:
    """Running ``tokens`` tokens through a decoder-only LLM with a KV cache (each through the LM head)."""
    per_token = model.layers * model.token_projections() + 2 * model.dim * model.vocab
    return tokens * per_token + model.layers * 4 * model.dim * _series(tokens)


def sonar_encode_flops(model: TokenModel, sentence_len: int) -> float:
    """Encoding one sentence of ``sentence_len`` tokens (bidirectional attention, mean pooling)."""
    return model.layers * (sentence_len * model.token_projections() + 4 * sentence_len**2 * model.dim)


def sonar_decode_flops(model: TokenModel, sentence_len: int) -> float:
    """Decoding one sentence of ``sentence_len`` tokens: causal self-attention with a KV cache,
    cross-attention to the one sentence embedding (its K/V projected once), LM head per token."""
    d = model.dim
    cross_per_token = 2 * d * d + 4 * d + 2 * d * d  # q projection, attention over 1 key, output projection
    memory = model.layers * 2 * (2 * d * model.kv_dim)
    per_token = model.layers * (model.token_projections() + cross_per_token) + 2 * d * model.vocab
    return memory + sentence_len * per_token + model.layers * 4 * d * _series(sentence_len)


def _ffn_flops(dim: int, ffn_inner_dim: int, swiglu: bool) -> float:
    inner = swiglu_inner_dim(ffn_inner_dim) if swiglu else ffn_inner_dim
    return 2 * dim * inner * (3 if swiglu else 2)


def two_tower_flops(config: TwoTowerConfig, n_sentences: int, steps: int, *, cfg: bool = True,
                    algorithm: str = "official", batch: int = 1) -> float:
    """Predicting ``n_sentences`` concepts one after the other after a one-sentence prompt (prediction
    i = 1..n sees i context sentences and the zero key), each with ``steps`` executed DDIM steps,
    classifier-free guidance on or off, for ``batch`` documents generated together (the fast engine's
    per-call tables are shared by the batch)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {ALGORITHMS}")
    D, S, n = config.model_dim, config.sonar_embed_dim, n_sentences
    if n == 0:  # nothing to predict: no generation call
        return 0.0
    ce, den = config.context_encoder, config.denoiser
    # contextualizer: one new sentence per prediction (frontend + causal stack over the cache)
    ce_token = 2 * S * D + ce.num_layers * (2 * D * 3 * D + 2 * D * D + _ffn_flops(D, ce.ffn_inner_dim, ce.use_swiglu))
    context = n * ce_token + ce.num_layers * 4 * D * _series(n)
    ffn = _ffn_flops(D, den.ffn_inner_dim, den.use_swiglu)
    proj = 2 * S * D + 2 * D * S  # initial and final projections, per row
    keys = _series(n) + n  # sum over predictions of (context rows + the zero key)
    L = den.num_layers
    if algorithm in ("official", "reference"):
        rows = (2 if cfg else 1) * steps  # per sentence: both CFG halves at every step
        self_attn = (2 * D * 3 * D + 4 * D + 2 * D * D) if algorithm == "official" else 4 * D * D
        per_row = proj + 2 * (FREQUENCY_DIM * D + D * D) + L * (2 * D * 9 * D + self_attn + 4 * D * D + ffn)
        # cross-attention over C + 1 keys: K/V projections of every key, then attention
        per_key = L * (4 * D * D + 4 * D)
        return batch * (context + rows * (n * per_row + keys * per_key))
    # fast: the modulation table, the constant unconditional cross-attention outputs and the composed
    # self-attention projections W_o [W_v | b_v] (a first call; later calls with the same weights and
    # schedule reuse them)
    setup = (steps * (2 * (FREQUENCY_DIM * D + D * D) + L * 2 * D * 9 * D) + L * (2 * D * 3 * D + 4 * D + 2 * D * D)
             + L * 2 * D * D * (D + 1))
    cond_rows = steps
    uncond_rows = (steps - 1) if cfg else 0
    row = proj + L * (2 * D * D + ffn)  # self-attention: one composed D x D projection
    cross = L * (2 * D * D + 2 * D * D)  # q and output projections (conditional rows only)
    kv_cache = L * 4 * D * D * (n + 1)  # each context row and the zero key, projected once
    return setup + batch * (context + kv_cache + n * ((cond_rows + uncond_rows) * row + cond_rows * cross)
                            + cond_rows * keys * L * 4 * D)


@dataclass(frozen=True)
class PipelineFlops:
    encode: float
    lcm: float
    decode: float

    @property
    def total(self) -> float:
        return self.encode + self.lcm + self.decode


def lcm_pipeline_flops(config: TwoTowerConfig, total_tokens: int, sentence_len: float, *, steps: int = 40,
                       cfg: bool = True, algorithm: str = "official", encoder: TokenModel = SONAR_ENCODER,
                       decoder: TokenModel = SONAR_DECODER) -> PipelineFlops:
    """SONAR encode + Two-Tower prediction + SONAR decode of a text of ``total_tokens`` tokens in
    sentences of ``sentence_len`` tokens (N = round(total / sentence_len) >= 1)."""
    n = max(1, round(total_tokens / sentence_len))
    length = max(1, round(total_tokens / n))
    return PipelineFlops(n * sonar_encode_flops(encoder, length),
                         two_tower_flops(config, n - 1, steps, cfg=cfg, algorithm=algorithm),
                         n * sonar_decode_flops(decoder, length))


def crossover_sentence_length(config: TwoTowerConfig, llm: TokenModel, total_tokens: int, *, steps: int = 40,
                              cfg: bool = True, algorithm: str = "official", max_len: int = 200) -> Optional[int]:
    """The shortest average sentence length (tokens) from which the LCM pipeline needs no more FLOPs
    than the LLM on a text of ``total_tokens`` tokens; None if the LLM is cheaper up to ``max_len``."""
    llm_cost = llm_flops(llm, total_tokens)
    for length in range(1, max_len + 1):
        if lcm_pipeline_flops(config, total_tokens, length, steps=steps, cfg=cfg, algorithm=algorithm).total <= llm_cost:
            return length
    return None


__all__ = [
    "ALGORITHMS", "LLAMA", "PipelineFlops", "SONAR_DECODER", "SONAR_ENCODER", "TokenModel", "crossover_sentence_length",
    "llm_flops", "lcm_pipeline_flops", "sonar_decode_flops", "sonar_encode_flops", "two_tower_flops",
]
