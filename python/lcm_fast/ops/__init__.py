"""Fused ops. Each module holds the public dispatcher, its plain-PyTorch ``_ref`` twin (the
specification, the fallback and the test oracle) and the ``register_fake`` for torch.compile."""

from ._dispatch import OPS, set_backend
from .guided_ddim import guided_ddim_step_, guided_ddim_step_ref, sampler_params

__all__ = ["OPS", "guided_ddim_step_", "guided_ddim_step_ref", "sampler_params", "set_backend"]
