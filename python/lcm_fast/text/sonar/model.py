"""SONAR's text encoder and decoder in plain PyTorch, with sonar-space's semantics and weight names.

What sonar-space 0.5 / fairseq2 0.8 build for ``text_sonar_basic_encoder`` and ``text_sonar_basic_decoder``:

- **Frontend** (both): token embedding scaled by sqrt(model_dim), plus fixed sinusoidal positions (sin half,
  cos half) computed in fp32; position p uses step p + 2 (fairseq's legacy offset pad_idx + 1 with pad_idx 1).
- **Encoder**: pre-LN layers (self-attention over the non-pad tokens, ReLU FFN), a final LayerNorm, then the
  mean over the non-pad tokens: one [model_dim] vector per sentence. (The config says ``normalize_before=False``
  but sonar's factory builds every layer pre-LN.)
- **Decoder**: pre-LN layers of causal self-attention, attention to the sentence vector as a length-1 "encoder
  output", and a ReLU FFN; a final LayerNorm; logits by the embedding matrix (tied). With one key the cross
  attention's softmax is exactly 1, so it is ``output_proj(v_proj(sentence))``, the same at every step: it is
  computed once per sentence (:meth:`SonarTextDecoder.condition`); its layer norm and q/k projections
  (which only shape the query) are dead weights.

State-dict keys are fairseq2's, so a fairseq2-native checkpoint loads as is; :func:`load_sonar_checkpoint` also
takes the fairseq layout of Meta's published decoder file.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...nn.position import SinusoidalPositionEncoder


@dataclass(frozen=True)
class SonarConfig:
    """The shape of a SONAR text encoder or decoder. Defaults: ``text_sonar_basic_*`` (24 layers, 1024-d)."""

    model_dim: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    ffn_inner_dim: int = 8192
    vocab_size: int = 256206
    max_seq_len: int = 512
    """Positions: the encoder's table has max_seq_len + 2 rows (fairseq's offset), the decoder's max_seq_len."""

    @classmethod
    def from_dict(cls, d: dict, vocab_size: int) -> "SonarConfig":
        known = {k: d[k] for k in ("model_dim", "num_layers", "num_heads", "ffn_inner_dim", "max_seq_len") if k in d}
        return cls(vocab_size=vocab_size, **known)


class Attention(nn.Module):
    """fairseq2 ``StandardMultiheadAttention``: q/k/v/output projections with biases, SDPA 1/sqrt(head_dim)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj, self.k_proj, self.v_proj, self.output_proj = (nn.Linear(dim, dim) for _ in range(4))

    def heads(self, x: Tensor) -> Tensor:  # [B, S, dim] -> [B, H, S, head_dim]
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, x: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """x: [B, S, dim] queries; k, v: [B, H, S_k, head_dim] -> [B, S, dim]."""
        out = F.scaled_dot_product_attention(self.heads(self.q_proj(x)), k, v, attn_mask=mask)
        return self.output_proj(out.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    def __init__(self, dim: int, inner_dim: int) -> None:
        super().__init__()
        self.inner_proj = nn.Linear(dim, inner_dim)
        self.output_proj = nn.Linear(inner_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.output_proj(F.relu(self.inner_proj(x)))


class _Block(nn.Module):
    """Pre-LN self-attention and FFN modules. Keys ``self_attn[_layer_norm]``, ``ffn[_layer_norm]``."""

    def __init__(self, c: SonarConfig) -> None:
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(c.model_dim)
        self.self_attn = Attention(c.model_dim, c.num_heads)
        self.ffn_layer_norm = nn.LayerNorm(c.model_dim)
        self.ffn = FeedForward(c.model_dim, c.ffn_inner_dim)


class EncoderLayer(_Block):
    def forward(self, x: Tensor, mask: Tensor) -> Tensor:  # x: [B, S, dim]; mask: [B, 1, 1, S] bool
        h = self.self_attn_layer_norm(x)
        attn = self.self_attn
        x = attn(h, attn.heads(attn.k_proj(h)), attn.heads(attn.v_proj(h)), mask) + x
        return self.ffn(self.ffn_layer_norm(x)) + x


class DecoderLayer(_Block):
    """Plus the attention to the sentence vector (``encoder_decoder_attn[_layer_norm]``); the decoder runs its
    layers one cached step at a time (:meth:`SonarTextDecoder.step`)."""

    def __init__(self, c: SonarConfig) -> None:
        super().__init__(c)
        self.encoder_decoder_attn_layer_norm = nn.LayerNorm(c.model_dim)
        self.encoder_decoder_attn = Attention(c.model_dim, c.num_heads)


class _Frontend(nn.Module):
    """Keys ``embed.weight``; the sinusoid table is no part of a checkpoint (fairseq2: non-persistent)."""

    def __init__(self, c: SonarConfig, num_positions: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(c.vocab_size, c.model_dim)
        self.scale = math.sqrt(c.model_dim)
        self.pos_encoder = SinusoidalPositionEncoder(c.model_dim, num_positions, offset=2)  # fairseq: pad_idx 1 + 1

    def forward(self, ids: Tensor, start: int = 0) -> Tensor:  # ids: [B, S] -> [B, S, dim]
        return self.pos_encoder(self.embed(ids) * self.scale, start)


class _Stack(nn.Module):
    """Keys ``layers.*`` and, with ``norm_dim``, ``layer_norm.*`` (the decoder's; the encoder's is the model's)."""

    def __init__(self, layers: list[nn.Module], norm_dim: Optional[int] = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.layer_norm = nn.LayerNorm(norm_dim) if norm_dim else None


class SonarTextEncoder(nn.Module):
    """Token ids -> sentence embeddings. Keys: ``encoder_frontend.*``, ``encoder.layers.*``, ``layer_norm.*``."""

    def __init__(self, config: SonarConfig = SonarConfig()) -> None:
        super().__init__()
        self.config = config
        self.max_tokens = config.max_seq_len + 2  # fairseq's encoders count the two offset positions as room
        self.encoder_frontend = _Frontend(config, self.max_tokens)
        self.encoder = _Stack([EncoderLayer(config) for _ in range(config.num_layers)])
        self.layer_norm = nn.LayerNorm(config.model_dim)

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """ids: int64 [B, S] (padded); lengths: int64 [B] -> [B, model_dim] mean over each sentence's tokens."""
        valid = torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]  # [B, S]
        mask = valid[:, None, None, :]
        x = self.encoder_frontend(ids)
        for layer in self.encoder.layers:
            x = layer(x, mask)
        x = self.layer_norm(x)
        total = x.where(valid[..., None], 0).sum(1)
        return total * (1.0 / (lengths.to(total.dtype) + 1e-7))[:, None]  # sonar's mean pooling, epsilon included


class SonarTextDecoder(nn.Module):
    """Sentence embedding + token prefix -> next-token logits, one step at a time over a KV cache.

    Keys: ``decoder_frontend.embed.weight`` (also the output projection), ``decoder.layers.*``,
    ``decoder.layer_norm.*``.
    """

    def __init__(self, config: SonarConfig = SonarConfig()) -> None:
        super().__init__()
        self.config = config
        self.decoder_frontend = _Frontend(config, config.max_seq_len)
        self.decoder = _Stack([DecoderLayer(config) for _ in range(config.num_layers)], config.model_dim)

    @torch.no_grad()
    def condition(self, sentences: Tensor) -> Tensor:
        """sentences: [B, model_dim] -> [L, B, model_dim], each layer's cross-attention output (fixed per sentence)."""
        sentences = sentences.to(self.decoder_frontend.embed.weight.dtype)
        return torch.stack([layer.encoder_decoder_attn.output_proj(layer.encoder_decoder_attn.v_proj(sentences))
                            for layer in self.decoder.layers])

    def new_cache(self, rows: int, capacity: int = 64) -> "KVCache":
        """An empty key/value cache of ``rows`` sequences (it grows past ``capacity`` positions as needed)."""
        c, w = self.config, self.decoder_frontend.embed.weight
        return KVCache([w.new_empty(2, rows, c.num_heads, min(capacity, c.max_seq_len), c.model_dim // c.num_heads)
                        for _ in range(c.num_layers)], c.max_seq_len)

    def step(self, ids: Tensor, position: int, cross: Tensor, cache: "KVCache") -> Tensor:
        """ids: [B] tokens at ``position``; cross: [L, B, dim] from :meth:`condition`; cache: :meth:`new_cache`,
        filled up to ``position`` -> logits [B, vocab] (in the weights' dtype)."""
        x = self.decoder_frontend(ids[:, None], position)  # [B, 1, dim]
        cache.reserve(position + 1)
        for layer, kv, c in zip(self.decoder.layers, cache.layers, cross):
            attn = layer.self_attn
            h = layer.self_attn_layer_norm(x)
            kv[0, :, :, position] = attn.heads(attn.k_proj(h))[:, :, 0]
            kv[1, :, :, position] = attn.heads(attn.v_proj(h))[:, :, 0]
            x = attn(h, kv[0, :, :, : position + 1], kv[1, :, :, : position + 1]) + x
            x = x + c[:, None]  # the cross-attention: exactly its value projection (one key), see module doc
            x = layer.ffn(layer.ffn_layer_norm(x)) + x
        return F.linear(self.decoder.layer_norm(x[:, 0]), self.decoder_frontend.embed.weight)


class KVCache:
    """The decoder's self-attention keys/values: per layer [2, rows, H, capacity, head_dim]. Capacity doubles when
    full (up to max_seq_len): sentences are short, the position limit is not."""

    def __init__(self, layers: list[Tensor], max_positions: int) -> None:
        self.layers, self.max_positions, self.filled = layers, max_positions, 0

    def reserve(self, positions: int) -> None:
        capacity = self.layers[0].shape[3]
        if positions > capacity:
            grown = min(max(2 * capacity, positions), self.max_positions)
            self.layers = [self._copy(kv, slice(None), grown) for kv in self.layers]
        self.filled = max(self.filled, positions)

    def reorder(self, rows: Tensor) -> None:
        """Keep rows ``rows`` ([n'] indices, repeats allowed: beam search's parents), filled positions only."""
        self.layers = [self._copy(kv, rows, kv.shape[3]) for kv in self.layers]

    def _copy(self, kv: Tensor, rows, capacity: int) -> Tensor:
        source = kv[:, rows, :, : self.filled]
        out = kv.new_empty(2, source.shape[1], kv.shape[2], capacity, kv.shape[4])
        out[:, :, :, : self.filled] = source
        return out


# fairseq names (Meta's decoder file) -> fairseq2 names; the first match wins
_FAIRSEQ_NAMES = [
    (r"^layers\.(\d+)\.encoder_attn\.out_proj\.", r"layers.\1.encoder_decoder_attn.output_proj."),
    (r"^layers\.(\d+)\.encoder_attn_layer_norm\.", r"layers.\1.encoder_decoder_attn_layer_norm."),
    (r"^layers\.(\d+)\.encoder_attn\.", r"layers.\1.encoder_decoder_attn."),
    (r"^layers\.(\d+)\.self_attn\.out_proj\.", r"layers.\1.self_attn.output_proj."),
    (r"^layers\.(\d+)\.fc1\.", r"layers.\1.ffn.inner_proj."),
    (r"^layers\.(\d+)\.fc2\.", r"layers.\1.ffn.output_proj."),
    (r"^layers\.(\d+)\.final_layer_norm\.", r"layers.\1.ffn_layer_norm."),
]


def _from_fairseq(state: dict, kind: str) -> dict:
    """A fairseq-layout state dict (``{"state_dict": ...}``) in fairseq2 names, with the embedding's control rows
    moved from fairseq's order (BOS, PAD, EOS, UNK) to the tokenizer's (PAD, UNK, BOS, EOS), as sonar-space does."""
    prefix = "encoder" if kind == "encoder" else "decoder"
    out = {}
    for key, value in state.items():
        if key == "version" or key.endswith("_float_tensor"):
            continue
        for pattern, replacement in _FAIRSEQ_NAMES:
            if re.match(pattern, key):
                key = re.sub(pattern, replacement, key)
                break
        if key.startswith("layers."):
            key = f"{prefix}.{key}"
        elif key.startswith("embed_tokens."):
            key = f"{prefix}_frontend.embed.{key[len('embed_tokens.'):]}"
        elif key.startswith("layer_norm.") and kind == "decoder":
            key = "decoder." + key
        elif key.startswith("output_projection."):
            key = "final_proj." + key[len("output_projection."):]
        out[key] = value
    for key in (f"{prefix}_frontend.embed.weight", "final_proj.weight"):  # the tied projection: the same rows
        if key in out:
            out[key] = out[key][[1, 3, 0, 2, *range(4, out[key].shape[0])]]
    return out


def load_sonar_checkpoint(path: str | Path, kind: str, config: Optional[SonarConfig] = None,
                          device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None) -> nn.Module:
    """A :class:`SonarTextEncoder` (``kind="encoder"``) or :class:`SonarTextDecoder` (``"decoder"``) from a SONAR
    checkpoint: fairseq2-native (plain or under "model") or fairseq layout (under "state_dict"), loaded with
    ``weights_only=True``. ``config`` defaults to the basic architecture with the file's vocabulary size; a file
    of another shape is refused, naming the first tensor that does not fit."""
    if kind not in ("encoder", "decoder"):
        raise ValueError(f"kind must be 'encoder' or 'decoder', not {kind!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SONAR {kind} checkpoint {path} not found")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # pickle errors, truncated zips, not a torch file at all
        raise ValueError(f"{path} is not a readable SONAR {kind} checkpoint ({type(e).__name__}: {e})") from e
    state = data.get("model", data) if isinstance(data, dict) else None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = _from_fairseq(state["state_dict"], kind)
    embed_key = f"{kind}_frontend.embed.weight"
    if not isinstance(state, dict) or embed_key not in state:
        keys = sorted(state)[:5] if isinstance(state, dict) else type(data).__name__
        raise ValueError(f"{path} is not a SONAR text {kind} checkpoint: no {embed_key} (found {keys}...)")
    projection = state.pop("final_proj.weight", None)  # fairseq2 and fairseq also save the tied weight by this name
    if projection is not None and not torch.equal(projection, state[embed_key]):
        raise ValueError(f"{path}: the output projection is not tied to the embeddings, unlike SONAR's decoder")
    config = config or SonarConfig(vocab_size=state[embed_key].shape[0])
    with torch.device("meta"):
        model = (SonarTextEncoder if kind == "encoder" else SonarTextDecoder)(config)
    expected = model.state_dict()
    for key in [k for k in expected if k in state]:  # the embedding first: its shape names the width
        if state[key].shape != expected[key].shape:
            raise ValueError(f"{path}: {key} has shape {tuple(state[key].shape)}, the SONAR {kind} of {config} "
                             f"expects {tuple(expected[key].shape)}: a checkpoint of another architecture (its shape "
                             "goes in config.json beside it)")
    unknown, missing = sorted(state.keys() - expected.keys()), sorted(expected.keys() - state.keys())
    if unknown or missing:
        layers = len({k.split(".")[2] for k in state if k.startswith(f"{kind}.layers.")})
        raise ValueError(f"{path} holds a {layers}-layer SONAR text {kind}, not the {config.num_layers} layers "
                         f"expected: unknown keys {unknown[:4]}, missing keys {missing[:4]}")
    model = model.to_empty(device=device)
    model.load_state_dict(state)
    return (model if dtype is None else model.to(dtype)).eval().requires_grad_(False)
