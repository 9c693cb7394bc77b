"""Model and scheduler configuration.

The dataclasses mirror the official implementation's config classes field for field (names, defaults,
nesting), so that an official ``model_card.yaml`` ``model_config`` maps onto them one to one and
``dataclasses.asdict`` of ours writes the same mapping back. Unknown keys are an error, never ignored.
"""

from __future__ import annotations

import copy
import dataclasses
import types
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, TypeVar, Union, get_args, get_origin, get_type_hints

NormStyle = Literal["standard", "fp32", "rms", "unit"]
NormOrder = Literal["pre", "post", "normformer"]
PosStyle = Literal["rope", "sine", "learned", "none"]


@dataclass
class TransformerConfig:
    """A causal Transformer stack (the Base-LCM core and the Two-Tower contextualizer)."""

    num_layers: int = 2
    num_attn_heads: int = 8
    dropout_p: float = 0.1
    """Dropout on every sublayer output before the residual add (training only)."""
    final_dropout_p: float = 0.1
    """Dropout after the final layer norm of the stack."""
    attention_dropout_p: float = 0.0
    ffn_inner_dim: int = 4096
    use_swiglu: bool = False
    """SwiGLU FFN; its inner dim is int(2/3 * ffn_inner_dim) rounded *up* to a multiple of 256."""
    ffn_inner_activation_name: str = "relu"
    pos_embedding_style: PosStyle = "learned"
    rope_theta: float = 10000.0
    layer_normalization_style: NormStyle = "standard"
    norm_order_style: NormOrder = "pre"
    final_norm_order_style: Optional[NormOrder] = None
    enable_qk_layernorm: bool = False
    mha_qkv_weight_normalization: bool = False
    mha_output_weight_normalization: bool = False
    mha_output_proj_bias: bool = False
    scale_residual: Optional[float] = None
    """If set, a learned per-channel scale (initialised to this value) multiplies the FFN residual."""
    attention_output_init_fn: str = "xavier"


@dataclass
class ProjectionConfig:
    """A linear projection with an optional activation (``dropout_p`` and the norm style are unused,
    as in the official code, but kept so that official configs load)."""

    dropout_p: float = 0.0
    linear_bias: bool = True
    linear_init_fn: str = "kaiming_uniform"
    weight_normalization: bool = False
    layer_normalization_style: NormStyle = "standard"
    activation_name: Optional[str] = None


@dataclass
class DenoiserConfig(TransformerConfig):
    """The Two-Tower denoiser: AdaLN-modulated layers with cross-attention over the context."""

    pos_embedding_style: PosStyle = "none"
    pre_denoiser: ProjectionConfig = field(default_factory=ProjectionConfig)
    post_denoiser: ProjectionConfig = field(default_factory=ProjectionConfig)
    timestep_embed_dim: int = 1024
    """Must equal the model dim (the official code asserts it)."""


@dataclass
class EncoderFrontendConfig:
    """Two-Tower contextualizer frontend: SONAR dim -> model dim (+ positions)."""

    dropout_p: float = 0.0
    pre_linear_bias: bool = True
    pre_linear_init_fn: str = "kaiming_uniform"
    weight_normalization: bool = False
    embedding_std: float = 1.0


@dataclass
class LCMFrontendConfig(EncoderFrontendConfig):
    """Base-LCM frontend (PreNet)."""

    scale_embeddings: bool = False
    """Multiply inputs by sqrt(model_dim) before the pre-linear."""
    embedding_std: float = 0.006


@dataclass
class SchedulerConfig:
    """DDIM noise scheduler (``DDIMSchedulerConfig`` of the official code; paper section 2.3.2)."""

    num_diffusion_train_steps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"] = "squaredcos_cap_v2"
    """linear | scaled_linear (the paper's quadratic) | squaredcos_cap_v2 (cosine) | sigmoid (paper Eq. 14)."""
    scaled_linear_exponent: float = 2.0
    sigmoid_schedule_alpha: float = 1.5
    sigmoid_schedule_beta: float = 0
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    prediction_type: Literal["sample", "epsilon", "v_prediction"] = "sample"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    rescale_betas_zero_snr: bool = True
    timestep_spacing: Literal["linspace", "leading", "trailing"] = "trailing"


@dataclass
class NormalizerConfig:
    """SONAR embedding normalizer (robust standardisation; optional clipping and FFT)."""

    dim: int = 1024
    clip_proba: Optional[float] = None
    with_fft: bool = False
    quantile_min: float = 0.25
    quantile_max: float = 0.75
    normalization_method: Literal["standard", "robust", "gaussian_robust"] = "gaussian_robust"


@dataclass
class BaseLCMConfig:
    """Base-LCM (MSE regression, paper section 2.2)."""

    model_type: str = "base_lcm"
    sonar_embed_dim: int = 1024
    sonar_normalizer_name: Optional[str] = None
    """Only its None / not-None meaning is used: the statistics come from the checkpoint."""
    max_seq_len: int = 2048
    model_dim: int = 1024
    model_output_dim: Optional[int] = None
    frontend: LCMFrontendConfig = field(default_factory=LCMFrontendConfig)
    lcm: TransformerConfig = field(default_factory=TransformerConfig)
    postnet: ProjectionConfig = field(default_factory=ProjectionConfig)


@dataclass
class TwoTowerConfig:
    """Two-Tower diffusion LCM (paper section 2.3.4)."""

    model_type: str = "two_tower_diffusion_lcm"
    sonar_embed_dim: int = 1024
    sonar_normalizer_name: Optional[str] = None
    max_seq_len: int = 2048
    model_dim: int = 1024
    frontend: EncoderFrontendConfig = field(default_factory=EncoderFrontendConfig)
    context_encoder: TransformerConfig = field(default_factory=TransformerConfig)
    noise_scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    trained_with_cf_guidance: bool = False


@dataclass
class OneTowerConfig:
    """One-Tower diffusion LCM (paper section 2.3.3; not in the official code): one causal transformer
    over clean and noisy sentence embeddings, each input concatenated with its timestep embedding."""

    model_type: str = "one_tower_diffusion_lcm"
    sonar_embed_dim: int = 1024
    sonar_normalizer_name: Optional[str] = "sonar_normalizer"
    max_seq_len: int = 2048
    model_dim: int = 1024
    timestep_embed_dim: int = 256
    """Width of the timestep embedding concatenated to every input embedding."""
    frontend: LCMFrontendConfig = field(default_factory=LCMFrontendConfig)
    lcm: TransformerConfig = field(default_factory=TransformerConfig)
    """Positions: ``learned`` (the paper's), ``sine`` or ``none`` (both tokens of sentence n get position n)."""
    postnet: ProjectionConfig = field(default_factory=ProjectionConfig)
    noise_scheduler: SchedulerConfig = field(default_factory=lambda: SchedulerConfig(num_diffusion_train_steps=100))
    trained_with_cf_guidance: bool = True


@dataclass
class QuantLCMConfig:
    """Quant-LCM (paper section 2.3.5; not in the official code): the One-Tower backbone over residual
    vector quantized embeddings. The noisy input becomes the intermediate quantized representation (the
    sum of the first k-1 codebooks' centroids) and the timestep embedding a codebook-index embedding."""

    model_type: str = "quant_lcm"
    target: Literal["discrete", "continuous"] = "discrete"
    """``discrete``: Quant-LCM-D, softmax over the K units of codebook k (cross-entropy);
    ``continuous``: Quant-LCM-C, the continuous target embedding (MSE)."""
    n_codebooks: int = 64
    codebook_size: int = 8192
    sonar_embed_dim: int = 1024
    sonar_normalizer_name: Optional[str] = "sonar_normalizer"
    max_seq_len: int = 2048
    model_dim: int = 1024
    codebook_embed_dim: int = 256
    """Width of the codebook-index embedding concatenated to every input embedding."""
    frontend: LCMFrontendConfig = field(default_factory=LCMFrontendConfig)
    lcm: TransformerConfig = field(default_factory=TransformerConfig)
    postnet: ProjectionConfig = field(default_factory=ProjectionConfig)
    trained_with_cf_guidance: bool = True


ModelConfig = Union[BaseLCMConfig, TwoTowerConfig, OneTowerConfig, QuantLCMConfig]

#: official ``model_family`` (and ``model_type``) name -> config class (``one_tower_diffusion_lcm`` is ours)
FAMILIES: dict[str, type] = {
    "base_lcm": BaseLCMConfig,
    "two_tower_diffusion_lcm": TwoTowerConfig,
    "one_tower_diffusion_lcm": OneTowerConfig,
    "quant_lcm": QuantLCMConfig,
}

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration mapping does not fit the config class (unknown key, wrong type)."""


def _dataclass_type(tp: Any) -> Optional[type]:
    if dataclasses.is_dataclass(tp):
        return tp
    if get_origin(tp) is Union:
        for arg in get_args(tp):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def merge_into(config: T, overrides: Mapping[str, Any], path: str = "") -> T:
    """Deep-merges ``overrides`` into a copy of ``config``. Every key must name an existing field.

    Raises:
        ConfigError: naming the full dotted path of an unknown key.
    """
    config = copy.deepcopy(config)
    hints = get_type_hints(type(config))
    names = {f.name for f in dataclasses.fields(config)}
    for key, value in overrides.items():
        where = f"{path}{key}"
        if key not in names:
            raise ConfigError(
                f"unknown config key '{where}' for {type(config).__name__}; valid keys: {sorted(names)}"
            )
        sub = _dataclass_type(hints[key])
        if sub is not None and isinstance(value, Mapping):
            current = getattr(config, key)
            setattr(config, key, merge_into(current if current is not None else sub(), value, where + "."))
        elif sub is not None and value is not None and not dataclasses.is_dataclass(value):
            raise ConfigError(f"config key '{where}' expects a mapping, got {type(value).__name__}")
        else:
            setattr(config, key, _checked(value, hints[key], where))
    return config


def _checked(value: Any, hint: Any, where: str) -> Any:
    """``value`` for a field typed ``hint``: numbers, bools and strings must be of their kind (YAML 1.1 reads
    ``1e-3`` as a string: a numeric string becomes a float where a float is expected); other types unchecked."""
    kind = _scalar(hint)
    if kind is None or value is None:
        return value
    if kind is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    elif kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    elif kind in (int, str, bool) and isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"config key '{where}' expects {kind.__name__}, got {value!r} ({type(value).__name__})")


def _scalar(hint: Any) -> Optional[type]:
    """float, int, bool or str for a field of that type (or Optional of it), else None."""
    args = [a for a in get_args(hint) if a is not type(None)] if get_origin(hint) in (Union, types.UnionType) else [hint]
    return args[0] if len(args) == 1 and args[0] in (float, int, bool, str) else None


def config_from_dict(family: str, mapping: Mapping[str, Any]) -> ModelConfig:
    """Builds the config of ``family`` from its defaults overridden by ``mapping`` (strict: a ``model_type``
    other than the family's is an error)."""
    if family not in FAMILIES:
        raise ConfigError(f"unknown model family '{family}'; lcm_fast supports {sorted(FAMILIES)}")
    config = merge_into(FAMILIES[family](), mapping)
    if config.model_type != FAMILIES[family]().model_type:
        raise ConfigError(f"model_type '{config.model_type}' does not match the model family '{family}' (expected "
                          f"'{FAMILIES[family]().model_type}')")
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def family_of(config: ModelConfig) -> str:
    for name, cls in FAMILIES.items():
        if type(config) is cls:
            return name
    raise ConfigError(f"not a model config: {type(config).__name__}")
