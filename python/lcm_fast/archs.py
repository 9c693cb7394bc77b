"""Named architecture presets: the official registered archs (``lcm/models/*/archs.py``)."""

from __future__ import annotations

from typing import Any, Callable

from .config import (
    BaseLCMConfig,
    OneTowerConfig,
    DenoiserConfig,
    ModelConfig,
    QuantLCMConfig,
    SchedulerConfig,
    TransformerConfig,
    TwoTowerConfig,
)

# The released 1.6B/7B recipes: RMSNorm, SwiGLU, RoPE, output-projection bias, no final dropout.
_LARGE_STACK: dict[str, Any] = dict(
    dropout_p=0.1,
    final_dropout_p=0.0,
    attention_dropout_p=0.0,
    use_swiglu=True,
    pos_embedding_style="rope",
    layer_normalization_style="rms",
    mha_output_proj_bias=True,
)


def toy_base_lcm() -> BaseLCMConfig:
    return BaseLCMConfig(lcm=TransformerConfig(num_layers=2, num_attn_heads=8, ffn_inner_dim=4096))


def base_lcm_1_6B() -> BaseLCMConfig:
    return BaseLCMConfig(
        max_seq_len=4096,
        model_dim=2048,
        sonar_normalizer_name="dummy_sonar_normalizer",
        lcm=TransformerConfig(num_layers=32, num_attn_heads=16, ffn_inner_dim=8192, **_LARGE_STACK),
    )


# A first run's size (``lcm-fast train``'s default): model dim 256, 2 layers per stack. Measured on the 2-core dev
# VM: the README's own-data example (Two-Tower, 100 steps on 24 short documents) trains in 23 s.
_SMALL_STACK: dict[str, Any] = dict(num_layers=2, num_attn_heads=4, ffn_inner_dim=1024)


def small_base_lcm() -> BaseLCMConfig:
    return BaseLCMConfig(model_dim=256, sonar_normalizer_name="dummy_sonar_normalizer",
                         lcm=TransformerConfig(**_SMALL_STACK))


def small_two_tower() -> TwoTowerConfig:
    return TwoTowerConfig(model_dim=256, sonar_normalizer_name="dummy_sonar_normalizer",
                          context_encoder=TransformerConfig(**_SMALL_STACK),
                          denoiser=DenoiserConfig(**_SMALL_STACK, timestep_embed_dim=256),
                          noise_scheduler=SchedulerConfig(num_diffusion_train_steps=100))


def small_one_tower() -> OneTowerConfig:
    return OneTowerConfig(model_dim=256, lcm=TransformerConfig(**_SMALL_STACK))


def small_quant_lcm() -> QuantLCMConfig:
    return QuantLCMConfig(model_dim=256, n_codebooks=8, codebook_size=256, lcm=TransformerConfig(**_SMALL_STACK))


def toy_two_tower() -> TwoTowerConfig:
    return TwoTowerConfig(
        sonar_normalizer_name="dummy_sonar_normalizer",
        context_encoder=TransformerConfig(num_layers=2, num_attn_heads=8, ffn_inner_dim=4096),
        denoiser=DenoiserConfig(num_layers=2, num_attn_heads=8, ffn_inner_dim=4096, timestep_embed_dim=1024),
    )


def _two_tower_large(model_dim: int, heads: int, ffn: int, denoiser_layers: int) -> TwoTowerConfig:
    large = dict(_LARGE_STACK, num_attn_heads=heads, ffn_inner_dim=ffn)
    return TwoTowerConfig(
        sonar_normalizer_name="dummy_sonar_normalizer",
        max_seq_len=4096,
        model_dim=model_dim,
        context_encoder=TransformerConfig(num_layers=5, **large),
        denoiser=DenoiserConfig(
            num_layers=denoiser_layers, timestep_embed_dim=model_dim, **dict(large, pos_embedding_style="none")
        ),
        noise_scheduler=SchedulerConfig(num_diffusion_train_steps=100),
        trained_with_cf_guidance=True,
    )


def two_tower_1_6B() -> TwoTowerConfig:
    return _two_tower_large(2048, 16, 8192, 13)


def two_tower_7B() -> TwoTowerConfig:
    return _two_tower_large(4096, 32, 16384, 14)


def toy_one_tower() -> OneTowerConfig:
    return OneTowerConfig(lcm=TransformerConfig(num_layers=2, num_attn_heads=8, ffn_inner_dim=4096))


def one_tower_1_6B() -> OneTowerConfig:
    """Paper section 2.4: 32 blocks, 32 heads, FFN 8192, d_model 2048, learned positions, T = 100."""
    return OneTowerConfig(
        max_seq_len=4096,
        model_dim=2048,
        lcm=TransformerConfig(num_layers=32, num_attn_heads=32, ffn_inner_dim=8192, pos_embedding_style="learned",
                              layer_normalization_style="rms", final_dropout_p=0.0, mha_output_proj_bias=True),
    )


def toy_quant_lcm() -> QuantLCMConfig:
    """The toy One-Tower stack over 8 x 256 RVQ codebooks."""
    return QuantLCMConfig(n_codebooks=8, codebook_size=256, lcm=TransformerConfig(num_layers=2, num_attn_heads=8,
                                                                                  ffn_inner_dim=4096))


def quant_lcm_1_6B() -> QuantLCMConfig:
    """Paper section 2.4: the One-Tower 1.6B stack over 64 x 8192 codebooks (Quant-LCM-D by default)."""
    one = one_tower_1_6B()
    return QuantLCMConfig(max_seq_len=one.max_seq_len, model_dim=one.model_dim, lcm=one.lcm)


#: preset name -> config factory; the official arch names (and ours for One-Tower).
ARCHS: dict[str, Callable[[], ModelConfig]] = {
    "small_base_lcm": small_base_lcm,
    "small_two_tower_diffusion_lcm": small_two_tower,
    "small_one_tower_diffusion_lcm": small_one_tower,
    "small_quant_lcm": small_quant_lcm,
    "toy_base_lcm": toy_base_lcm,
    "base_lcm_1_6B": base_lcm_1_6B,
    "toy_two_tower_diffusion_lcm": toy_two_tower,
    "two_tower_diffusion_lcm_1_6B": two_tower_1_6B,
    "two_tower_diffusion_lcm_7B": two_tower_7B,
    "toy_one_tower_diffusion_lcm": toy_one_tower,
    "one_tower_diffusion_lcm_1_6B": one_tower_1_6B,
    "toy_quant_lcm": toy_quant_lcm,
    "quant_lcm_1_6B": quant_lcm_1_6B,
}


def get_arch(name: str) -> ModelConfig:
    """Returns a fresh config for the named preset."""
    try:
        return ARCHS[name]()
    except KeyError:
        raise KeyError(f"unknown arch '{name}'; available: {sorted(ARCHS)}") from None
