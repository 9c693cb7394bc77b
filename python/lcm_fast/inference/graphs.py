"""CUDA-graph capture of a function that updates static input buffers in place (gpt-fast's static-buffer
discipline, with a manual ``torch.cuda.CUDAGraph`` rather than ``torch.compile``).

The fast engine captures the whole per-sentence DDIM loop (every denoiser call and sampler step of one
sentence, ~1k kernel launches for the 1.6B recipe) and replays it per sentence: the launches, and the
Python between them, happen once per capture instead of once per sentence.

A graph has fixed shapes, so the active batch runs padded to its :func:`batch_bucket`: as documents finish,
a batch of 64 replays at most the graphs of 64, 32, ..., 1 rows instead of capturing one per batch size.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor


def batch_bucket(n: int) -> int:
    """The batch size n active rows run at in static shapes: the next power of two (padding is nearly free
    where a step streams the weights, and at most log2(n) + 1 graphs are captured per generation call)."""
    return 1 << (n - 1).bit_length()


class CapturedCall:
    """``fn(*buffers)`` recorded once as a CUDA graph; :meth:`__call__` copies new inputs into the buffers,
    replays, and returns the buffers (which fn updates in place; the next call overwrites them).

    fn must only read its buffers and tensors whose storage stays put (weights, caches written in place),
    with shapes that do not depend on values, and never synchronise with the host. On CPU there is no
    graph: a call runs fn on the buffers (the same computation, for testing the static-buffer path).

    Args:
        fn: the function; what it returns is ignored.
        inputs: example inputs; their shapes, dtypes and device fix the buffers'.
    """

    def __init__(self, fn: Callable[..., object], *inputs: Optional[Tensor]) -> None:
        self.fn, self.buffers = fn, tuple(x.clone() if x is not None else None for x in inputs)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        if self.buffers[0].device.type != "cuda":
            return
        # Lazy initialisation (cuBLAS workspaces, allocator pools) must not happen inside the capture:
        # one warm-up run on a side stream, on copies, since fn writes its buffers (PyTorch's recipe).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(*(x.clone() if x is not None else None for x in inputs))
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            fn(*self.buffers)

    def __call__(self, *inputs: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
        for buffer, x in zip(self.buffers, inputs):
            if buffer is not None:
                buffer.copy_(x)
        if self.graph is not None:
            self.graph.replay()
        else:
            self.fn(*self.buffers)
        return self.buffers


class BatchGraphs:
    """``fn(*buffers)`` (as in :class:`CapturedCall`) at whatever batch size the inputs have (the first one's
    rows): a size's first call runs fn eagerly on the inputs, its second captures a graph, later ones replay it.
    A size seen once (the last sentences, after documents finish) costs no capture."""

    def __init__(self, fn: Callable[..., object]) -> None:
        self.fn = fn
        self.calls: dict[int, Optional[CapturedCall]] = {}  # batch size -> its graph (None: ran eagerly once)

    def __call__(self, *inputs: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
        """-> the buffers fn updated: the inputs themselves on an eager call, else the graph's."""
        size = inputs[0].shape[0]
        if size not in self.calls:
            self.calls[size] = None
            self.fn(*inputs)
            return inputs
        if self.calls[size] is None:
            self.calls[size] = CapturedCall(self.fn, *inputs)
        return self.calls[size](*inputs)


def pad_batch(x: Tensor, size: int, dim: int = 0) -> Tensor:
    """x with zero rows appended along ``dim`` up to ``size`` (a batch padded to its :func:`batch_bucket`)."""
    if x.shape[dim] == size:
        return x
    shape = list(x.shape)
    shape[dim] = size - x.shape[dim]
    return torch.cat((x, x.new_zeros(shape)), dim)
