"""The fast Two-Tower denoiser evaluation: what the official generator computes, without its waste
(reference-lcm-spec.md section 10).

- AdaLN modulations depend only on the timestep: one table ``[steps, layers, 9 * model_dim]`` per
  schedule replaces the timestep MLP and every modulator GEMM of the loop. It is kept per denoiser
  (:class:`DecodingTables`) and reused by later generation calls until the schedule or a weight changes.
- Cross-attention keys/values of ``[zero; context]`` are projected once per context row and kept in a
  cache that grows by one row per generated sentence, instead of being recomputed at every step.
- Unconditional CFG rows see only the zero key, so their cross-attention output is a per-layer
  constant, ``output_proj(v_proj(0))``; they never run cross-attention.
- The first CFG step (t = T-1) uses only the conditional prediction: the unconditional half is not
  computed at all.
- Self-attention over one position is ``output_proj(v_proj(x))`` (the model's ValueOutputAttention), a
  linear map: the engine applies the product ``W_o W_v`` (formed once, with the tables below), one
  D x D weight read per row instead of two. It reassociates the sum, so it differs within fp32 rounding.
- Every projection of a step multiplies one or two rows per document, so its cost is streaming the
  weights: they go through :func:`lcm_fast.ops.skinny_linear`, which reads W once at close to memory
  bandwidth where the BLAS path of ``F.linear`` reaches a fraction of it on CPU.
- The whole denoiser of a step (input projection, every layer, final norm and output projection) is one
  :func:`lcm_fast.ops.denoiser_layers_decode` call (one C++ call on CPU): issued as ~20 ops each from
  Python, a layer took 4.6x as long at model dim 256 (bench/RESULTS.md).

Base-LCM (:class:`FastDecoder`) takes the same recipe for its one new position per sentence: its layers are
one :func:`lcm_fast.ops.decoder_layers_decode` call that writes each layer's key and value into the
preallocated cache, and the frontend and postnet projections go through :func:`lcm_fast.ops.skinny_linear`.
The prompts' prefills (contextualizer and cross-attention K/V, Base-LCM's prompt) run the modules with
``linear=skinny_linear``: the kernel where it beats BLAS (a batch-1 prompt of <= 64 rows in fp32, any bf16).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..models import BaseLCM, TwoTowerLCM
from ..models.one_tower import OneTowerBackbone
from ..models.two_tower import Denoiser
from ..nn.attention import KVCache
from ..nn.norm import norm_args
from ..nn.transformer import decode_args
from ..ops.decoder import decoder_layers_decode_for, decoder_layers_decode_ref
from ..ops.denoiser import denoiser_layers_decode_for, denoiser_layers_decode_ref
from ..ops.linear import PACKED_FORMATS, quantize_weight, skinny_linear
from .graphs import batch_bucket, static_layers_decode

#: the decode pack's projection weights: None (the model's own, in its dtype), "int8" or "fp8" (weight-only e4m3)
#: (:func:`lcm_fast.ops.quantize_weight`: per-output-channel scales, activations in the model dtype)
WEIGHT_FORMATS = (None, *PACKED_FORMATS)


def check_weights(weights: Optional[str]) -> None:
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {weights!r}; expected one of {WEIGHT_FORMATS}")


def pack_weights(tensors: list, weights: Optional[str]) -> list:
    """A decode pack's tensors with its projection weights (its 2-D tensors; norms, biases and slopes are 1-D) in
    the format ``weights``."""
    check_weights(weights)
    return tensors if weights is None else [quantize_weight(t, weights) if t is not None and t.dim() == 2 else t
                                            for t in tensors]


def _fingerprint(module: torch.nn.Module) -> tuple:
    """(data_ptr, _version, dtype, device) of every parameter: in-place updates bump _version."""
    return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in module.parameters())


_PACKS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def packed_decode_args(layers: torch.nn.ModuleList, weights: Optional[str]) -> tuple:
    """:func:`decode_args` of layers with the projection weights in the format ``weights``, kept per layers and format
    until a weight changes (packing the 1.6B denoiser takes about a second)."""
    fingerprint = _fingerprint(layers)
    packs = _PACKS.setdefault(layers, {})
    kept = packs.get(weights)
    if kept is None or kept[0] != fingerprint:
        params, *rest = decode_args(layers)
        packs[weights] = kept = (fingerprint, (pack_weights(params, weights), *rest))
    return kept[1]


@dataclass
class DecodingTables:
    """What the fast engine derives from a denoiser's weights (and schedule), kept per denoiser and weight format
    and reused by later generation calls until the schedule or any weight changes: rebuilding them per call cost
    ~12 ms at model dim 256, a tenth of generating one sentence. Memory: the composed self-attention
    weights, layers x D^2 in the model dtype (218 MB for the 1.6B recipe in fp32), freed with the model."""

    weights: tuple  # _fingerprint of the denoiser
    weight_format: Optional[str]  # WEIGHT_FORMATS
    layers_args: tuple  # the static arguments of denoiser_layers_decode (nn.transformer.decode_args)
    io_params: list  # Denoiser.decode_io_tensors (empty when a projection has an activation: those run outside it)
    timesteps: tuple[int, ...]
    modulations: Tensor  # [steps, layers, 9, D] AdaLN (shift, scale, gate) of the three sublayers
    uncond_cross: Tensor  # [layers, D] cross-attention output of the unconditional rows


_TABLES: "weakref.WeakKeyDictionary[Denoiser, dict]" = weakref.WeakKeyDictionary()


def clear_caches() -> None:
    """Forgets every kept decode pack and table (the next generation builds them again, as a first call does)."""
    _PACKS.clear()
    _TABLES.clear()


@torch.no_grad()
def decoding_tables(den: Denoiser, timesteps: list[int], weight_format: Optional[str] = None) -> DecodingTables:
    """The denoiser's :class:`DecodingTables` for this schedule and weight format (one kept per format), rebuilt
    only what changed."""
    weights = _fingerprint(den)
    per_format = _TABLES.setdefault(den, {})
    tables = per_format.get(weight_format)
    same = tables is not None and tables.weights == weights
    if same and tables.timesteps == tuple(timesteps):
        return tables
    if same:
        layers_args, io_params = tables.layers_args, tables.io_params
    else:
        layers_args = packed_decode_args(den.layers, weight_format)
        io_params = pack_weights(den.decode_io_tensors(), weight_format)
    modulations, uncond_cross = den.decode_modulations(timesteps)
    per_format[weight_format] = tables = DecodingTables(weights, weight_format, layers_args, io_params,
                                                        tuple(timesteps), modulations, uncond_cross)
    return tables


class FastDenoiser:
    """Timestep tables and cross-attention caches for one generation call.

    Args:
        model: the Two-Tower model (its modules are used, not copied).
        timesteps: the schedule's timesteps, in order.
        capacity: the most context rows any document will have (the zero key is added on top).
        static_shapes: every step has the same shapes whatever the context length (for CUDA graphs):
            cross-attention reads the caches' whole capacity, masked past ``self.length``, a device
            tensor (the composed ops of :func:`denoiser_layers_decode_ref`; the CPU kernel takes an int). The
            caches hold rows for the first batch's :func:`batch_bucket`, and keep their storage on :meth:`reorder`.
        weights: the format of the step's projection weights (:data:`WEIGHT_FORMATS`).
        inductor: static shapes, the layers compiled by Inductor (:func:`static_layers_decode`).
    """

    def __init__(self, model: TwoTowerLCM, timesteps: list[int], capacity: int, static_shapes: bool = False,
                 weights: Optional[str] = None, inductor: bool = False) -> None:
        den = model.denoiser
        self.model, self.denoiser, self.capacity = model, den, capacity + 1
        tables = decoding_tables(den, timesteps, weights)
        self.modulations, self.uncond_cross = tables.modulations, tables.uncond_cross
        self.layers_args, self.io_params = tables.layers_args, tables.io_params
        weight = den.layers[0].self_attn.v_proj.weight
        self.static_shapes = static_shapes
        self.layers_decode = (static_layers_decode(denoiser_layers_decode_ref, inductor) if static_shapes else
                              denoiser_layers_decode_for(weight.device.type, weight.dtype))
        self.length = torch.zeros((), dtype=torch.long, device=weight.device)  # [] valid positions (static_shapes)
        self.caches: list[KVCache] = []
        self.keys: list[Tensor] = []  # every layer's cache tensors, listed once per (re)allocation, not per step
        self.values: list[Tensor] = []

    def append(self, rows: Tensor) -> None:
        """rows: [B, n, D] new context rows (contextualizer outputs) for every layer's cross-attention
        cache; the first call starts the caches, the zero key first (projected in the same GEMM)."""
        if not self.caches:
            # static shapes: rows for the batch's bucket, compacted in place as documents finish
            rows_capacity = batch_bucket(rows.shape[0]) if self.static_shapes else None
            self.caches = [KVCache(self.capacity, zeroed=self.static_shapes, batch_capacity=rows_capacity)
                           for _ in self.denoiser.layers]
        if self.caches[0].length == 0:
            rows = torch.cat((rows.new_zeros(rows.shape[0], 1, rows.shape[2]), rows), dim=1)
        with torch.no_grad():
            for layer, cache in zip(self.denoiser.layers, self.caches):
                cache.append(*layer.cross_attention.project_kv(rows, cache.length, skinny_linear))
        self.length.fill_(self.caches[0].length)
        self._list_tensors()

    def _list_tensors(self) -> None:
        self.keys, self.values = [c.k for c in self.caches], [c.v for c in self.caches]

    def reorder(self, index: Tensor) -> None:
        for cache in self.caches:
            cache.reorder(index)
        self._list_tensors()

    def reset(self) -> None:
        """Empty caches for a new batch, on the same storage (static shapes: the graphs recorded on it stay valid)."""
        for cache in self.caches:
            cache.reset()
        self.length.zero_()

    @torch.no_grad()
    def __call__(self, x: Tensor, step: int, num_cond: int, rows: Optional[Tensor] = None) -> Tensor:
        """Denoiser output for latents x: [R, 1, sonar_dim] (model dtype) at schedule index ``step``.

        Rows [0, num_cond) are conditional (they attend over the cached context of batch rows
        ``rows``, all when None); the remaining R - num_cond rows are unconditional. -> [R, 1, sonar_dim].
        """
        den, io_params, h = self.denoiser, self.io_params, x[:, 0]
        if not io_params:  # projections with an activation run here, around the layers
            h = den.initial_proj(h, skinny_linear)
            if den.pos_encoder is not None:
                h = den.pos_encoder(h[:, None])[:, 0]
        params, rms, eps, activation, post_norms, qk_norm = self.layers_args
        length = self.length if self.static_shapes else self.caches[0].length
        h = self.layers_decode(h, self.modulations[step], params, self.keys, self.values, length, rows, num_cond,
                               self.uncond_cross, rms, eps, activation, post_norms, qk_norm, io_params)
        if not io_params:
            h = den.final_proj(den.layer_norm(h), skinny_linear)
        return h[:, None]


def fast_decoder_unsupported(model: BaseLCM | OneTowerBackbone) -> Optional[str]:
    """Why :class:`FastDecoder` cannot run this Base-LCM, One-Tower or Quant-LCM model (None: it can)."""
    layer = model.lcm.layers[0]
    if layer.order == "post":
        return "post-norm layers"
    if layer.residual_scale is not None:
        return "scale_residual"
    return None


class FastDecoder:
    """A Base-LCM's prediction, or a One-Tower model's denoising step (Quant-LCM's codebook pass), for one new
    position per document on the model's KV cache.

    Args:
        model: the Base-LCM, or a One-Tower backbone (One-Tower, Quant-LCM); its modules are used, not copied;
            :func:`fast_decoder_unsupported` is None.
        cache: the model's cache (``model.new_cache``), possibly filled by a prefill. A call writes the new
            position's keys/values; :meth:`advance` then counts it.
        static_shapes: every call has the same shapes whatever the position (for CUDA graphs): the position is
            ``self.length``, a device tensor, and attention reads the caches' whole capacity, masked past it (the
            composed ops of :func:`decoder_layers_decode_ref`; the caches must be ``zeroed``).
        weights: the format of the layers' projection weights (:data:`WEIGHT_FORMATS`; the frontend and postnet,
            one projection each, keep the model's).
        inductor: static shapes, the layers compiled by Inductor (:func:`static_layers_decode`).
    """

    def __init__(self, model: BaseLCM | OneTowerBackbone, cache: list[KVCache], static_shapes: bool = False,
                 weights: Optional[str] = None, inductor: bool = False) -> None:
        self.model, self.cache, self.static_shapes = model, cache, static_shapes
        self.layers_args = packed_decode_args(model.lcm.layers, weights)
        weight = model.frontend.pre_linear.weight
        rope, positions = model.lcm.layers[0].self_attn.pos_encoder, model.frontend.pos_encoder
        # [positions, hd / 2, 2]: the (cos, sin) of each pair
        self.rope = torch.stack(rope.tables(weight.device), dim=-1).contiguous() if rope is not None else None
        # the final norm goes in the layers' call (fused with the last residual) when it has their style
        norm, (rms, eps) = model.lcm.layer_norm, self.layers_args[1:3]
        self.final_norm = list(norm_args(norm)[:2]) if norm is not None and norm_args(norm)[2:] == (rms, eps) else []
        self.length = torch.zeros((), dtype=torch.long, device=weight.device)  # [] positions cached (static_shapes)
        # static_shapes: the frontend's additive positions as a table [max_seq_len, D], indexed by self.length
        with torch.no_grad():
            self.positions = (positions(weight.new_zeros(1, positions.max_seq_len, weight.shape[0]))[0]
                              if static_shapes and positions is not None else None)
        self.layers_decode = (static_layers_decode(decoder_layers_decode_ref, inductor) if static_shapes else
                              decoder_layers_decode_for(weight.device.type, weight.dtype))

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        """Base-LCM. x: [B, 1, sonar_dim] normalized embeddings of the new positions -> [B, 1, out_dim], the
        model's ``forward(x, cache=cache)``; :meth:`advance` then counts the position."""
        h = self._frontend(x[:, 0])
        return self._layers(h, None, h.shape[0])

    @torch.no_grad()
    def denoise(self, latents: Tensor, t: int, rows: Optional[Tensor], cfg: bool) -> Tensor:
        """One-Tower backbone. latents: [n, 1, sonar_dim] at condition t (a timestep, or Quant-LCM's codebook index),
        the token after the cached context of batch rows ``rows`` ([n], None: all) -> [n, 1, out_dim] predictions,
        followed with ``cfg`` by n unconditional ones (each token attending to itself only): the model's
        ``denoise_step``. The token's keys/values go to the caches' next position, which is not counted (the next
        step overwrites them)."""
        t_emb = self.model.condition(torch.full((1, 1), t, device=latents.device))[:, 0].to(latents.dtype)
        h = self._frontend(torch.cat((latents[:, 0], t_emb.expand(latents.shape[0], -1)), dim=-1))
        n = h.shape[0]
        return self._layers(torch.cat((h, h)) if cfg else h, rows, n)

    def _frontend(self, x: Tensor) -> Tensor:
        """x: [n, frontend input] -> [n, D] at the next position (the frontend of the cached positions' model)."""
        front = self.model.frontend
        h = x * front.embed_scale if front.embed_scale != 1.0 else x
        h = skinny_linear(h, front.pre_linear.weight, front.pre_linear.bias)
        if self.positions is not None:  # index_select: indexing with the 0-d length would read it on the host
            h = h + self.positions.index_select(0, self.length.reshape(1))
        elif front.pos_encoder is not None:
            h = front.pos_encoder(h[:, None], self.cache[0].length)[:, 0]
        return h

    def _layers(self, h: Tensor, rows: Optional[Tensor], num_cond: int) -> Tensor:
        """h: [R, D] -> [R, 1, out_dim]: every layer (rows < num_cond on the caches' batch rows ``rows``), the
        final norm and the postnet."""
        model = self.model
        if self.cache[0].k is None:  # no prefill: appending no position allocates the caches
            heads = model.lcm.layers[0].self_attn.num_heads
            empty = h.new_empty(num_cond, heads, 0, h.shape[1] // heads)
            for cache in self.cache:
                cache.append(empty, empty)
        params, rms, eps, activation, post_norms, qk_norm = self.layers_args
        start = self.length if self.static_shapes else self.cache[0].length
        h = self.layers_decode(h, params, [c.k for c in self.cache], [c.v for c in self.cache], start, rows, num_cond,
                               self.rope, rms, eps, activation, post_norms, qk_norm, self.final_norm)
        if model.lcm.layer_norm is not None and not self.final_norm:
            h = model.lcm.layer_norm(h)
        return model.postnet(h, skinny_linear)[:, None]

    def advance(self) -> None:
        """Counts the position the last call wrote (outside the call, which a CUDA graph may replay)."""
        for cache in self.cache:
            cache.length += 1
        self.length.fill_(self.cache[0].length)
