"""The official initialisation of a model trained from scratch.

The rules, and where each comes from:

- ``Projection`` layers (pre/post-denoiser, postnet; the config's ``linear_init_fn``) and the frontend's
  ``pre_linear`` (``pre_linear_init_fn``) take one of :data:`LINEAR_INITS` (``lcm/nn/initialization.py``):
  ``kaiming_uniform`` is PyTorch's ``nn.Linear`` default, ``xavier`` xavier-uniform with zero bias, ``sonar``
  uniform with the spread that gives outputs of SONAR's std (0.006) from unit-variance inputs, ``zero``,
  ``trunc_normal`` (std 1e-3), ``none`` (left as built).
- Attention q/k/v projections: xavier-uniform with gain 2^-1/2, zero bias (fairseq2 ``init_qkv_projection``); the
  output projection: the config's ``attention_output_init_fn`` (default ``xavier``).
- Learned positions: normal with std ``embedding_std`` (the frontend config's).
- The timestep embedder's two linears: normal with std 0.02, zero bias (``DiTTimestepEncoder``, after DiT).
- The AdaLN modulator: zero (AdaLN-zero: every denoiser layer starts as the identity).
- Everything else (FFN linears, norms, PReLU, Quant-LCM's codebook-index embedding): PyTorch's defaults, which are
  fairseq2's for these modules.
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: SONAR embeddings have mean ~0 and std ~0.006 (``lcm/nn/initialization.py``)
SONAR_STD = 0.006
LINEAR_INITS = ("kaiming_uniform", "xavier", "sonar", "zero", "trunc_normal", "none")


@torch.no_grad()
def init_linear(layer: nn.Linear, style: str) -> None:
    """``layer`` initialised by one of :data:`LINEAR_INITS`."""
    if style not in LINEAR_INITS:
        raise ValueError(f"unknown linear init '{style}'; expected one of {LINEAR_INITS}")
    if style == "none":
        return
    if style == "kaiming_uniform":
        layer.reset_parameters()
        return
    if style == "xavier":
        nn.init.xavier_uniform_(layer.weight)
    elif style == "sonar":  # layer-normed inputs (unit variance) -> outputs of SONAR's std
        bound = SONAR_STD * math.sqrt(3 / layer.in_features)
        nn.init.uniform_(layer.weight, -bound, bound)
    elif style == "zero":
        nn.init.zeros_(layer.weight)
    else:
        nn.init.trunc_normal_(layer.weight, std=1e-3)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


@torch.no_grad()
def init_qkv(layer: nn.Linear) -> None:
    """An attention input projection: xavier-uniform with gain 2^-1/2, zero bias (fairseq2)."""
    nn.init.xavier_uniform_(layer.weight, gain=2**-0.5)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


@torch.no_grad()
def init_weights(model: nn.Module) -> nn.Module:
    """Every submodule's ``reset_parameters()``, each module after all of its children (so that a module's own
    rule, e.g. an attention's q/k/v init, overrides the ``nn.Linear`` default of its children) -> ``model``."""
    for module in reversed(list(model.modules())):
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    return model


class OfficialInitMixin:
    """``model.init_weights()``: the official initialisation of a model trained from scratch (module docstring of
    :mod:`lcm_fast.nn.init`). Loading a checkpoint never calls it."""

    def init_weights(self) -> "OfficialInitMixin":
        return init_weights(self)  # type: ignore[arg-type]
