"""Fused ops: each has a plain-PyTorch reference twin and a dispatcher (see _dispatch.py)."""

from ._dispatch import OPS

__all__ = ["OPS"]
