"""Base-LCM: PreNet -> causal Transformer -> PostNet, trained with MSE (paper section 2.2)."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..config import BaseLCMConfig, NormalizerConfig
from ..nn.init import OfficialInitMixin
from ..nn.attention import KVCache
from ..nn.linear import LinearFn
from ..nn.normalizer import SonarNormalizer
from ..nn.projection import Projection
from ..nn.transformer import Decoder
from .pretrained import SavePretrainedMixin
from .frontend import Frontend, frontend_positions_start


class BaseLCM(SavePretrainedMixin, OfficialInitMixin, nn.Module):
    """Module tree and keys as the official ``BaseLCModel``: ``frontend`` (with the optional
    ``sonar_normalizer``), ``lcm``, ``postnet``. Output position i predicts position i+1."""

    def __init__(self, config: BaseLCMConfig, normalizer: Optional[NormalizerConfig] = None) -> None:
        super().__init__()
        self.config = config
        self.sonar_dim = config.sonar_embed_dim
        self.frontend = Frontend(
            config.sonar_embed_dim, config.model_dim, config.max_seq_len, config.lcm.pos_embedding_style, config.frontend
        )
        if config.sonar_normalizer_name is not None:
            self.frontend.sonar_normalizer = SonarNormalizer.from_config(config.sonar_embed_dim, normalizer)
        else:
            self.frontend.sonar_normalizer = None
        self.lcm = Decoder(config.model_dim, config.max_seq_len, config.lcm)
        self.postnet = Projection(config.model_dim, config.model_output_dim or config.sonar_embed_dim, config.postnet)

    @property
    def normalizer(self) -> Optional[SonarNormalizer]:
        return self.frontend.sonar_normalizer

    def new_cache(self, capacity: int) -> list[KVCache]:
        return self.lcm.new_cache(capacity)

    def forward(
        self, x: Tensor, seq_lens: Optional[Tensor] = None, cache: Optional[list[KVCache]] = None,
        linear: Optional[LinearFn] = None,
    ) -> Tensor:
        """x: [B, S, sonar_dim] *normalized* embeddings; seq_lens: [B] or None -> [B, S, out_dim].

        The frontend does not normalize (as in the official code): callers pass normalized inputs.
        linear: replaces every projection's GEMM (an inference engine's kernel).
        """
        h = self.frontend(x, frontend_positions_start(cache), linear)
        h = self.lcm(h, seq_lens, cache, linear=linear)
        return self.postnet(h, linear)

    def predict_next_sentence(
        self,
        x: Tensor,
        seq_lens: Optional[Tensor] = None,
        cache: Optional[list[KVCache]] = None,
        *,
        sample: bool = False,
        temperature: float = 1.0,
        randn: Optional[Callable[[tuple[int, ...]], Tensor]] = None,
        linear: Optional[LinearFn] = None,
        forward: Optional[Callable[[Tensor], Tensor]] = None,
    ) -> Tensor:
        """x: [B, S, sonar_dim] raw SONAR embeddings -> [B, S, sonar_dim] predictions in SONAR space.

        With ``sample`` and ``temperature > 0``, ``randn(shape) * temperature`` is added to every
        position in normalized space (the official ``predict_next_sentence``). ``linear``: as in
        :meth:`forward`. ``forward``: evaluates ``self(x_normalized, seq_lens, cache)`` instead (a faster
        engine's evaluation of the same function).
        """
        norm = self.normalizer
        x = norm.normalize(x) if norm is not None else x
        out = forward(x) if forward is not None else self(x, seq_lens, cache, linear)
        if sample and temperature > 0:
            noise = randn(tuple(out.shape)) if randn is not None else torch.randn_like(out)
            out = out + noise.to(out) * temperature
        return norm.denormalize(out) if norm is not None else out
