"""lcm_fast's native format: a directory with ``config.json`` and ``model.safetensors``.

``config.json`` holds ``format_version``, the model ``family``, the full model ``config`` (which includes
the noise scheduler config for diffusion models) and the ``normalizer`` options; the normalizer
statistics are tensors in ``model.safetensors`` under their official names.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from ..config import ConfigError, NormalizerConfig, config_from_dict, family_of, merge_into
from ..models import BaseLCM, TwoTowerLCM, build_model

FORMAT_VERSION = 1


def save_pretrained(model: BaseLCM | TwoTowerLCM, directory: str | Path) -> Path:
    """Writes ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    norm = model.normalizer
    meta = {
        "format_version": FORMAT_VERSION,
        "family": family_of(model.config),
        "config": dataclasses.asdict(model.config),
        "normalizer": None if norm is None else dataclasses.asdict(
            NormalizerConfig(dim=norm.dim, clip_proba=1e-4 if norm.clip_min is not None else None, with_fft=norm.with_fft)
        ),
    }
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_safetensors(state, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: Optional[dict[str, str]] = None
                     ) -> None:
    """``safetensors.torch.save_file``, with the permissions of any file the process writes (the umask's):
    safetensors creates its files 0600, unreadable to the group a shared run directory is for."""
    save_file(tensors, str(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def from_pretrained(
    directory: str | Path, *, dtype: Optional[torch.dtype] = None, device: Optional[torch.device | str] = None
) -> BaseLCM | TwoTowerLCM:
    """Loads a model written by :func:`save_pretrained` (in its saved dtype unless ``dtype`` is given)."""
    from .official import CheckpointError, load_weights

    directory = Path(directory)
    cfg_path, weights = directory / "config.json", directory / "model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{directory} is not an lcm_fast model directory (needs config.json and model.safetensors)")
    meta = json.loads(cfg_path.read_text())
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{cfg_path}: format_version {version!r} is not supported (this lcm_fast reads {FORMAT_VERSION})")
    try:
        config = config_from_dict(meta["family"], meta["config"])
        normalizer = merge_into(NormalizerConfig(), meta["normalizer"]) if meta.get("normalizer") else None
    except (ConfigError, KeyError) as e:
        raise CheckpointError(f"{cfg_path}: {e}") from e
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error type, which names no file
        raise CheckpointError(f"{weights}: not a readable safetensors file ({type(e).__name__}: {e}); the file is "
                              "corrupt or truncated: write it again with save_pretrained") from e
    saved_dtype = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    model = build_model(config, normalizer=normalizer, device="meta", init=False)
    load_weights(model, state, source=str(weights))
    return model.to(device=device or "cpu", dtype=dtype or saved_dtype).eval()
