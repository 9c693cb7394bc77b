"""Loading checkpoints written by the official implementation (facebookresearch/large_concept_model).

An official training run writes ``checkpoints/step_N/model.pt`` (``torch.save({"model": state_dict,
"model_key": "model"})``) and a ``model_card.yaml`` whose ``model_config`` is the full config dataclass.
No fairseq2 is needed: the card is plain YAML and the weights load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Optional
from urllib.parse import unquote, urlparse

import torch
import yaml
from torch import Tensor

from ..archs import ARCHS
from ..config import ConfigError, ModelConfig, NormalizerConfig, config_from_dict, merge_into
from ..models import BaseLCM, TwoTowerLCM, build_model
from ..nn.normalizer import SonarNormalizer

#: Official-only keys that are dropped on purpose: the denoiser's self-attention is the identity on
#: values (see ValueOutputAttention), so its q/k projections (and q/k norms) never affect an output.
IGNORED_KEYS = re.compile(r"^denoiser\.layers\.\d+\.self_attn\.(q_proj|k_proj|q_layer_norm|k_layer_norm)\.")

_WEIGHT_NORM = re.compile(r"^(.*)\.parametrizations\.weight\.original([01])$")


class CheckpointError(ValueError):
    """A checkpoint or card that cannot be loaded; the message says what is wrong and where."""


def _read_yaml(path: Path) -> Mapping[str, Any]:
    try:
        card = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise CheckpointError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(card, Mapping):
        raise CheckpointError(f"{path} is not a model card (expected a YAML mapping)")
    return card


def _resolve_checkpoint(card: Mapping[str, Any], card_path: Path) -> Path:
    """The card's ``checkpoint`` (a file:// URI or a path); if that does not exist, the file of the same
    name next to the card (official cards hold the absolute path of the machine that trained them)."""
    ref = card.get("checkpoint")
    if not ref:
        raise CheckpointError(f"{card_path} has no 'checkpoint' field")
    ref = str(ref)
    raw = Path(unquote(urlparse(ref).path)) if ref.startswith("file:") else Path(ref)
    candidates = [raw] if raw.is_absolute() else [card_path.parent / raw]
    candidates.append(card_path.parent / raw.name)
    for c in candidates:
        if c.is_file():
            return c
    raise CheckpointError(
        f"checkpoint '{ref}' of {card_path} not found (looked at {', '.join(str(c) for c in candidates)})"
    )


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch.load fails on corrupt files with many exception types
        raise CheckpointError(f"{path} is truncated or not a torch checkpoint: {e}") from e


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """The model state dict of an official ``model.pt``: ``module.`` prefixes stripped, weight-norm
    parametrizations folded into plain weights."""
    ckpt = _torch_load(path)
    key = ckpt.get("model_key", "model") if isinstance(ckpt, Mapping) else None
    if key is None or not isinstance(ckpt.get(key), Mapping):
        found = sorted(ckpt)[:8] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise CheckpointError(f"{path} is not an official LCM checkpoint (expected {{'model': state_dict}}, found {found})")
    state: dict[str, Tensor] = {}
    for name, value in ckpt[key].items():
        if not isinstance(value, Tensor):
            raise CheckpointError(f"{path}: entry '{name}' is a {type(value).__name__}, not a tensor")
        state[name.removeprefix("module.")] = value
    folded = {}
    for name in list(state):
        m = _WEIGHT_NORM.match(name)
        if m and m.group(2) == "0":
            g, v = state.pop(name), state.pop(f"{m.group(1)}.parametrizations.weight.original1")
            folded[f"{m.group(1)}.weight"] = torch._weight_norm(v.float(), g.float(), 0).to(v.dtype)
    state.update(folded)
    return state


def _model_config(card: Mapping[str, Any], card_path: Path) -> tuple[str, ModelConfig]:
    if "base" in card:
        raise CheckpointError(
            f"{card_path} inherits from base card '{card['base']}'; merge the parent's model_config into this card first"
        )
    family = card.get("model_family", card.get("model_type"))
    try:
        if card.get("model_arch"):
            arch = card["model_arch"]
            if arch not in ARCHS:
                raise ConfigError(f"unknown model_arch '{arch}'; known: {sorted(ARCHS)}")
            config = merge_into(ARCHS[arch](), card.get("model_config") or {})
        else:
            config = config_from_dict(str(family), card.get("model_config") or {})
    except ConfigError as e:
        raise CheckpointError(f"{card_path}: {e}") from e
    if config.model_type != family:
        raise CheckpointError(f"{card_path}: model_family '{family}' does not match model_type '{config.model_type}'")
    return family, config


def load_official(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device | str] = None,
    normalizer: Optional[NormalizerConfig] = None,
) -> BaseLCM | TwoTowerLCM:
    """Loads an official checkpoint: ``model_card.yaml``, its ``model.pt``, or the directory holding them.

    The card's ``model_config`` is deep-merged over the family defaults (or its ``model_arch``); unknown
    keys are an error. The normalizer statistics come from the checkpoint (the card only names the
    normalizer); pass ``normalizer`` for FFT normalizers, which a checkpoint cannot reveal. fp16 and
    fp32 weights are accepted; the model is returned in ``dtype`` (default fp32, as the official
    evaluation runs), in eval mode.

    Raises:
        CheckpointError: unreadable card or checkpoint, unknown family or config key, missing or
            unexpected weights, shape or normalizer-dim mismatch.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model_card.yaml"
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint or card: {path}")
    if path.suffix in (".yaml", ".yml"):
        card_path = path
        card = _read_yaml(card_path)
        weights = _resolve_checkpoint(card, card_path)
    else:
        card_path, weights = path.parent / "model_card.yaml", path
        if not card_path.exists():
            raise CheckpointError(f"no model_card.yaml next to {path}: the card holds the model config; pass its path")
        card = _read_yaml(card_path)
    _, config = _model_config(card, card_path)
    state = read_state_dict(weights)

    prefix = _normalizer_prefix_for(config)
    has_clip = f"{prefix}clip_min" in state
    if normalizer is None and has_clip:
        normalizer = NormalizerConfig(dim=config.sonar_embed_dim, clip_proba=1e-4)
    center = state.get(f"{prefix}center")
    if center is not None and center.shape != (config.sonar_embed_dim,):
        raise CheckpointError(
            f"{weights}: normalizer dim {list(center.shape)} does not match sonar_embed_dim {config.sonar_embed_dim}"
        )
    try:
        model = build_model(config, normalizer=normalizer, device="meta", init=False)
    except ValueError as e:
        raise CheckpointError(f"{card_path}: {e}") from e
    load_weights(model, state, source=str(weights))
    return model.to(device=device or "cpu", dtype=dtype).eval()


def _normalizer_prefix_for(config: ModelConfig) -> str:
    return "frontend.sonar_normalizer." if config.model_type == "base_lcm" else "sonar_normalizer."


def load_weights(model: BaseLCM | TwoTowerLCM, state: Mapping[str, Tensor], *, source: str) -> None:
    """Strictly loads ``state`` (official key names) into ``model`` (which may live on the meta device).

    Keys matching :data:`IGNORED_KEYS` are dropped; any other missing/unexpected key or shape mismatch
    raises one :class:`CheckpointError` listing all of them.
    """
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if not IGNORED_KEYS.match(k)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: checkpoint {list(state[k].shape)} vs model {list(expected[k].shape)}"
              for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches: {'; '.join(shapes)}")
    if problems:
        raise CheckpointError(f"{source} does not fit the {type(model).__name__} config:\n  " + "\n  ".join(problems))
    # NaN weights would generate NaN silently (inf is legitimate: a normalizer's open clip bounds)
    bad = next((k for k, v in state.items() if v.is_floating_point() and bool(torch.isnan(v).any())), None)
    if bad is not None:
        raise CheckpointError(f"{source}: tensor '{bad}' holds NaN values")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()},
                          strict=True, assign=True)


def load_normalizer(path: str | Path) -> SonarNormalizer:
    """Loads a standalone official SONAR normalizer from its card (``model_family: sonar_normalizer``)
    or its ``.pt`` file (``{"model": {"center", "scale"[, "clip_min", "clip_max"]}}``)."""
    path = Path(path)
    config = NormalizerConfig()
    if path.suffix in (".yaml", ".yml"):
        card = _read_yaml(path)
        if card.get("model_family") != "sonar_normalizer":
            raise CheckpointError(f"{path} is not a sonar_normalizer card (model_family={card.get('model_family')!r})")
        try:
            config = merge_into(config, card.get("model_config") or {})
        except ConfigError as e:
            raise CheckpointError(f"{path}: {e}") from e
        arch = str(card.get("model_arch") or "base")
        config.with_fft = config.with_fft or arch.endswith("fft")
        path = _resolve_checkpoint(card, path)
    ckpt = _torch_load(path)
    state = ckpt.get("model") if isinstance(ckpt, Mapping) else None
    if not isinstance(state, Mapping) or "center" not in state or "scale" not in state:
        raise CheckpointError(f"{path} is not a normalizer checkpoint (expected {{'model': {{'center', 'scale'}}}})")
    dim = state["center"].shape[0]
    norm = SonarNormalizer(dim, clip="clip_min" in state, with_fft=config.with_fft)
    norm.load_state_dict({k: v.float().contiguous() for k, v in state.items() if isinstance(v, Tensor)}, strict=True)
    return norm
