"""Every configurable variant of the official architectures: incremental (KV-cached) decoding equals
full recomputation, and the training-time masks equal inference on the matching prefix."""

from __future__ import annotations

import pytest
import torch

import lcm_fast

from .conftest import random_model, tiny_config

STACK_VARIANTS = {
    "learned+standard": dict(pos_embedding_style="learned", layer_normalization_style="standard"),
    "rope+rms+swiglu+bias": dict(pos_embedding_style="rope", layer_normalization_style="rms", use_swiglu=True,
                                 mha_output_proj_bias=True),
    "sine+fp32": dict(pos_embedding_style="sine", layer_normalization_style="fp32"),
    "none+unit+gelu": dict(pos_embedding_style="none", layer_normalization_style="unit", ffn_inner_activation_name="gelu"),
    "post": dict(norm_order_style="post"),
    "normformer+qknorm": dict(norm_order_style="normformer", enable_qk_layernorm=True),
    "scale_residual+final_post": dict(scale_residual=0.5, final_norm_order_style="post"),
}


@pytest.mark.parametrize("variant", sorted(STACK_VARIANTS))
def test_base_lcm_cache_equals_recompute(variant):
    cfg = tiny_config("base_lcm", lcm=STACK_VARIANTS[variant], frontend={"scale_embeddings": variant == "post"})
    model = random_model(cfg)
    prompts, lens = torch.randn(2, 4, 24), torch.tensor([4, 2])
    options = lcm_fast.GenerationOptions(sample_latent_variable=False)
    cached = lcm_fast.generate(model, prompts, lens, options=options, max_gen_len=3).padded()[0]
    full = lcm_fast.generate(model, prompts, lens, options=options, max_gen_len=3, disable_cache=True).padded()[0]
    # fp32 op-order noise, amplified by random weights and guidance: up to 1.7e-4 seen on an AMD EPYC (MKL's AVX2
    # kernels), under 1e-4 on the Intel machines
    torch.testing.assert_close(cached, full, atol=5e-4, rtol=5e-4)


DENOISER_VARIANTS = {
    "default": {},
    "rope+rms+swiglu": dict(pos_embedding_style="rope", layer_normalization_style="rms", use_swiglu=True,
                            mha_output_proj_bias=True),
    "learned+normformer+qknorm": dict(pos_embedding_style="learned", norm_order_style="normformer",
                                      enable_qk_layernorm=True),
    "projection activations": dict(pre_denoiser={"activation_name": "gelu"}, post_denoiser={"activation_name": "tanh"}),
}


@pytest.mark.parametrize("context", ["learned+standard", "rope+rms+swiglu+bias"])
@pytest.mark.parametrize("variant", sorted(DENOISER_VARIANTS))
@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_two_tower_cache_equals_recompute(context, variant, guidance):
    cfg = tiny_config("two_tower_diffusion_lcm", context_encoder=STACK_VARIANTS[context], denoiser=DENOISER_VARIANTS[variant])
    model = random_model(cfg)
    prompts, lens = torch.randn(2, 3, 24), torch.tensor([3, 1])
    options = lcm_fast.GenerationOptions(inference_timesteps=5, guidance_scale=guidance, guidance_rescale=0.5,
                                         ddim_eta=0.3, seed=11)
    cached = lcm_fast.generate(model, prompts, lens, options=options, max_gen_len=2).padded()[0]
    full = lcm_fast.generate(model, prompts, lens, options=options, max_gen_len=2, disable_cache=True).padded()[0]
    # fp32 op-order noise, amplified by random weights and guidance: up to 1.7e-4 seen on an AMD EPYC (MKL's AVX2
    # kernels), under 1e-4 on the Intel machines
    torch.testing.assert_close(cached, full, atol=5e-4, rtol=5e-4)


@pytest.mark.parametrize("variant", ["default", "projection activations"])
def test_training_mask_equals_inference_on_prefix(variant):
    """Training position i is denoised from the context rows < i: the same as an inference call on them
    (i = 0: the zero vector alone). Only for denoisers without positions, where the query position
    does not matter."""
    model = random_model(tiny_config("two_tower_diffusion_lcm", denoiser=DENOISER_VARIANTS[variant]))
    clean, noisy = torch.randn(2, 4, 24), torch.randn(2, 4, 24)
    t = torch.randint(0, 100, (2, 4))
    with torch.no_grad():
        full = model(clean, noisy, t)
        context = model.encode(clean)
        for i in range(4):
            single = model.denoiser(noisy[:, i : i + 1], t[:, i : i + 1], context[:, :i], inference=True)
            torch.testing.assert_close(full[:, i : i + 1], single, atol=1e-5, rtol=1e-5)
