"""The fast Two-Tower denoiser evaluation: what the official generator computes, without its waste
(reference-lcm-spec.md section 10).

- AdaLN modulations depend only on the timestep: one table ``[steps, layers, 9 * model_dim]`` per
  schedule replaces the timestep MLP and every modulator GEMM of the loop. It is kept per denoiser
  and reused by later generation calls until the schedule or any denoiser weight changes.
- Cross-attention keys/values of ``[zero; context]`` are projected once per context row and kept in a
  cache that grows by one row per generated sentence, instead of being recomputed at every step.
- Unconditional CFG rows see only the zero key, so their cross-attention output is a per-layer
  constant, ``output_proj(v_proj(0))``; they never run cross-attention.
- The first CFG step (t = T-1) uses only the conditional prediction: the unconditional half is not
  computed at all.
- Self-attention over one position is ``output_proj(v_proj(x))`` (the model's ValueOutputAttention).
- Every projection of a step multiplies one or two rows per document, so its cost is streaming the
  weights: they go through :func:`lcm_fast.ops.skinny_linear`, which reads W once at close to memory
  bandwidth where the BLAS path of ``F.linear`` reaches a fraction of it on CPU.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models import TwoTowerLCM
from ..models.two_tower import Denoiser
from ..nn.attention import KVCache
from ..ops.adaln import adaln_gated_residual_norm_modulate, adaln_norm_modulate, norm_args
from ..ops.linear import skinny_linear


# denoiser -> (key, modulations, unconditional cross-attention outputs) of its latest schedule: a
# Generator called once per document would otherwise rebuild them per call (~80 ms at model dim 512)
_TABLES: "weakref.WeakKeyDictionary[Denoiser, tuple]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def _timestep_tables(den: Denoiser, timesteps: list[int]) -> tuple[Tensor, list[Tensor]]:
    """([steps, layers, 9, D] AdaLN modulations, per layer the [D] cross-attention output of the
    unconditional rows), recomputed when the schedule or a weight changed (in-place updates bump
    ``_version``, reassignments change ``data_ptr``)."""
    params = list(den.parameters())
    key = (tuple(timesteps), tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params))
    cached = _TABLES.get(den)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    t = torch.tensor(timesteps, device=params[0].device)[:, None]  # [steps, 1]
    t_emb = den.embed_time(t)  # [steps, 1, D]
    # (shift, scale, gate) of self-attention, cross-attention and FFN
    mods = torch.stack([layer.modulator.fc(F.silu(t_emb))[:, 0] for layer in den.layers], dim=1)
    modulations = mods.unflatten(-1, (9, mods.shape[-1] // 9))
    zero = params[0].new_zeros(1, 1, modulations.shape[-1])
    # the unconditional rows' cross-attention output: softmax over the zero key alone is 1
    uncond_cross = [layer.cross_attention(zero, zero)[0, 0] for layer in den.layers]
    _TABLES[den] = (key, modulations, uncond_cross)
    return modulations, uncond_cross


class FastDenoiser:
    """Timestep tables and cross-attention caches for one generation call.

    Args:
        model: the Two-Tower model (its modules are used, not copied).
        timesteps: the schedule's timesteps, in order.
        capacity: the most context rows any document will have (the zero key is added on top).
    """

    def __init__(self, model: TwoTowerLCM, timesteps: list[int], capacity: int) -> None:
        den = model.denoiser
        self.model, self.denoiser, self.capacity = model, den, capacity + 1
        # [steps, layers, 9, D] and [D] per layer
        self.modulations, self.uncond_cross = _timestep_tables(den, timesteps)
        self.norms = [
            tuple(norm_args(n) for n in (layer.self_attn_layer_norm, layer.cross_attention_layer_norm, layer.ffn_layer_norm))
            for layer in den.layers
        ]
        self.caches: list[KVCache] = []

    def start(self, context: Tensor) -> None:
        """context: [B, C, D] contextualizer outputs so far (C may be 0); the zero key comes first."""
        zero = context.new_zeros(context.shape[0], 1, context.shape[2])
        self.caches = [KVCache(self.capacity) for _ in self.denoiser.layers]
        self.append(torch.cat((zero, context), dim=1))

    def append(self, rows: Tensor) -> None:
        """rows: [B, n, D] new keys (context rows) for every layer's cross-attention cache."""
        with torch.no_grad():
            for layer, cache in zip(self.denoiser.layers, self.caches):
                cache.append(*layer.cross_attention.project_kv(rows, cache.length))

    def reorder(self, index: Tensor) -> None:
        for cache in self.caches:
            cache.reorder(index)

    def __call__(self, x: Tensor, step: int, num_cond: int, rows: Optional[Tensor] = None) -> Tensor:
        """Denoiser output for latents x: [R, 1, sonar_dim] (model dtype) at schedule index ``step``.

        Rows [0, num_cond) are conditional (they attend over the cached context of batch rows
        ``rows``, all when None); the remaining R - num_cond rows are unconditional. -> [R, 1, sonar_dim].
        """
        den = self.denoiser
        # this step's modulations, materialised once per call as [layers, 9, R, 1, D] so that every
        # fused AdaLN op gets contiguous [R, 1, D] operands without copying them itself
        mods_all = self.modulations[step][:, :, None, None, :].expand(-1, -1, x.shape[0], 1, -1).contiguous()
        h = den.initial_proj(x, skinny_linear)
        if den.pos_encoder is not None:
            h = den.pos_encoder(h)
        for layer, mods, cache, uncond, norms in zip(
            den.layers, mods_all, self.caches, self.uncond_cross, self.norms
        ):
            sh_sa, sc_sa, g_sa, sh_ca, sc_ca, g_ca, sh_ff, sc_ff, g_ff = mods.unbind(0)
            (w_sa, b_sa, rms_sa, eps_sa), (w_ca, b_ca, rms_ca, eps_ca), (w_ff, b_ff, rms_ff, eps_ff) = norms
            a = layer.self_attn(adaln_norm_modulate(h, sh_sa, sc_sa, w_sa, b_sa, rms=rms_sa, eps=eps_sa), skinny_linear)
            if layer.self_attn_norm is not None:
                a = layer.self_attn_norm(a)
            h, y = adaln_gated_residual_norm_modulate(h, a, g_sa, sh_ca, sc_ca, w_ca, b_ca, rms=rms_ca, eps=eps_ca)
            k, v = cache.k[:, :, : cache.length], cache.v[:, :, : cache.length]
            if rows is not None:
                k, v = k.index_select(0, rows), v.index_select(0, rows)
            ca = layer.cross_attention
            c = ca.attend(ca.project_q(y[:num_cond], linear=skinny_linear), k, v, linear=skinny_linear)
            if num_cond < h.shape[0]:
                c = torch.cat((c, uncond.expand(h.shape[0] - num_cond, 1, -1)))
            h, y = adaln_gated_residual_norm_modulate(h, c, g_ca, sh_ff, sc_ff, w_ff, b_ff, rms=rms_ff, eps=eps_ff)
            h = h + g_ff * layer.ffn(y, skinny_linear)
        return den.final_proj(den.layer_norm(h), skinny_linear)
