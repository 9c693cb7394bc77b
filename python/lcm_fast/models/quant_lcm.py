"""Quant-LCM (paper section 2.3.5): coarse-to-fine generation over residual-quantized embeddings.

The One-Tower backbone, where the noisy input of the next sentence is its *intermediate quantized
representation* ``q_{k-1} = sum_{j<k-1} C[j, code_j]`` (zero for k = 1) and the timestep embedding is
a codebook-index embedding (index k-1: "predict codebook k"; index M marks clean context tokens).
Quant-LCM-D outputs logits over the K units of codebook k; Quant-LCM-C outputs the continuous target
embedding, whose residual ``r = prediction - q_{k-1}`` picks (or samples, eq. 23) the next centroid.
The codebooks ``[M, K, d]`` (raw SONAR space) are a buffer of the model, saved with its weights.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..config import NormalizerConfig, QuantLCMConfig
from ..ops.rvq import rvq_encode, search_codebooks, sq_norms
from .one_tower import OneTowerBackbone


class QuantLCM(OneTowerBackbone):
    """Keys: ``sonar_normalizer``, ``frontend``, ``lcm``, ``postnet`` (to K logits for ``discrete``, to
    sonar_dim for ``continuous``), ``embed_codebook`` [M + 1, codebook_embed_dim], ``rvq_codebooks``."""

    def __init__(self, config: QuantLCMConfig, normalizer: Optional[NormalizerConfig] = None) -> None:
        if config.target not in ("discrete", "continuous"):
            raise ValueError(f"Quant-LCM target must be 'discrete' or 'continuous', got {config.target!r}")
        out_dim = config.codebook_size if config.target == "discrete" else config.sonar_embed_dim
        super().__init__(config, normalizer, config.codebook_embed_dim, out_dim)
        self.embed_codebook = nn.Embedding(config.n_codebooks + 1, config.codebook_embed_dim)
        self.register_buffer("rvq_codebooks",
                             torch.zeros(config.n_codebooks, config.codebook_size, config.sonar_embed_dim))
        self.clean_index = config.n_codebooks
        self._rvq_tables: tuple = ((), None)  # (key of the buffer, its encoder tables): see rvq_tables

    @property
    def discrete(self) -> bool:
        return self.config.target == "discrete"

    def condition(self, t: Tensor) -> Tensor:
        return self.embed_codebook(t)

    def set_codebooks(self, codebooks: Tensor) -> "QuantLCM":
        """Installs RVQ codebooks [M, K, sonar_dim] (e.g. ``ResidualQuantizer.codebooks``)."""
        expected = tuple(self.rvq_codebooks.shape)
        if tuple(codebooks.shape) != expected:
            raise ValueError(f"codebooks of shape {tuple(codebooks.shape)} do not fit this Quant-LCM "
                             f"(n_codebooks, codebook_size, sonar_embed_dim) = {expected}")
        self.rvq_codebooks.copy_(codebooks)
        return self

    def require_codebooks(self) -> None:
        """Raises unless RVQ codebooks are installed (the buffer starts all zero; each codebook's first centroid,
        [M, d], is enough to tell)."""
        if not bool(self.rvq_codebooks[:, 0].any()):
            raise ValueError("the Quant-LCM has no RVQ codebooks: install the ones it was trained with, "
                             "model.set_codebooks(ResidualQuantizer.load(path).codebooks) (CLI: --rvq PATH)")

    def rvq_tables(self) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """The fp32 codebooks [M, K, d], their squared norms [M, K] and the bf16 copy of the candidate
        search (None where ``search="auto"`` is the fp32 search), made again only when the codebook
        buffer changes: at 64 x 8192 x 1024 they cost a pass over 2 GB, and quantize runs every batch."""
        buf = self.rvq_codebooks
        key = (buf.data_ptr(), buf._version, buf.device, buf.dtype)
        if self._rvq_tables[0] != key:
            cb = buf.detach().float()
            self._rvq_tables = (key, (cb, sq_norms(cb), search_codebooks(cb)))
        return self._rvq_tables[1]

    def quantize(self, x: Tensor) -> Tensor:
        """Codes [..., M] int64 of raw embeddings x [..., sonar_dim] (greedy RVQ, fused kernel; the certified
        bf16 candidate search on CPUs with bf16 dot products, which gives the fp32 search's codes)."""
        cb, sq, search_cb = self.rvq_tables()
        codes = rvq_encode(x.reshape(-1, x.shape[-1]).float(), cb, sq, search_codebooks=search_cb)
        return codes.long().view(*x.shape[:-1], -1)

    def intermediate(self, codes: Tensor, k: Tensor) -> Tensor:
        """Raw intermediate representations [..., sonar_dim]: the sum of C[j, codes[..., j]] over
        j < k (k: [...] integers in [0, M]; k = 0 gives zeros). codes: [..., M]."""
        out = torch.zeros(*codes.shape[:-1], self.sonar_dim, device=codes.device, dtype=self.rvq_codebooks.dtype)
        for j in range(self.config.n_codebooks):
            out += self.rvq_codebooks[j][codes[..., j]] * (k > j)[..., None]
        return out

    def unit_scores(self, out: Tensor, inter: Tensor, k: int) -> Tensor:
        """Scores [n, K] of the units of codebook k (0-based) from a (guided) model output [n, out_dim]
        at the raw intermediate representation inter [n, sonar_dim]. Quant-LCM-D: its logits.
        Quant-LCM-C: ``-|C[k, i] - r|`` with the predicted residual ``r = prediction - inter``, so that
        softmax(scores / temperature) is eq. 23 with beta = 1 / temperature."""
        if self.discrete:
            return out.float()
        pred = self.normalizer.denormalize(out) if self.normalizer is not None else out
        r = pred.float() - inter.float()
        return -torch.cdist(r, self.rvq_codebooks[k].float())


def sample_units(scores: Tensor, temperature: float, top_k: int, top_p: float,
                 normals: Optional[Tensor] = None) -> Tensor:
    """Unit indices [n] from scores [n, K]: the argmax when ``top_k == 1`` or ``temperature == 0``,
    else a draw from softmax(scores / temperature) restricted to the top_k units and to the top_p
    probability mass. ``normals`` [n, K] standard normal (the generator's noise source) become the
    Gumbel noise of the Gumbel-max draw, so every random number comes from one place."""
    if top_k == 1 or temperature == 0:
        return scores.argmax(-1)
    if normals is None:
        raise ValueError("sampling units needs standard-normal draws (normals [n, K])")
    logits = scores / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        mass = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (mass - sorted_logits.softmax(-1)) >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    u = torch.special.ndtr(normals.to(logits)).clamp(1e-12, 1 - 1e-7)
    return (logits - torch.log(-torch.log(u))).argmax(-1)
