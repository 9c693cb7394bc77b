"""Generation for every LCM family: the official generators' algorithm (options and outputs: :mod:`.options`).

Documents advance in lockstep, one sentence embedding per step (as ``LCMGenerator`` and
``TwoTowerDiffusionLCMGenerator`` do); rows whose (right-padded) prompt still covers the current position
are teacher-forced; finished rows leave the batch. Every random draw goes through a
:class:`~lcm_fast.inference.noise.NoiseSource`, in the official order, so recorded noise replays exactly.

Two engines compute the Two-Tower denoising: ``"reference"`` evaluates the denoiser as the official
code does (a readable port: every row, both CFG halves, every step), ``"fast"`` (the default) gets the
same outputs without the waste (see :mod:`lcm_fast.inference.fast`). Base-LCM, One-Tower and Quant-LCM use
their KV-cached decoder in both; the fast engine runs each new position's layers in one op call
(:class:`FastDecoder`; post-norm layers and ``scale_residual`` keep the modules). One stepper per family, the
engine a choice inside it; the DDIM + CFG chain of the diffusion families is :class:`~lcm_fast.diffusion.GuidedDDIM`.

Beam search over sampled concepts (``num_candidates`` x ``beam_size`` > 1, :mod:`lcm_fast.inference.beam`) widens every
document to K x B consecutive rows that run through the same steppers; after each sentence the rows are reordered to
the chosen beams (repeated rows: the caches copy their parents').
"""

from __future__ import annotations

import numbers
import sys
import warnings
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..diffusion import GuidedDDIM, SchedulerOutput, classifier_free_guidance
from ..models import BaseLCM, OneTowerLCM, QuantLCM, TwoTowerLCM
from ..models.quant_lcm import sample_units
from ..nn.attention import KVCache
from ..nn.linear import LinearFn
from ..nn.position import check_positions
from ..ops import skinny_linear
from .fast import FastDecoder, FastDenoiser, check_weights, fast_decoder_unsupported
from .graphs import BatchGraphs, batch_bucket, pad_batch
from .beam import BeamSearch, Candidates, Scorer, resolve_scorer
from .noise import NoiseSource, TorchNoise
from .options import GenerationOptions, GenerationOutput, validate_prompts
from .planning import concept_roles

StepCallback = Callable[[int, int, SchedulerOutput, Tensor], None]
ENGINES = ("fast", "reference")
# cuda_graphs: caches hold a multiple of this many positions, so that calls of similar lengths share buffers and graphs
STATIC_LENGTH_STEP = 64


def _moves(index: Tensor, rows: int) -> bool:
    """Whether taking rows ``index`` of ``rows`` active ones changes them (drops, repeats or permutes any)."""
    return index.numel() != rows or not torch.equal(index, torch.arange(rows, device=index.device))


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _normalize(model: OneTowerLCM | QuantLCM, x: Tensor) -> Tensor:
    """x in the model's normalized space (Quant-LCM may have no normalizer)."""
    return model.normalizer.normalize(x) if model.normalizer is not None else x


def _fast_decodes(model: BaseLCM | TwoTowerLCM | OneTowerLCM | QuantLCM, engine: str) -> bool:
    """The fast engine's decode step runs this model (FastDecoder does not take every layer style)."""
    return engine == "fast" and (isinstance(model, TwoTowerLCM) or fast_decoder_unsupported(model) is None)


class _ContextCache:
    """The One-Tower backbone's state (One-Tower, Quant-LCM): the clean sentences so far in the model's KV cache,
    which the fast engine's :class:`FastDecoder` reads in place. With ``static_batch`` (cuda_graphs) the caches are
    zeroed with rows for the batch's bucket and the decoder runs in static shapes; ``self._sentence`` (a sentence's
    whole loop, on static buffers) is what :class:`BatchGraphs` captures."""

    model: OneTowerLCM | QuantLCM
    cache: list[KVCache]
    noise: NoiseSource

    def _decoder(self, capacity: int, fast: bool, static_batch: Optional[int], weights: Optional[str],
                 inductor: bool) -> None:
        self.linear = skinny_linear if fast else None  # the context's encoding too: the kernel where it beats BLAS
        self.graphs: Optional[BatchGraphs] = None
        if fast and static_batch is not None:
            self.cache = [KVCache(capacity, zeroed=True, batch_capacity=batch_bucket(static_batch)) for _ in self.cache]
            self.graphs = BatchGraphs(self._sentence)  # type: ignore[attr-defined]
        self.decoder = (FastDecoder(self.model, self.cache, static_shapes=static_batch is not None, weights=weights,
                                    inductor=inductor) if fast else None)

    def restart(self, noise: NoiseSource, temperature: float) -> None:
        """Static shapes: ready for another generation call on the same caches and graphs (emptied, not freed)."""
        self.noise = noise
        for cache in self.cache:
            cache.reset()
        self.decoder.length.zero_()

    def prefill(self, prefix: Tensor) -> None:  # prefix: [B, Pmin, D] raw
        self._extend_context(prefix, prefix.shape[1])

    def _extend_context(self, seqs: Tensor, step: int) -> None:
        """Adds positions [cached, step) of seqs ([B, >= step, D] raw) to the context cache."""
        done = self.cache[0].length
        if step > done:
            self.model.encode(_normalize(self.model, seqs[:, done:step]), cache=self.cache, linear=self.linear)
        if self.decoder is not None:
            self.decoder.length.fill_(self.cache[0].length)  # the token's position (static shapes)

    def reorder(self, index: Tensor) -> None:
        for c in self.cache:
            c.reorder(index)


class _BaseLCMStepper:
    """Base-LCM next-sentence prediction with an optional KV cache (official ``LCMGenerator``).

    The fast engine (``fast``): the prefill as the reference, then each step's new position through
    :class:`FastDecoder` (every layer in one op call, on the same cache). With ``static_batch`` (cuda_graphs: the
    call's batch) the decoder runs in static shapes on zeroed caches with rows for that batch's bucket, the active
    rows padded to their :func:`batch_bucket` (finished rows leave the caches in place): a bucket's first step
    eagerly, the next ones as a replay of its CUDA graph (:class:`BatchGraphs`; on CPU the same calls without a
    graph). The latent noise and the (de)normalization stay outside the graph."""

    def __init__(self, model: BaseLCM, options: GenerationOptions, temperature: float, use_cache: bool,
                 capacity: int, noise: NoiseSource, fast: bool = False, static_batch: Optional[int] = None,
                 weights: Optional[str] = None, inductor: bool = False) -> None:
        self.model, self.options, self.temperature, self.noise = model, options, temperature, noise
        self.cache = model.new_cache(capacity) if use_cache else None
        # the modules' GEMM (None: their own); the fast engine's prefill too takes the kernel where it beats BLAS
        self.linear: Optional[LinearFn] = skinny_linear if fast else None
        self.decoder: Optional[FastDecoder] = None
        self.graphs: Optional[BatchGraphs] = None
        if fast:
            if static_batch is not None:
                self.cache = [KVCache(capacity, zeroed=True, batch_capacity=batch_bucket(static_batch))
                              for _ in self.cache]
                self.graphs = BatchGraphs(lambda x, out: out.copy_(self.decoder(x)))
            self.decoder = FastDecoder(model, self.cache, static_shapes=static_batch is not None, weights=weights,
                                       inductor=inductor)

    def restart(self, noise: NoiseSource, temperature: float) -> None:
        """Static shapes: ready for another generation call on the same caches and graphs (emptied, not freed)."""
        self.noise, self.temperature = noise, temperature
        for cache in self.cache:
            cache.reset()
        self.decoder.length.zero_()

    def _randn(self, shape: tuple[int, ...]) -> Tensor:
        return self.noise.randn(shape, site="latent_sample", device=model_device(self.model))

    def _predict(self, seqs: Tensor, forward: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
        return self.model.predict_next_sentence(
            seqs, cache=self.cache, sample=self.options.sample_latent_variable,
            temperature=self.temperature, randn=self._randn, linear=self.linear, forward=forward,
        )

    def prefill(self, prefix: Tensor) -> None:  # prefix: [B, Pmin, D] raw
        if self.cache is not None and prefix.shape[1] > 1:
            # The official prefill is a full predict_next_sentence: its output is discarded but its
            # sampling noise is drawn, so we draw it too to stay on the same random stream. The last
            # prompt position is the first step's input.
            self._predict(prefix[:, :-1])
        if self.decoder is not None:
            self.decoder.length.fill_(self.cache[0].length)  # the positions the module path cached

    def step(self, seqs: Tensor, step: int, forced: Tensor, callback: Optional[StepCallback]) -> Tensor:
        """Next sentence of every active row: [B, D] (teacher-forced rows are computed and replaced)."""
        if self.decoder is None:
            inputs = seqs[:, step - 1 : step] if self.cache is not None else seqs[:, :step]
            return self._predict(inputs)[:, -1]
        check_positions(self.cache[0].length, 1, self.model.config.max_seq_len)
        out = self._predict(seqs[:, step - 1 : step], self._decode)[:, -1]
        self.decoder.advance()
        return out

    def _decode(self, x: Tensor) -> Tensor:  # x: [n, 1, sonar_dim] normalized -> [n, 1, out_dim]
        if self.graphs is None:
            return self.decoder(x)
        n, size = x.shape[0], batch_bucket(x.shape[0])
        out = x.new_empty(size, 1, self.model.postnet.fc.weight.shape[0])
        return self.graphs(pad_batch(x, size), out)[1][:n]

    def reorder(self, index: Tensor) -> None:
        for c in self.cache or []:
            c.reorder(index)


class _TwoTowerStepper:
    """Two-Tower: incremental contextualizer + a full DDIM chain per sentence, with or without CFG. Each DDIM step
    is one fused ``guided_ddim_step_`` (CFG combine, rescale, update, clips); dynamic thresholding, which needs a
    per-row quantile, runs the scheduler's step instead.

    The reference engine computes the chain as the official
    ``TwoTowerDiffusionLCModel.predict_next_sentence[_with_cf_guidance]`` does (every row, both CFG halves at
    every step). The fast engine (``fast``) gets the same through :class:`FastDenoiser` (timestep tables, cached
    cross-attention K/V, constant unconditional cross-attention, no unconditional pass at the first CFG step),
    without diffusion for teacher-forced rows.

    With ``static_batch`` (fast engine, cuda_graphs: the call's batch) a sentence's whole DDIM loop runs on static
    buffers (caches with rows for that batch's bucket, noise drawn up front, in the official order; the denoiser
    in static shapes), the active rows padded to their :func:`batch_bucket`: a bucket's first sentence eagerly, the
    next ones as a replay of its CUDA graph (:class:`BatchGraphs`; on CPU the same loop runs without a graph).
    Finished rows leave the caches in place, so the graphs stay valid. Sentences with teacher-forced rows, a step
    callback or dynamic thresholding take the per-step loop."""

    def __init__(self, model: TwoTowerLCM, options: GenerationOptions, use_cache: bool, capacity: int,
                 noise: NoiseSource, fast: bool = False, static_batch: Optional[int] = None,
                 weights: Optional[str] = None, inductor: bool = False) -> None:
        self.model, self.options, self.noise, self.capacity = model, options, noise, capacity
        self.cache = model.new_cache(capacity) if use_cache else None
        overrides = {}
        if options.thresholding:
            overrides = dict(thresholding=True, dynamic_thresholding_ratio=options.dynamic_thresholding_ratio,
                             sample_max_value=options.sample_max_value)
        self.scheduler = model.noise_scheduler.with_options(**overrides)
        device, self.dtype = model_device(model), next(model.parameters()).dtype
        self.ddim = GuidedDDIM(self.scheduler, options.inference_timesteps, guidance_scale=options.guidance_scale,
                               guidance_rescale=options.guidance_rescale, eta=options.ddim_eta,
                               epsilon_scaling=options.epsilon_scaling, clip_noise=options.clip_noise,
                               official_stride=options.official_timestep_stride, device=device, dim=model.sonar_dim)
        self.timesteps, self.cfg = self.ddim.timesteps, self.ddim.cfg
        self.context: Optional[Tensor] = None  # [B, C, model_dim]
        # the contextualizer's GEMM (None: the modules' own); the fast engine's: the kernel wherever it beats BLAS
        self.linear: Optional[LinearFn] = skinny_linear if fast else None
        self.fast: Optional[FastDenoiser] = None
        self.graphs: Optional[BatchGraphs] = None
        if fast:
            if static_batch is not None:  # the contextualizer's caches too keep their storage, for the next call
                self.cache = [KVCache(capacity, batch_capacity=batch_bucket(static_batch)) for _ in self.cache]
                self.graphs = BatchGraphs(self._sentence)
            self.fast = FastDenoiser(model, self.timesteps, capacity, static_shapes=static_batch is not None,
                                     weights=weights, inductor=inductor)

    def restart(self, noise: NoiseSource, temperature: float) -> None:
        """Static shapes: ready for another generation call on the same caches and graphs (emptied, not freed).
        temperature: unused (the signature of every stepper a call may reuse)."""
        self.noise, self.context = noise, None
        for cache in self.cache:
            cache.reset()
        self.fast.reset()

    def prefill(self, prefix: Tensor) -> None:  # prefix: [B, Pmin, D] raw
        if self.cache is not None:
            self.context = prefix.new_zeros(prefix.shape[0], 0, self.model.config.model_dim)
            self._extend_context(prefix, prefix.shape[1])

    def _extend_context(self, seqs: Tensor, step: int) -> None:
        """Contextualize positions [0, step) of seqs: [B, >= step, D] raw; the cache encodes only those it lacks."""
        m = self.model
        if self.cache is None:  # re-encode the whole prefix (same result; the official code crashes here)
            self.context = m.encode(m.normalizer.normalize(seqs[:, :step]))
        elif step > self.context.shape[1]:
            new = m.encode(m.normalizer.normalize(seqs[:, self.context.shape[1] : step]), cache=self.cache,
                           linear=self.linear)
            self.context = torch.cat((self.context, new), dim=1)
            if self.fast is not None:
                self.fast.append(new)

    def _rows(self, forced: Tensor) -> Optional[Tensor]:
        """Batch rows to denoise (None: all). The reference denoises teacher-forced rows too."""
        return None if self.fast is None or not forced.any() else (~forced).nonzero().flatten()

    def _denoise(self, latents: Tensor, i: int, t: int, rows: Optional[Tensor]) -> Tensor:
        """Model output for latents [n, 1, D] (model dtype): [2n, 1, D] with CFG (conditional rows,
        then unconditional: zero context, only the zero key visible), else [n, 1, D]; the fast engine omits the
        unconditional rows where the step does not use them (the first CFG step)."""
        n = latents.shape[0]
        if self.fast is not None:
            return self.fast(torch.cat((latents, latents)) if self.ddim.unconditional(t) else latents, i, n, rows)
        context = self.context
        x, context_lens = latents, None
        if self.cfg:
            x = torch.cat((latents, latents))
            context = torch.cat((context, torch.zeros_like(context)), dim=0)
            context_lens = torch.tensor([context.shape[1]] * n + [0] * n, device=latents.device)
        timesteps = torch.full((x.shape[0], 1), t, dtype=torch.long, device=latents.device)
        return self.model.denoiser(x, timesteps, context, context_lens, inference=True)

    def _scheduler_step(self, pred: Tensor, t: int, latents: Tensor, noise: Optional[Tensor]) -> SchedulerOutput:
        """The official chain through DDIMScheduler (used with dynamic thresholding)."""
        opt, sched, B = self.options, self.scheduler, latents.shape[0]
        kwargs: dict[str, Any] = dict(eta=opt.ddim_eta, epsilon_scaling=opt.epsilon_scaling, variance_noise=noise)
        if not self.ddim.unconditional(t):  # no CFG, or its first step: the conditional prediction, unguided
            return sched.step(pred[:B], t, latents, **kwargs)
        eps = sched.get_epsilon(pred, torch.cat((latents, latents)), t)
        guided = classifier_free_guidance(eps[:B], eps[B:], opt.guidance_scale, opt.guidance_rescale)
        return sched.step(guided, t, latents, prediction_type="epsilon", **kwargs)

    def _initial_latents(self, B: int, device: torch.device) -> Tensor:
        """The noise a sentence starts from, [B, 1, sonar_dim] fp32 (the first draw of its step)."""
        opt = self.options
        latents = self.noise.randn((B, 1, self.model.sonar_dim), site="initial_latents", device=device)
        return (latents * opt.initial_noise_scale).clip(-opt.clip_noise, opt.clip_noise)

    def _ddim_step(self, latents: Tensor, x0: Tensor, i: int, t: int, rows: Optional[Tensor],
                   noise: Optional[Tensor]) -> None:
        """DDIM step i (timestep t) through the fused sampler, in place: latents, x0 [n, 1, D] fp32;
        rows: the batch rows they are (None: all); noise: [n, 1, D] (the eta term) or None."""
        n, D = latents.shape[0], latents.shape[-1]
        pred = self._denoise(latents.to(self.dtype), i, t, rows).float()
        self.ddim.step(i, latents.view(n, D), x0.view(n, D), pred.reshape(-1, D),
                       noise.view(n, D) if noise is not None else None)

    def step(self, seqs: Tensor, step: int, forced: Tensor, callback: Optional[StepCallback]) -> Tensor:
        """Next sentence of every active row: [B, D]. forced: [B] rows whose prompt covers ``step``
        (their output is replaced by the prompt; the noise is still drawn for them, as officially)."""
        if self.graphs is not None and callback is None and not self.scheduler.config.thresholding and not forced.any():
            return self._static_step(seqs, step)
        m, opt, sched = self.model, self.options, self.scheduler
        self._extend_context(seqs, step)
        B, D, device, dtype = seqs.shape[0], m.sonar_dim, seqs.device, self.dtype
        rows = self._rows(forced)
        pick = (lambda t: t) if rows is None else (lambda t: t.index_select(0, rows))
        latents = pick(self._initial_latents(B, device))  # [n, 1, D] fp32
        n = latents.shape[0]
        x0 = torch.zeros_like(latents)
        for i, t in enumerate(self.timesteps):
            noise = self.noise.randn((B, 1, D), site="ddim_variance", device=device) if opt.ddim_eta > 0 else None
            if n == 0:  # every row teacher-forced: nothing to denoise, but the noise stream advances
                continue
            noise = pick(noise) if noise is not None else None
            if sched.config.thresholding:
                pred = self._denoise(latents.to(dtype), i, t, rows).float()
                out = self._scheduler_step(pred, t, latents, noise)
                latents, x0 = out.prev_sample.clip(-opt.clip_noise, opt.clip_noise), out.pred_original_sample
            else:
                self._ddim_step(latents, x0, i, t, rows, noise)
            if callback is not None:
                which = torch.arange(B, device=device) if rows is None else rows
                callback(step, t, SchedulerOutput(latents.clone(), x0.clone()), which)
        # The sentence is the last step's x0 prediction (not the final latents), back in SONAR space.
        out = m.normalizer.denormalize(x0.to(dtype))[:, -1]
        if rows is None:
            return out
        return torch.zeros(B, D, device=device, dtype=dtype).index_copy_(0, rows, out)

    def _static_step(self, seqs: Tensor, step: int) -> Tensor:
        """The sentence's DDIM loop on static buffers, a replay of its CUDA graph (see the class docstring)."""
        opt, n, D, device = self.options, seqs.shape[0], self.model.sonar_dim, seqs.device
        self._extend_context(seqs, step)
        latents = self._initial_latents(n, device)
        noise = (torch.stack([self.noise.randn((n, 1, D), site="ddim_variance", device=device) for _ in self.timesteps])
                 if opt.ddim_eta > 0 else None)  # [steps, n, 1, D]
        size = batch_bucket(n)  # rows [n, size) are padding
        latents = pad_batch(latents, size)
        noise = pad_batch(noise, size, dim=1) if noise is not None else None
        _, x0, _ = self.graphs(latents, torch.zeros_like(latents), noise)
        return self.model.normalizer.denormalize(x0[:n].to(self.dtype))[:, -1]

    def _sentence(self, latents: Tensor, x0: Tensor, noise: Optional[Tensor]) -> None:
        """Every DDIM step of one sentence, in place: latents, x0 [B, 1, D] fp32; noise [steps, B, 1, D] or None."""
        B, D = latents.shape[0], latents.shape[-1]

        def denoise(i: int, t: int, unconditional: bool) -> Tensor:
            return self._denoise(latents.to(self.dtype), i, t, None).float().reshape(-1, D)

        self.ddim.run(latents.view(B, D), x0.view(B, D), denoise, noise.flatten(1, 2) if noise is not None else None)

    def predict_x0(self, latents: Tensor, t: int) -> Tensor:
        """Beam scoring: the model's conditional x0 prediction for noisy latents [R, D] (normalized, fp32) at training
        timestep t, each row on its context (positions before the sentence): [R, D] fp32. The modules, no guidance."""
        out = self._conditional(latents[:, None].to(self.dtype), t)[:, 0].float()
        return self.model.noise_scheduler.split(out, latents, t)[0]

    def _conditional(self, x: Tensor, t: int) -> Tensor:  # x: [R, 1, D] model dtype -> [R, 1, D]
        timesteps = torch.full(x.shape[:2], t, dtype=torch.long, device=x.device)
        return self.model.denoiser(x, timesteps, self.context, inference=True)

    def reorder(self, index: Tensor) -> None:
        for c in self.cache or []:
            c.reorder(index)
        if self.context is not None:
            self.context = self.context.index_select(0, index)
        if self.fast is not None:
            self.fast.reorder(index)  # in place in static shapes: the graphs stay valid


class _OneTowerStepper(_ContextCache, _TwoTowerStepper):
    """One-Tower: the clean sentences so far are a KV cache; every DDIM step runs only the noisy token
    of the next sentence, attending to the cache (conditional) or to itself (unconditional). The
    same sampling options and DDIM chain as Two-Tower; teacher-forced rows are not denoised. The fast engine
    runs each step's tokens (and their CFG twins) through :class:`FastDecoder` (every layer in one op call, on
    the context cache, no cache copies for row subsets). With ``static_batch`` (cuda_graphs) a sentence's DDIM loop
    runs as Two-Tower's: on zeroed caches with rows for the batch's bucket, the decoder in static shapes, one graph
    replay per sentence; the context is encoded outside the graph."""

    def __init__(self, model: OneTowerLCM, options: GenerationOptions, capacity: int, noise: NoiseSource,
                 fast: bool, static_batch: Optional[int] = None, weights: Optional[str] = None,
                 inductor: bool = False) -> None:
        super().__init__(model, options, True, capacity, noise)  # type: ignore[arg-type]
        self._decoder(capacity, fast, static_batch, weights, inductor)

    def _rows(self, forced: Tensor) -> Optional[Tensor]:
        return None if not forced.any() else (~forced).nonzero().flatten()

    def _conditional(self, x: Tensor, t: int) -> Tensor:
        return self.model.denoise_step(x, t, self.cache)

    def _denoise(self, latents: Tensor, i: int, t: int, rows: Optional[Tensor]) -> Tensor:
        if self.decoder is not None:
            return self.decoder.denoise(latents, t, rows, self.ddim.unconditional(t))
        cache = self.cache if rows is None else [c.select(rows) for c in self.cache]
        cond = self.model.denoise_step(latents, t, cache)
        if not self.ddim.unconditional(t):
            return cond
        return torch.cat((cond, self.model.denoise_step(latents, t, cache, conditional=False)))


class _QuantStepper(_ContextCache):
    """Quant-LCM: the One-Tower context cache, then for the next sentence M passes of one token each,
    k = 1..M: the model sees the intermediate representation of the codebooks chosen so far and the
    index k; its (CFG-guided) output scores the units of codebook k, one is picked (greedy or
    sampled) and its centroid added. The sentence is the final sum of M centroids. The fast engine runs each
    pass's tokens (and their CFG twins) through :class:`FastDecoder` (every layer in one op call, on the context
    cache, no cache copies for row subsets). With ``static_batch`` (cuda_graphs) a sentence's M passes run as
    One-Tower's DDIM loop: on zeroed caches with rows for the batch's bucket, the unit draws made up front, one
    graph replay per sentence; sentences with teacher-forced rows take the per-pass loop."""

    def __init__(self, model: QuantLCM, options: GenerationOptions, capacity: int, noise: NoiseSource,
                 fast: bool, static_batch: Optional[int] = None, weights: Optional[str] = None,
                 inductor: bool = False) -> None:
        self.model, self.options, self.noise = model, options, noise
        self.dtype = next(model.parameters()).dtype
        self.cache = model.new_cache(capacity)
        self.cfg = options.guidance_scale != 1.0
        self.sampling = options.top_k != 1 and options.lcm_temperature != 0
        self._decoder(capacity, fast, static_batch, weights, inductor)

    def _guided(self, x: Tensor, k: int, rows: Optional[Tensor], context: list[KVCache]) -> Tensor:
        """The (CFG-guided) model output for x [n, 1, sonar_dim] (normalized intermediate representations) at
        codebook index k, on the cached context of batch rows ``rows`` ([n], None: all): the fast engine reads them
        in place, the reference the caches ``context`` -> [n, 1, out_dim]."""
        m = self.model
        if self.decoder is not None:
            out = self.decoder.denoise(x, k, rows, self.cfg)
            cond, uncond = out.chunk(2) if self.cfg else (out, None)
        else:
            cond = m.denoise_step(x, k, context)
            uncond = m.denoise_step(x, k, context, conditional=False) if self.cfg else None
        return cond if uncond is None else uncond + self.options.guidance_scale * (cond - uncond)

    def _pass(self, inter: Tensor, k: int, normals: Optional[Tensor], rows: Optional[Tensor] = None,
              context: Optional[list[KVCache]] = None) -> None:
        """Codebook pass k, in place: inter [n, sonar_dim] (raw, the codebooks' dtype) gains the picked centroid;
        normals: [n, K] the unit draw's standard normals (None: greedy); rows, context: see :meth:`_guided`."""
        m, opt = self.model, self.options
        out = self._guided(_normalize(m, inter.to(self.dtype))[:, None], k, rows, context or self.cache)
        units = sample_units(m.unit_scores(out[:, 0], inter, k), opt.lcm_temperature, opt.top_k, opt.top_p, normals)
        inter += m.rvq_codebooks[k][units]

    def _sentence(self, inter: Tensor, normals: Optional[Tensor]) -> None:
        """Every codebook pass of one sentence, in place: inter [B, sonar_dim] zeros; normals [M, B, K] or None."""
        for k in range(self.model.config.n_codebooks):
            self._pass(inter, k, normals[k] if normals is not None else None)

    def _normals(self, B: int, device: torch.device) -> Tensor:
        return self.noise.randn((B, self.model.config.codebook_size), site="unit_sample", device=device)

    def step(self, seqs: Tensor, step: int, forced: Tensor, callback: Optional[StepCallback]) -> Tensor:
        m = self.model
        self._extend_context(seqs, step)
        B, D, device, dtype = seqs.shape[0], m.sonar_dim, seqs.device, seqs.dtype
        if self.graphs is not None and not forced.any():  # the sentence's passes on static buffers (see the class)
            normals = (torch.stack([self._normals(B, device) for _ in range(m.config.n_codebooks)])
                       if self.sampling else None)  # [M, B, K], in the per-pass loop's order
            size = batch_bucket(B)  # rows [B, size) are padding
            inter = torch.zeros(size, D, device=device, dtype=m.rvq_codebooks.dtype)
            inter, _ = self.graphs(inter, pad_batch(normals, size, dim=1) if normals is not None else None)
            return inter[:B].to(dtype, copy=True)  # the buffer is the graph's: the next sentence overwrites it
        rows = None if not forced.any() else (~forced).nonzero().flatten()
        # the reference reads the rows' caches, selected once per sentence
        context = None if self.decoder is not None or rows is None else [c.select(rows) for c in self.cache]
        n = B if rows is None else rows.numel()
        inter = torch.zeros(n, D, device=device, dtype=m.rvq_codebooks.dtype)
        for k in range(m.config.n_codebooks):
            normals = self._normals(B, device) if self.sampling else None
            if n > 0:
                self._pass(inter, k, normals if normals is None or rows is None else normals.index_select(0, rows),
                           rows, context)
        out = inter.to(dtype)
        if rows is None:
            return out
        return torch.zeros(B, D, device=device, dtype=dtype).index_copy_(0, rows, out)


class Generator:
    """Generates continuations of batches of right-padded concept sequences.

    Args:
        model: a :class:`BaseLCM`, :class:`TwoTowerLCM`, :class:`OneTowerLCM` or :class:`QuantLCM` (put in
            eval mode).
        options: :class:`GenerationOptions` (official defaults when None).
        eos_vec: [sonar_dim] end-of-text embedding for ``eos_threshold`` stopping.
        break_vec: [sonar_dim] an LPCM's break concept (its data's ``lpcm.pt``): the output labels every concept's role
            (``GenerationOutput.roles``, ``break_threshold``).
        engine: ``"fast"`` (default) or ``"reference"`` (see the module docstring).
        cuda_graphs: fast engine, every family: run each sentence's DDIM loop (Two-Tower, One-Tower), decoder pass
            (Base-LCM) or codebook passes (Quant-LCM) on static buffers and replay it
            as a CUDA graph from the second sentence of a batch size on (same outputs, one replay per sentence
            instead of ~1k launches). The active batch
            runs padded to the next power of two, so finishing documents cost at most log2(batch) + 1 captures
            (:func:`~lcm_fast.inference.graphs.batch_bucket`). The generator keeps the last call's buffers and
            graphs (the caches at the batch's bucket and the length rounded up to 64 positions) for the next call
            that fits them, whose sentences then all replay; ``del`` the generator to free them. Off by default
            until it has been measured on a GPU (the tests/ops/test_cuda.py checks). On CPU it runs the static
            path without graphs (slower than the CPU kernel; what the CPU tests exercise).
        weights: the format of the decode step's projection weights: None (the model's own), ``"int8"`` or ``"fp8"``
            (weight-only int8 or e4m3 with per-output-channel scales, made once per model and kept: a quarter of
            fp32's bytes per step, half of bf16's; activations stay in the model dtype). The fast engine only; the
            prompt's prefill and the Two-Tower contextualizer keep the model's weights. Which to use, and quality:
            README ("Weight formats"), bench/RESULTS.md.
        inductor: with ``cuda_graphs``, the static step's layers in plain PyTorch compiled by Inductor
            (``torch.compile(fullgraph=True)``: fused norm/modulation prologues and residual epilogues, its own GEMMs)
            before they are captured, instead of the composed fused ops; the same outputs within rounding. The other
            route to few launches per step on a GPU, for a measured choice (``bench_generate.py -k gpu``); the first
            call of each batch bucket compiles (seconds to a minute), later generators reuse the code.
    """

    def __init__(self, model: BaseLCM | TwoTowerLCM | OneTowerLCM | QuantLCM,
                 options: Optional[GenerationOptions] = None, eos_vec: Optional[Tensor] = None,
                 engine: str = "fast", cuda_graphs: bool = False, weights: Optional[str] = None,
                 break_vec: Optional[Tensor] = None, inductor: bool = False) -> None:
        if not isinstance(model, (BaseLCM, TwoTowerLCM, OneTowerLCM, QuantLCM)):
            raise TypeError(f"expected a BaseLCM, TwoTowerLCM, OneTowerLCM or QuantLCM, got {type(model).__name__}")
        if engine not in ENGINES:
            raise ValueError(f"unknown engine '{engine}'; expected one of {ENGINES}")
        decodable = _fast_decodes(model, engine)
        if cuda_graphs and not decodable:
            raise ValueError(f"cuda_graphs needs the fast engine and a model its decode step runs (not post-norm layers "
                             f"or scale_residual), got engine '{engine}' and a {type(model).__name__}")
        if inductor and not cuda_graphs:
            raise ValueError("inductor=True compiles the static (graph-captured) step: it needs cuda_graphs=True")
        if isinstance(model, QuantLCM):
            model.require_codebooks()
        check_weights(weights)
        if weights is not None and not decodable:
            raise ValueError(f"weights={weights!r} is a format of the fast engine's decode step: it needs engine 'fast' "
                             f"and a model it runs (not post-norm layers or scale_residual), got engine '{engine}'")
        self.weights = weights
        if cuda_graphs and model_device(model).type != "cuda":
            warnings.warn("cuda_graphs=True on a model that is not on a GPU: the static-shape path runs without graphs, "
                          "slower than the default fast engine (what the CPU tests exercise)", stacklevel=2)
        self.engine = engine
        self.model = model.eval()
        self.cuda_graphs, self.inductor = cuda_graphs, inductor
        self._static: Optional[tuple[tuple, Any]] = None  # (key, stepper): see _static_stepper
        self.options = options or GenerationOptions()
        self.options.validate()  # also on an options object changed in place since it was made
        for name, vec in (("eos_vec", eos_vec), ("break_vec", break_vec)):
            if vec is not None and vec.shape != (model.sonar_dim,):
                raise ValueError(f"{name} must have shape [{model.sonar_dim}], got {list(vec.shape)}")
        self.eos_vec, self.break_vec = eos_vec, break_vec

    @torch.inference_mode()
    def __call__(
        self,
        prompts: Tensor,
        seq_lens: Optional[Tensor] = None,
        *,
        max_gen_len: Optional[int] = None,
        min_gen_len: Optional[int] = None,
        temperature: float = 0.0,
        disable_cache: bool = False,
        noise: Optional[NoiseSource] = None,
        step_callback: Optional[StepCallback] = None,
        progress: Optional[bool] = None,
    ) -> GenerationOutput:
        """prompts: [B, P, sonar_dim] raw SONAR embeddings, right-padded; seq_lens: [B] valid prompt
        lengths (None: all P). Generates up to ``max_gen_len`` (default ``options.max_seq_len``)
        sentences per document.

        temperature: Base-LCM sampling temperature; 0 means ``options.lcm_temperature``.
        noise: overrides the noise source (default ``TorchNoise(options.seed)``), e.g. to replay, or
            ``DocumentNoise(seed, ids)`` for each document's own noise (outputs that do not depend on the batch).
        disable_cache: recompute every prefix instead of caching (the reference engine; the fast engine
            always caches).
        step_callback: Two-Tower only, called as ``(position, t, SchedulerOutput, rows)`` after every
            DDIM step, with the new latents (after the ``clip_noise`` clamp) and the x0 prediction,
            [n, 1, D], of the active-batch ``rows`` [n] that were denoised (the fast engine skips
            teacher-forced rows).
        progress: show a progress bar (sentences generated, documents finished); None: only on a
            terminal and for at least 64 sentences.
        """
        opt, model = self.options, self.model
        opt.validate()
        seq_lens = validate_prompts(prompts, seq_lens, model.sonar_dim)
        max_gen_len = opt.max_seq_len if max_gen_len is None else max_gen_len
        min_gen_len = opt.min_seq_len if min_gen_len is None else min_gen_len
        for name, value in (("max_gen_len", max_gen_len), ("min_gen_len", min_gen_len)):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1 (None: the options' default), got {value!r}")
        max_gen_len, min_gen_len = int(max_gen_len), int(min_gen_len)
        if max_gen_len > opt.max_seq_len:
            raise ValueError(f"max_gen_len={max_gen_len} exceeds options.max_seq_len={opt.max_seq_len}")
        noise = noise if noise is not None else TorchNoise(opt.seed)
        temperature = temperature or opt.lcm_temperature

        device, dtype = model_device(model), next(model.parameters()).dtype
        B, P_max, D = prompts.shape
        width = opt.num_candidates * opt.beam_size  # rows per document (1: no beam search)
        scorer = resolve_scorer(opt.beam_scorer) if width > 1 else None
        if scorer is not None and hasattr(scorer, "check"):
            scorer.check(model, self.break_vec)
        beams = BeamSearch(opt.num_candidates, opt.beam_size, B, device) if width > 1 else None
        P_min = int(seq_lens.min())
        total = P_max + max_gen_len
        seqs = torch.zeros(B, total, D, device=device, dtype=dtype)
        seqs[:, :P_max] = prompts.to(device=device, dtype=dtype)
        prompt_lens = seq_lens.to(device)
        rows = torch.arange(B, device=device)  # input document of each active row
        if width > 1:  # every document's rows: its beams' candidates, consecutive
            seqs, prompt_lens, rows = (t.repeat_interleave(width, 0) for t in (seqs, prompt_lens, rows))
            noise.expand(width)
        in_prompt = torch.arange(P_max, device=device)[None, :] < prompt_lens[:, None]  # [R, P_max]
        results: list[Optional[Tensor]] = [None] * B

        # the fast engine always caches; Two-Tower's runs any layer, the others' FastDecoder not every layer style
        fast = _fast_decodes(model, self.engine)
        if self.weights is not None and disable_cache and not isinstance(model, (OneTowerLCM, QuantLCM)):
            raise ValueError(f"weights={self.weights!r} needs the fast engine's cached decode step: drop disable_cache")
        R = B * width
        if self.cuda_graphs and (not disable_cache or isinstance(model, (OneTowerLCM, QuantLCM))):  # always cached
            stepper = self._static_stepper(R, total, noise, temperature)
        elif isinstance(model, (OneTowerLCM, QuantLCM)):  # always cached: the context cache is the model's state
            stepper = (_QuantStepper if isinstance(model, QuantLCM) else _OneTowerStepper)(
                model, opt, total, noise, fast, weights=self.weights)
        elif isinstance(model, TwoTowerLCM):
            stepper = _TwoTowerStepper(model, opt, not disable_cache, total, noise, fast=fast and not disable_cache,
                                       weights=self.weights)
        else:
            stepper = _BaseLCMStepper(model, opt, temperature, not disable_cache, total, noise,
                                      fast=fast and not disable_cache, weights=self.weights)
        noise.at(-1)
        stepper.prefill(seqs[:, :P_min])  # every document's prompt covers these: contextualized in one pass

        eos = self.eos_vec.to(device=device, dtype=dtype) if self.eos_vec is not None else None
        if progress is None:
            progress = sys.stderr.isatty() and B * max_gen_len >= 64
        bar = tqdm(total=B * max_gen_len, disable=not progress, desc="generating", unit="sentence")
        for step in range(P_min, total):
            teacher_forced = in_prompt[:, step] if step < P_max else torch.zeros_like(rows, dtype=torch.bool)
            noise.at(step)
            out = stepper.step(seqs, step, teacher_forced, step_callback)  # [R_active, D]
            out[teacher_forced] = seqs[teacher_forced, step]
            stop = torch.zeros_like(teacher_forced)
            if opt.eos_threshold is not None and eos is not None:
                stop |= F.cosine_similarity(eos, out) >= opt.eos_threshold
            if opt.stop_on_repetition_cosine_threshold is not None:
                stop |= F.cosine_similarity(seqs[:, step - 1], out) >= opt.stop_on_repetition_cosine_threshold
            generated = step - prompt_lens + 1
            stop &= ~teacher_forced & (generated > min_gen_len)
            at_limit = generated >= max_gen_len
            seqs[:, step] = out
            bar.update(int((~teacher_forced).sum()) // width)
            trim = torch.full_like(stop, opt.trim_hypotheses and not opt.include_eos_token)
            if beams is None:
                finish = stop | at_limit
                for i in finish.nonzero().flatten().tolist():
                    results[int(rows[i])] = seqs[i, : step + 1 - int(bool(trim[i] & stop[i]))].clone()
                index = keep = (~finish).nonzero().flatten()
            else:
                scores = None
                if not teacher_forced.all():
                    scores = self._score(scorer, stepper, seqs, step, rows, noise)  # type: ignore[arg-type]
                index, keep, done = beams.advance(seqs, step, scores, stop, at_limit, teacher_forced, rows, generated,
                                                  trim)
                for doc in done:
                    hypotheses, _ = beams.best(doc)
                    results[doc] = hypotheses[0]
            bar.set_postfix(documents=f"{sum(r is not None for r in results)}/{B} done", refresh=False)
            if index.numel() == 0:
                break
            if _moves(index, len(rows)):  # the official code reorders every step; same result
                seqs, rows, prompt_lens, in_prompt = seqs[index], rows[index], prompt_lens[index], in_prompt[index]
                stepper.reorder(index)
            if _moves(keep, len(teacher_forced)):
                noise.reorder(keep)
        bar.close()
        roles = None
        if self.break_vec is not None:
            roles = [concept_roles(seq, self.break_vec, opt.break_threshold) for seq in results]  # type: ignore[arg-type]
        if beams is None:
            return GenerationOutput(results, roles)  # type: ignore[arg-type]  (every row finishes by max_gen_len)
        ranked = [beams.best(doc) for doc in range(B)]
        return GenerationOutput(results, roles, [h for h, _ in ranked], [s for _, s in ranked])  # type: ignore[arg-type]

    def _score(self, scorer: Scorer, stepper: Any, seqs: Tensor, step: int, documents: Tensor,
               noise: NoiseSource) -> Tensor:
        """Beam search: the scores [R] of the candidates at position ``step`` of seqs [R, >= step + 1, D]."""
        out = seqs[:, step]
        candidates = Candidates(
            concepts=out, context=seqs[:, :step], documents=documents, model=self.model,
            randn=lambda shape: noise.randn(shape, site="beam_score", device=out.device),
            denoise=getattr(stepper, "predict_x0", None), break_vec=self.break_vec,
            break_threshold=self.options.break_threshold)
        scores = scorer(candidates)
        if not isinstance(scores, Tensor) or scores.shape != (len(out),) or scores.isnan().any():
            raise ValueError(f"beam scorer {scorer!r} must return a [{len(out)}] tensor without NaN, got "
                             f"{scores.shape if isinstance(scores, Tensor) else type(scores).__name__}"
                             f"{' with NaN' if isinstance(scores, Tensor) and scores.isnan().any() else ''}")
        return scores

    def _static_stepper(self, batch: int, length: int, noise: NoiseSource,
                        temperature: float) -> Any:
        """cuda_graphs: the last call's stepper where this call fits it (the same batch bucket and length bucket,
        unchanged options and weights), restarted on its buffers so that its captured graphs replay from this
        call's first sentence; else a new one, after the old one's buffers are freed."""
        model, opt = self.model, self.options
        capacity = -(-length // STATIC_LENGTH_STEP) * STATIC_LENGTH_STEP
        # in-place updates bump _version (Quant-LCM's codebooks are a buffer)
        weights = tuple((p.data_ptr(), p._version) for p in (*model.parameters(), *model.buffers()))
        key = (batch_bucket(batch), capacity, repr(opt), weights, self.weights, self.inductor)
        if self._static is not None and self._static[0] == key:
            self._static[1].restart(noise, temperature)
            return self._static[1]
        self._static = None
        step = dict(fast=True, static_batch=batch, weights=self.weights, inductor=self.inductor)
        if isinstance(model, TwoTowerLCM):
            stepper = _TwoTowerStepper(model, opt, True, capacity, noise, **step)
        elif isinstance(model, (OneTowerLCM, QuantLCM)):
            stepper = (_QuantStepper if isinstance(model, QuantLCM) else _OneTowerStepper)(model, opt, capacity, noise,
                                                                                           **step)
        else:
            stepper = _BaseLCMStepper(model, opt, temperature, True, capacity, noise, **step)
        self._static = (key, stepper)
        return stepper


def generate(model: BaseLCM | TwoTowerLCM | OneTowerLCM | QuantLCM, prompts: Tensor, seq_lens: Optional[Tensor] = None, *,
             options: Optional[GenerationOptions] = None, eos_vec: Optional[Tensor] = None, engine: str = "fast",
             cuda_graphs: bool = False, weights: Optional[str] = None, break_vec: Optional[Tensor] = None,
             inductor: bool = False, **call_kwargs: Any) -> GenerationOutput:
    """One-shot helper: ``Generator(model, options, eos_vec, engine, cuda_graphs, weights, break_vec, inductor)(prompts,
    seq_lens, **call_kwargs)``."""
    return Generator(model, options, eos_vec, engine, cuda_graphs, weights, break_vec, inductor)(prompts, seq_lens,
                                                                                                 **call_kwargs)

