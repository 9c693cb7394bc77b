"""Teacher-forced next-concept predictions for every position of documents at once.

Base-LCM: one forward pass. Diffusion models: one DDIM chain over all positions in parallel, where
position n is denoised from the clean context before it (the training-time attention masks), with the
same classifier-free guidance and fused step as generation. Quant-LCM: the M coarse-to-fine passes
over all positions in parallel, greedy units.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..diffusion import GuidedDDIM
from ..inference.options import GenerationOptions
from ..models import BaseLCM, OneTowerLCM, QuantLCM, TwoTowerLCM


@torch.no_grad()
def teacher_forced_predictions(
    model: BaseLCM | TwoTowerLCM | OneTowerLCM | QuantLCM,
    embeddings: Tensor,
    seq_lens: Tensor,
    *,
    steps: int = 40,
    guidance_scale: Optional[float] = None,
    guidance_rescale: float = 0.7,
    initial_noise_scale: float = 0.6,
    seed: int = 0,
) -> Tensor:
    """embeddings: [B, L, D] raw (SONAR space), right-padded; seq_lens: [B].

    Returns predictions [B, L, D] in SONAR space: ``out[:, n]`` predicts ``embeddings[:, n]`` from
    ``embeddings[:, :n]`` (n >= 1; Two-Tower also predicts n = 0 from the zero vector alone). The
    sampling defaults are the paper's; guidance_scale None: the paper's single-sentence one for the family
    (2 for Quant-LCM-D, else 3).
    """
    if guidance_scale is None:
        guidance_scale = GenerationOptions.paper(model, multi_sentence=False).guidance_scale
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x, seq_lens = embeddings.to(device), seq_lens.to(device)
    norm = model.normalizer
    xn = norm.normalize(x) if norm is not None else x
    if isinstance(model, QuantLCM):
        out = _parallel_quant(model, xn, seq_lens, guidance_scale)
        model.train(was_training)
        return out
    if isinstance(model, BaseLCM):
        pred = model(xn, seq_lens)
        out = torch.zeros_like(pred)
        out[:, 1:] = pred[:, :-1]
    else:
        if isinstance(model, TwoTowerLCM):
            context = model.encode(xn, seq_lens)

            def denoise(latents, t, drop):
                return model.denoiser(latents, t, context, seq_lens, inference=False, cfg_dropout_rows=drop)
        else:  # One-Tower: the training-time call already predicts every position from its prefix

            def denoise(latents, t, drop):
                return model(xn, latents, t, seq_lens, cfg_dropout_rows=drop)

        out = _parallel_ddim(model, denoise, xn.shape, steps, guidance_scale, guidance_rescale, initial_noise_scale, seed)
    model.train(was_training)
    return norm.denormalize(out) if norm is not None else out


def _parallel_ddim(model: TwoTowerLCM | OneTowerLCM, denoise, shape: torch.Size, steps: int, guidance_scale: float,
                   guidance_rescale: float, initial_noise_scale: float, seed: int) -> Tensor:
    """DDIM over all positions at once; denoise(latents [B, L, D], timesteps [B, L], uncond rows or None)."""
    B, L, D = shape
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    ddim = GuidedDDIM(model.noise_scheduler.with_options(), steps, guidance_scale=guidance_scale,
                      guidance_rescale=guidance_rescale, device=device, dim=D)
    generator = torch.Generator().manual_seed(seed)
    latents = (torch.randn(B * L, D, generator=generator) * initial_noise_scale).to(device)
    x0 = torch.empty_like(latents)
    everywhere = torch.ones(L, dtype=torch.bool, device=device)  # every position's unconditional twin

    def predict(i: int, t: int, unconditional: bool) -> Tensor:
        timesteps, inputs = torch.full((B, L), t, device=device), latents.view(B, L, D).to(dtype)
        out = denoise(inputs, timesteps, None).flatten(0, 1)
        if unconditional:
            out = torch.cat((out, denoise(inputs, timesteps, everywhere).flatten(0, 1)))
        return out.float()

    ddim.run(latents, x0, predict)
    return x0.view(B, L, D).to(dtype)


def _parallel_quant(model: QuantLCM, xn: Tensor, seq_lens: Tensor, guidance_scale: float) -> Tensor:
    """Greedy coarse-to-fine decoding of every position at once -> raw predictions [B, L, D]."""
    B, L, D = xn.shape
    norm = model.normalizer
    inter = torch.zeros(B * L, D, device=xn.device, dtype=model.rvq_codebooks.dtype)
    unconditional = torch.ones(L, dtype=torch.bool, device=xn.device)
    for k in range(model.config.n_codebooks):
        index = torch.full((B, L), k, device=xn.device)
        inputs = inter.view(B, L, D).to(xn.dtype)
        inputs = norm.normalize(inputs) if norm is not None else inputs
        out = model(xn, inputs, index, seq_lens)
        if guidance_scale != 1.0:
            uncond = model(xn, inputs, index, seq_lens, cfg_dropout_rows=unconditional)
            out = uncond + guidance_scale * (out - uncond)
        inter += model.rvq_codebooks[k][model.unit_scores(out.flatten(0, 1), inter, k).argmax(-1)]
    return inter.view(B, L, D).to(xn.dtype)
