"""PreNet frontends: SONAR dim -> model dim, plus frontend position encodings."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..config import EncoderFrontendConfig, LCMFrontendConfig
from ..nn.linear import LinearFn, apply_linear
from ..nn.init import init_linear
from ..nn.position import LearnedPositionEncoder, make_frontend_positions


class Frontend(nn.Module):
    """``pre_linear`` (+ ``pos_encoder`` learned/sine from position ``start``) + dropout. The Base-LCM
    variant can scale inputs by sqrt(model_dim) first. Keys match ``EncoderFrontend``/``LCMFrontend``."""

    def __init__(
        self,
        in_dim: int,
        model_dim: int,
        max_seq_len: int,
        pos_style: str,
        config: EncoderFrontendConfig | LCMFrontendConfig,
    ) -> None:
        super().__init__()
        self.embed_scale = math.sqrt(model_dim) if getattr(config, "scale_embeddings", False) else 1.0
        self.pre_linear = nn.Linear(in_dim, model_dim, bias=config.pre_linear_bias)
        self.pos_encoder = make_frontend_positions(pos_style, model_dim, max_seq_len)
        self.dropout = nn.Dropout(config.dropout_p)
        self.init, self.embedding_std = config.pre_linear_init_fn, config.embedding_std

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``pre_linear`` by ``pre_linear_init_fn``, learned positions normal with std ``embedding_std``."""
        init_linear(self.pre_linear, self.init)
        if isinstance(self.pos_encoder, LearnedPositionEncoder):
            nn.init.normal_(self.pos_encoder.weight, std=self.embedding_std)

    def forward(self, x: Tensor, start: int = 0, linear: Optional[LinearFn] = None) -> Tensor:
        """x: [B, S, in_dim] -> [B, S, model_dim] at positions start..; linear: replaces pre_linear's GEMM."""
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        x = apply_linear(self.pre_linear, x, linear)
        if self.pos_encoder is not None:
            x = self.pos_encoder(x, start)
        return self.dropout(x)


def frontend_positions_start(cache: Optional[list]) -> int:
    """Absolute position of the next input: the number of positions already in the KV cache."""
    return cache[0].length if cache else 0
