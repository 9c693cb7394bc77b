"""Backend selection for the fused ops: the compiled kernel (``ext``) or the plain-PyTorch reference (``ref``).

The backend is, first match wins: the ``backend=`` argument of an op call, the innermost
:func:`set_backend` context, the environment variable ``LCM_FAST_BACKEND``, else ``auto``. ``auto``
takes ``ext`` when the op has no reason against it on these inputs, else ``ref`` (and warns once per
op and reason, unless the reason is only that no extension is built). A forced ``ext`` that cannot run
raises one error listing every reason. The choice reads only static properties (device, dtype,
shape), so under ``torch.compile`` it is made at trace time, without graph breaks.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from .. import _ext

BACKENDS = ("auto", "ext", "ref")
# The innermost set_backend() (a plain global rather than a ContextVar, which torch.compile cannot trace).
_override: list[str] = []
_warned: set[tuple[str, str]] = set()


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend '{name}'; expected one of {BACKENDS}")
    return name


@contextlib.contextmanager
def set_backend(name: str) -> Iterator[None]:
    """``with lcm_fast.set_backend("ref"): ...`` pins the backend of every op call inside."""
    _override.append(_check(name))
    try:
        yield
    finally:
        _override.pop()


def requested_backend(explicit: Optional[str] = None) -> str:
    return _check(explicit or (_override[-1] if _override else None) or os.environ.get("LCM_FAST_BACKEND") or "auto")


@dataclass
class OpSpec:
    """What an op's kernel supports; ``reasons`` lists why it cannot take the given inputs."""

    name: str
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
    #: devices the op has a kernel for by design (a build may still lack one: ``kernels``)
    devices: tuple[str, ...] = ("cpu", "cuda")
    #: extra input-dependent reasons: (device_type, dtype, **static facts) -> [reason, ...]
    extra: Optional[Callable[..., list[str]]] = field(default=None)

    def __post_init__(self) -> None:
        # which devices have a compiled kernel: fixed once the extension is loaded (looked up here, not
        # per call, so that torch.compile traces through the dispatcher)
        self.kernels = frozenset(
            device
            for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
            if _ext.EXT_AVAILABLE and torch._C._dispatch_has_kernel_for_dispatch_key(f"lcm_fast::{self.name}", key)
        )

    def has_kernel(self, device_type: str) -> bool:
        return device_type in self.kernels

    def reasons(self, device_type: str, dtype: Optional[torch.dtype] = None, **facts) -> list[str]:
        if not _ext.EXT_AVAILABLE:
            return [f"extension not loaded ({_ext.EXT_ERROR})"]
        out = []
        if device_type not in self.devices:
            out.append(f"no {device_type} kernel ({'/'.join(self.devices)} only)")
        elif not self.has_kernel(device_type):
            out.append(f"no {device_type} kernel compiled")
        if dtype is not None and dtype not in self.dtypes:
            out.append(f"dtype {dtype} not supported")
        if self.extra is not None:
            out += self.extra(device_type, dtype, **facts)
        return out

    def choose(self, device_type: str, dtype: torch.dtype, backend: Optional[str] = None, **facts) -> str:
        """'ext' or 'ref' for a call on these inputs (see the module docstring)."""
        requested = requested_backend(backend)
        if requested == "ref":
            return "ref"
        reasons = self.reasons(device_type, dtype, **facts)
        if not reasons:
            return "ext"
        message = "; ".join(reasons)
        if requested == "ext":
            raise RuntimeError(f"lcm_fast::{self.name}: backend 'ext' requested but it cannot run: {message}")
        if _ext.EXT_AVAILABLE and (self.name, message) not in _warned:
            _warned.add((self.name, message))
            warnings.warn(f"lcm_fast::{self.name} falls back to the PyTorch reference: {message}", stacklevel=3)
        return "ref"


#: every fused op, by name (for ``python -m lcm_fast.info``)
OPS: dict[str, OpSpec] = {}


def register(spec: OpSpec) -> OpSpec:
    OPS[spec.name] = spec
    return spec
