"""One-Tower diffusion LCM (paper section 2.3.3, Figures 6-7; not in the official code).

One causal transformer reads clean and noisy sentence embeddings; every input is concatenated with
its diffusion-timestep embedding (clean inputs carry t = 0) and gets the learned position of its
sentence. The noisy token of sentence n attends to the clean tokens of sentences < n and to itself
only, so all positions of a document train in one pass (the paper interleaves clean and noisy tokens;
here they are laid out as [clean_0..clean_{N-1} | noisy_0..noisy_{N-1}], which the attention mask makes
equivalent). Classifier-free guidance: dropped rows see only themselves (paper: rate 0.15).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..config import NormalizerConfig, OneTowerConfig, QuantLCMConfig
from ..diffusion.schedule import DDIMScheduler
from ..nn.init import OfficialInitMixin
from ..nn.attention import KVCache
from ..nn.linear import LinearFn
from ..nn.normalizer import SonarNormalizer
from ..nn.projection import Projection
from ..nn.timestep import TimestepEmbedder
from ..nn.transformer import Decoder
from .frontend import Frontend
from .pretrained import SavePretrainedMixin


class OneTowerBackbone(SavePretrainedMixin, OfficialInitMixin, nn.Module):
    """The One-Tower stack shared by the One-Tower diffusion LCM and Quant-LCM. Every input embedding is
    concatenated with a *condition* embedding (the diffusion timestep, or the codebook index), whose
    module the subclass provides as :meth:`condition`; clean context tokens carry ``clean_index``."""

    clean_index = 0

    def __init__(self, config: OneTowerConfig | QuantLCMConfig, normalizer: Optional[NormalizerConfig], cond_dim: int,
                 out_dim: int) -> None:
        super().__init__()
        if config.lcm.pos_embedding_style == "rope":
            raise ValueError("One-Tower uses frontend positions (learned, sine or none), not RoPE")
        self.config = config
        self.sonar_dim = config.sonar_embed_dim
        self.sonar_normalizer = SonarNormalizer.from_config(config.sonar_embed_dim, normalizer)
        # the Base-LCM frontend over [embedding | condition embedding] (the official LCMFrontend's unused
        # ``timestep_embed_dim`` input); ``scale_embeddings`` scales the concatenated input
        self.frontend = Frontend(config.sonar_embed_dim + cond_dim, config.model_dim, config.max_seq_len,
                                 config.lcm.pos_embedding_style, config.frontend)
        self.lcm = Decoder(config.model_dim, config.max_seq_len, config.lcm)
        self.postnet = Projection(config.model_dim, out_dim, config.postnet)

    def condition(self, t: Tensor) -> Tensor:
        """[B, S] integer condition -> [B, S, cond_dim]."""
        raise NotImplementedError

    @property
    def normalizer(self) -> SonarNormalizer:
        return self.sonar_normalizer

    def new_cache(self, capacity: int) -> list[KVCache]:
        return self.lcm.new_cache(capacity)

    def _embed(self, x: Tensor, t: Tensor, start: int, linear: Optional[LinearFn] = None) -> Tensor:
        """x: [B, S, sonar_dim] normalized; t: [B, S] conditions; sentences start.. -> [B, S, model_dim]."""
        return self.frontend(torch.cat((x, self.condition(t).to(x.dtype)), dim=-1), start, linear)

    def forward(
        self, clean: Tensor, noisy: Tensor, timesteps: Tensor, seq_lens: Optional[Tensor] = None,
        cfg_dropout_rows: Optional[Tensor] = None,
    ) -> Tensor:
        """Training-style call (same signature as the Two-Tower model). clean, noisy: [B, N, sonar_dim]
        normalized; timesteps: [B, N]; seq_lens: [B] or None; cfg_dropout_rows: [N] or [B, N] bool rows whose noisy
        token sees no context (CFG training). -> [B, N, D]
        predictions for the noisy positions, position n from the clean sentences < n."""
        B, N, _ = clean.shape
        device = clean.device
        positions = torch.arange(N, device=device)
        h = torch.cat((self._embed(clean, torch.full_like(timesteps, self.clean_index), 0),
                       self._embed(noisy, timesteps, 0)), dim=1)
        i, j = positions[:, None], positions[None, :]
        eye = torch.eye(N, dtype=torch.bool, device=device)
        clean_rows = torch.cat((j <= i, torch.zeros(N, N, dtype=torch.bool, device=device)), dim=1)
        sees_context = j < i if cfg_dropout_rows is None else (j < i) & ~cfg_dropout_rows[..., None]  # [[B,] N, N]
        lead = sees_context.shape[:-2]
        noisy_rows = torch.cat((sees_context, eye.expand_as(sees_context)), dim=-1)
        mask = torch.cat((clean_rows.expand(*lead, N, 2 * N), noisy_rows), dim=-2)  # [[B,] 2N, 2N]
        mask = mask[:, None] if lead else mask
        if seq_lens is not None:  # padded clean sentences are no context; every token keeps itself
            valid = torch.arange(N, device=device)[None, :] < seq_lens[:, None]  # [B, N]
            keys = torch.cat((valid, torch.ones_like(valid)), dim=1)[:, None, None, :]
            mask = (mask & keys) | torch.eye(2 * N, dtype=torch.bool, device=device)
        out = self.lcm(h, mask=mask)  # [B, 2N, M]: clean tokens, then noisy ones
        return self.postnet(out[:, N:])

    # ---- generation: the clean context is cached, each denoising step runs one noisy token --------

    def encode(self, x: Tensor, seq_lens: Optional[Tensor] = None, cache: Optional[list[KVCache]] = None,
               linear: Optional[LinearFn] = None) -> Tensor:
        """Adds clean sentences [B, S, sonar_dim] (normalized) to the context cache (positions follow the
        cached ones). Returns their hidden states [B, S, model_dim]. linear: replaces every projection's GEMM."""
        t = torch.full(x.shape[:2], self.clean_index, dtype=torch.long, device=x.device)
        return self.lcm(self._embed(x, t, cache[0].length if cache else 0, linear), seq_lens, cache, linear=linear)

    def denoise_step(self, latents: Tensor, t: int, cache: Optional[list[KVCache]], conditional: bool = True) -> Tensor:
        """latents: [B, 1, sonar_dim] at timestep t for the sentence after the cached clean context
        (None: an empty context). Conditional: attends to the context and itself; unconditional: to
        itself only, at the same position. -> prediction [B, 1, sonar_dim]."""
        position = cache[0].length if cache else 0
        timesteps = torch.full(latents.shape[:2], t, dtype=torch.long, device=latents.device)
        h = self._embed(latents, timesteps, position)
        if conditional and cache:
            out = self.lcm(h, cache=cache, store=False)
        else:
            out = self.lcm(h)
        return self.postnet(out)


class OneTowerLCM(OneTowerBackbone):
    """Keys: ``sonar_normalizer``, ``frontend`` (``pre_linear``: sonar + timestep dims -> model dim,
    ``pos_encoder``), ``lcm`` (the causal stack), ``postnet``, ``embed_time``."""

    def __init__(self, config: OneTowerConfig, normalizer: Optional[NormalizerConfig] = None) -> None:
        super().__init__(config, normalizer, config.timestep_embed_dim, config.sonar_embed_dim)
        self.embed_time = TimestepEmbedder(config.timestep_embed_dim)
        self.noise_scheduler = DDIMScheduler(config.noise_scheduler)

    def condition(self, t: Tensor) -> Tensor:
        return self.embed_time(t)
