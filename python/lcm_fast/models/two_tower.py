"""Two-Tower diffusion LCM: a causal contextualizer and an AdaLN denoiser (paper section 2.3.4)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import DenoiserConfig, NormalizerConfig, TwoTowerConfig
from ..diffusion.schedule import DDIMScheduler
from ..nn.init import OfficialInitMixin
from ..nn.attention import KVCache, MultiheadAttention, ValueOutputAttention, key_padding_mask
from ..nn.linear import LinearFn
from ..nn.norm import make_norm, norm_args
from ..nn.normalizer import SonarNormalizer
from ..nn.position import RotaryEncoder, make_frontend_positions
from ..nn.projection import Projection
from ..nn.timestep import TimestepEmbedder
from ..nn.transformer import Decoder, FeedForward, norm_tensors
from ..ops.adaln import adaln_gated_residual_norm_modulate, adaln_norm_modulate
from .pretrained import SavePretrainedMixin
from .frontend import Frontend, frontend_positions_start


class AdaLNModulator(nn.Module):
    """SiLU + ``fc`` (D -> 9D). Output rows: [self-attn | cross-attn | ffn] x [shift, scale, gate]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, 9 * dim)

    @torch.no_grad()
    def reset_parameters(self) -> None:  # AdaLN-zero: every layer starts as the identity
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, t_emb: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # [..., D] -> 3 x [..., 3D]
        return self.fc(F.silu(t_emb)).chunk(3, dim=-1)


class DenoiserLayer(nn.Module):
    """Pre-norm DiT block with cross-attention: each sublayer is ``x + gate * f(LN(x) * (1 + scale) + shift)``
    (AdaLN-Zero, Peebles & Xie 2023), modulated by the timestep embedding only."""

    def __init__(self, dim: int, config: DenoiserConfig, rope: Optional[RotaryEncoder]) -> None:
        super().__init__()
        style = config.layer_normalization_style
        self.self_attn_layer_norm = make_norm(style, dim)
        self.self_attn = ValueOutputAttention(dim, output_bias=config.mha_output_proj_bias,
                                              output_init=config.attention_output_init_fn)
        self.self_attn_norm = make_norm(style, dim) if config.norm_order_style == "normformer" else None
        self.cross_attention_layer_norm = make_norm(style, dim)
        self.cross_attention = MultiheadAttention.from_config(dim, config, rope)
        self.ffn_layer_norm = make_norm(style, dim)
        self.ffn = FeedForward(dim, config)
        self.modulator = AdaLNModulator(dim)
        self.dropout = nn.Dropout(config.dropout_p)

    def forward(self, x: Tensor, t_emb: Tensor, keys: Tensor, cross_mask: Optional[Tensor]) -> Tensor:
        """x: [B, S, D] latents; t_emb: [B, S, D]; keys: [B, C+1, D] (zero row first).

        Each gated residual is fused with the next sublayer's norm + modulate (ops.adaln)."""
        mod_sa, mod_ca, mod_ff = self.modulator(t_emb)
        shift, scale, gate_sa = mod_sa.chunk(3, dim=-1)
        w, b, rms, eps = norm_args(self.self_attn_layer_norm)
        h = self.self_attn(adaln_norm_modulate(x, shift, scale, w, b, rms=rms, eps=eps))
        if self.self_attn_norm is not None:
            h = self.self_attn_norm(h)
        shift, scale, gate_ca = mod_ca.chunk(3, dim=-1)
        w, b, rms, eps = norm_args(self.cross_attention_layer_norm)
        x, y = adaln_gated_residual_norm_modulate(x, self.dropout(h), gate_sa, shift, scale, w, b, rms=rms, eps=eps)
        h = self.cross_attention(y, keys, mask=cross_mask)
        shift, scale, gate_ff = mod_ff.chunk(3, dim=-1)
        w, b, rms, eps = norm_args(self.ffn_layer_norm)
        x, y = adaln_gated_residual_norm_modulate(x, self.dropout(h), gate_ca, shift, scale, w, b, rms=rms, eps=eps)
        return x + gate_ff * self.dropout(self.ffn(y))

    def decode_tensors(self, compose_value_output: bool = True) -> list[Optional[Tensor]]:
        """This layer's part of ``denoiser_layers_decode``'s ``params`` (``lcm_fast.ops.denoiser.LAYER_TENSORS``
        order): None where the layer has no such tensor. ``compose_value_output``: the self-attention as its
        composed projection (``ValueOutputAttention.composed``), one weight read per row instead of two."""
        sa, ca = self.self_attn, self.cross_attention
        value = ([*sa.composed(), None, None] if compose_value_output else
                 [sa.v_proj.weight, sa.v_proj.bias, sa.output_proj.weight, sa.output_proj.bias])
        return [*norm_tensors(self.self_attn_layer_norm), *value, *norm_tensors(self.self_attn_norm),
                *norm_tensors(self.cross_attention_layer_norm), ca.q_proj.weight, ca.q_proj.bias,
                *norm_tensors(ca.q_layer_norm), ca.output_proj.weight, ca.output_proj.bias,
                *norm_tensors(self.ffn_layer_norm), *self.ffn.decode_tensors()]


class Denoiser(nn.Module):
    """Keys as the official ``LCMDenoiser``: ``embed_time``, ``initial_proj``, ``final_proj``,
    ``pos_encoder``, ``layers``, ``layer_norm``."""

    def __init__(self, sonar_dim: int, dim: int, max_seq_len: int, config: DenoiserConfig) -> None:
        super().__init__()
        if config.norm_order_style == "post":
            raise ValueError("the AdaLN denoiser needs pre-normalization (norm_order_style 'pre' or 'normformer')")
        if config.timestep_embed_dim != dim:
            raise ValueError(f"denoiser.timestep_embed_dim ({config.timestep_embed_dim}) must equal model_dim ({dim})")
        rope = None
        if config.pos_embedding_style == "rope":
            rope = RotaryEncoder(dim // config.num_attn_heads, max_seq_len, config.rope_theta)
        self.embed_time = TimestepEmbedder(dim)
        self.initial_proj = Projection(sonar_dim, dim, config.pre_denoiser)
        self.final_proj = Projection(dim, sonar_dim, config.post_denoiser)
        self.pos_encoder = make_frontend_positions(config.pos_embedding_style, dim, max_seq_len)
        self.layers = nn.ModuleList(DenoiserLayer(dim, config, rope) for _ in range(config.num_layers))
        self.layer_norm = make_norm(config.layer_normalization_style, dim)
        self.dropout = nn.Dropout(config.final_dropout_p)

    def forward(
        self,
        latents: Tensor,
        timesteps: Tensor,
        context: Tensor,
        context_lens: Optional[Tensor] = None,
        *,
        inference: bool,
        source_lens: Optional[Tensor] = None,
        cfg_dropout_rows: Optional[Tensor] = None,
    ) -> Tensor:
        """latents: [B, S, sonar_dim] (normalized space); timesteps: [B, S] int; context: [B, C, D];
        context_lens: [B] valid context rows or None (all valid); source_lens: [B] (supervised training).

        A literal zero row is prepended to the context (key 0). With ``inference`` the query sees all
        keys; otherwise query i sees key 0 and context rows < i (+ source_lens), as in training, and the
        query rows marked in ``cfg_dropout_rows`` ([S] or [B, S] bool: classifier-free-guidance training) see
        only key 0. Returns the prediction [B, S, sonar_dim] (x0 for prediction_type 'sample').
        """
        keys = torch.cat((context.new_zeros(context.shape[0], 1, context.shape[2]), context), dim=1)
        num_keys = keys.shape[1]
        mask = None
        if not inference:
            # ShiftedCausalAttentionMask: row i sees keys 0..i (+ source length when supervised).
            q = torch.arange(latents.shape[1], device=latents.device)[:, None]
            k = torch.arange(num_keys, device=latents.device)[None, :]
            offset = source_lens[:, None, None] if source_lens is not None else 0
            mask = k <= q + offset  # [S, C+1] or [B, S, C+1]
            if cfg_dropout_rows is not None:
                mask = mask & ~(cfg_dropout_rows[..., None] & (k > 0))  # [S] or [B, S] rows
            mask = mask[:, None] if mask.dim() == 3 else mask
        if context_lens is not None:
            pad = key_padding_mask(context_lens + 1, num_keys)
            mask = pad if mask is None else pad & mask
        x = self.initial_proj(latents)
        if self.pos_encoder is not None:
            x = self.pos_encoder(x)
        t_emb = self.embed_time(timesteps)
        for layer in self.layers:
            x = layer(x, t_emb, keys, mask)
        return self.final_proj(self.dropout(self.layer_norm(x)))

    def decode_io_tensors(self) -> list[Optional[Tensor]]:
        """``denoiser_layers_decode``'s ``io_params`` (``lcm_fast.ops.denoiser.IO_TENSORS``): the input projection,
        the position-0 encoding added after it (None without one), the final norm and the output projection; []
        when a projection has an activation (those then run outside the op)."""
        if self.initial_proj.activation_fn is not None or self.final_proj.activation_fn is not None:
            return []
        w = self.initial_proj.fc.weight
        position_0 = self.pos_encoder(w.new_zeros(1, 1, w.shape[0]))[0, 0] if self.pos_encoder is not None else None
        return [w, self.initial_proj.fc.bias, position_0, *norm_tensors(self.layer_norm), self.final_proj.fc.weight,
                self.final_proj.fc.bias]

    @torch.no_grad()
    def decode_modulations(self, timesteps: Sequence[int]) -> tuple[Tensor, Tensor]:
        """What decoding needs of the timestep and of the empty context: (modulations [steps, layers, 9, D], the
        AdaLN (shift, scale, gate) of the self-attention, cross-attention and FFN at each timestep; uncond_cross
        [layers, D], each layer's cross-attention output for an unconditional row, which sees only the zero key:
        the softmax over one key is 1)."""
        w = self.initial_proj.fc.weight
        t_emb = self.embed_time(torch.tensor(list(timesteps), device=w.device)[:, None])  # [steps, 1, D]
        mods = torch.stack([layer.modulator.fc(F.silu(t_emb))[:, 0] for layer in self.layers], dim=1)
        zero = w.new_zeros(1, 1, w.shape[0])
        uncond_cross = torch.stack([layer.cross_attention(zero, zero)[0, 0] for layer in self.layers])
        return mods.unflatten(-1, (9, -1)), uncond_cross


class TwoTowerLCM(SavePretrainedMixin, OfficialInitMixin, nn.Module):
    """Keys as the official ``TwoTowerDiffusionLCModel``: ``sonar_normalizer``, ``encoder_frontend``,
    ``context_encoder``, ``denoiser``. ``noise_scheduler`` is a plain object (not in the state dict)."""

    def __init__(self, config: TwoTowerConfig, normalizer: Optional[NormalizerConfig] = None) -> None:
        super().__init__()
        self.config = config
        self.sonar_dim = config.sonar_embed_dim
        self.sonar_normalizer = SonarNormalizer.from_config(config.sonar_embed_dim, normalizer)
        self.encoder_frontend = Frontend(
            config.sonar_embed_dim,
            config.model_dim,
            config.max_seq_len,
            config.context_encoder.pos_embedding_style,
            config.frontend,
        )
        self.context_encoder = Decoder(config.model_dim, config.max_seq_len, config.context_encoder)
        self.denoiser = Denoiser(config.sonar_embed_dim, config.model_dim, config.max_seq_len, config.denoiser)
        self.noise_scheduler = DDIMScheduler(config.noise_scheduler)

    @property
    def normalizer(self) -> SonarNormalizer:
        return self.sonar_normalizer

    def new_cache(self, capacity: int) -> list[KVCache]:
        return self.context_encoder.new_cache(capacity)

    def encode(
        self, x: Tensor, seq_lens: Optional[Tensor] = None, cache: Optional[list[KVCache]] = None,
        linear: Optional[LinearFn] = None,
    ) -> Tensor:
        """Contextualizer. x: [B, S, sonar_dim] normalized; seq_lens: [B] or None -> [B, S, model_dim].
        linear: replaces every projection's GEMM (an inference engine's kernel)."""
        h = self.encoder_frontend(x, frontend_positions_start(cache), linear)
        return self.context_encoder(h, seq_lens, cache, linear=linear)

    def forward(
        self, clean: Tensor, noisy: Tensor, timesteps: Tensor, seq_lens: Optional[Tensor] = None,
        cfg_dropout_rows: Optional[Tensor] = None,
    ) -> Tensor:
        """Training-style call. clean, noisy: [B, S, sonar_dim] normalized; timesteps: [B, S] int;
        seq_lens: [B] or None; cfg_dropout_rows: [S] or [B, S] bool rows denoised without context (CFG training).
        Position i is denoised from the context of positions < i."""
        context = self.encode(clean, seq_lens)
        return self.denoiser(noisy, timesteps, context, seq_lens, inference=False, cfg_dropout_rows=cfg_dropout_rows)
