"""Loads the compiled extension ``lcm_fast._C`` if it is there. Never raises at import.

``EXT_AVAILABLE`` says whether it loaded, ``EXT_ERROR`` why not. ``LCM_FAST_DISABLE_EXT=1`` skips it
(every op then runs its plain-PyTorch reference).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch  # noqa: F401  (loads libtorch/libc10 before the extension resolves its symbols)

EXT_AVAILABLE = False
EXT_ERROR: Optional[str] = None
_C: Any = None

if os.environ.get("LCM_FAST_DISABLE_EXT") == "1":
    EXT_ERROR = "disabled by LCM_FAST_DISABLE_EXT=1"
else:
    try:
        from . import _C  # noqa: F811  (importing runs the TORCH_LIBRARY registrations)

        EXT_AVAILABLE = True
    except ImportError as e:  # not built (LCM_FAST_SKIP_EXT=1), or built against another torch
        EXT_ERROR = f"{type(e).__name__}: {e}"


def build_info() -> Optional[dict[str, Any]]:
    """Compiler, flags, SIMD level, OpenMP threads, CUDA archs and torch version of the built extension."""
    return _C.build_info() if EXT_AVAILABLE else None
