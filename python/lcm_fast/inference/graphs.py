"""CUDA-graph capture of a function that updates static input buffers in place (gpt-fast's static-buffer
discipline, with a manual ``torch.cuda.CUDAGraph`` rather than ``torch.compile``).

The fast engine captures the whole per-sentence DDIM loop (every denoiser call and sampler step of one
sentence, ~1k kernel launches for the 1.6B recipe) and replays it per sentence: the launches, and the
Python between them, happen once per capture instead of once per sentence.

A graph has fixed shapes, so the active batch runs padded to its :func:`batch_bucket`: as documents finish,
a batch of 64 replays at most the graphs of 64, 32, ..., 1 rows instead of capturing one per batch size.

Capture safety is checked on every device: the warm-up run before a capture (on CPU, where there is no
graph, the run that stands in for it) goes through :class:`CaptureGuard`, which fails at the first operation
a CUDA graph cannot hold (a host sync, a data-dependent shape, a tensor made from Python data), naming it
and the line that issued it. So the CPU tests of the static path catch what would break the capture on a GPU.

What a captured step runs (:func:`static_layers_decode`): the decode ops' composed twins, each sub-op on its fused
kernel, or (``Generator(inductor=True)``) the same computation compiled by Inductor before the capture.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

_SYNC = "reads a tensor's value on the host (.item(), int/float/bool of a tensor, a 0-d tensor as a Python index)"
_DATA_SHAPE = "has an output shape that depends on the data (nonzero, torch.where(mask), boolean-mask indexing)"
_FROM_PYTHON = ("makes a tensor from Python data (torch.tensor, a Python scalar assigned by index): on CUDA a "
                "host-to-device copy")
#: aten ops that a CUDA graph cannot capture, and why
UNCAPTURABLE = {
    "_local_scalar_dense": _SYNC,
    "item": _SYNC,  # what inference mode dispatches instead of _local_scalar_dense
    "is_nonzero": _SYNC,
    "equal": "compares two tensors on the host (torch.equal)",
    "nonzero": _DATA_SHAPE,
    "masked_select": _DATA_SHAPE,
    "_unique": _DATA_SHAPE,
    "_unique2": _DATA_SHAPE,
    "unique_dim": _DATA_SHAPE,
    "unique_consecutive": _DATA_SHAPE,
    "bincount": _DATA_SHAPE,
    "lift_fresh": _FROM_PYTHON,
    "lift_fresh_copy": _FROM_PYTHON,
}
_INDEX_OPS = ("index", "index_put", "index_put_", "_index_put_impl_")
_COPY_OPS = ("_to_copy", "copy_", "copy")
_HERE = Path(__file__).resolve()


class CaptureUnsafeError(RuntimeError):
    """An operation that a CUDA graph cannot capture ran inside a function meant for capture."""


class CaptureGuard(TorchDispatchMode):
    """``with CaptureGuard("my step"): step(...)`` raises :class:`CaptureUnsafeError` at the first dispatched
    operation that a CUDA graph cannot hold
    (:data:`UNCAPTURABLE`, indexing with a boolean mask, a copy between devices), on any device. The check is
    by operation, not by device, so a CPU run of a step finds what would break its capture on a GPU. Views
    and ops inside the extension's kernels are not seen; ``Tensor.tolist()`` dispatches nothing on CPU."""

    def __init__(self, what: str = "a captured function") -> None:
        super().__init__()
        self.what = what

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if func.namespace == "aten":
            why = _uncapturable(func.overloadpacket.__name__, args, kwargs)
            if why is not None:
                op = func.name().split("::")[1]
                raise CaptureUnsafeError(f"{self.what} cannot be captured in a CUDA graph: aten.{op} {why}, "
                                         f"at {_caller()}")
        return func(*args, **kwargs)


class OpCounter(TorchDispatchMode):
    """``with OpCounter() as ops: step(...)``: ``ops.counts`` maps each dispatched non-view operation (aten's and
    lcm_fast's ops, by overload name) to its number of calls, ``ops.total`` sums them. On a GPU each is a kernel
    launch or more, so the count of a static-shape step on CPU bounds what its CUDA graph replays. Views are free;
    a ``contiguous`` that copies shows as ``clone``; what runs inside an op's kernel is not seen."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        if not func.is_view:
            self.counts[func.name()] += 1
        return func(*args, **(kwargs or {}))


def _uncapturable(name: str, args: tuple, kwargs: dict) -> Optional[str]:
    """Why aten op ``name`` on these arguments cannot be captured (None: it can)."""
    if name in UNCAPTURABLE:
        return UNCAPTURABLE[name]
    if name in _INDEX_OPS and len(args) > 1:
        if any(isinstance(i, Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] or ()):
            return _DATA_SHAPE
    if name in _COPY_OPS:
        devices = {t.device.type for t in (*args, *kwargs.values()) if isinstance(t, Tensor)}
        if "device" in kwargs and kwargs["device"] is not None:
            devices.add(torch.device(kwargs["device"]).type)
        if len(devices) > 1:
            return (f"copies between devices ({' and '.join(sorted(devices))}): a host sync, or host memory read at "
                    "replay")
    return None


def _caller() -> str:
    """The innermost source line outside torch and this module: the one that issued the operation."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename).resolve()
        if path != _HERE and "torch" not in path.parts:
            return f"{frame.filename}:{frame.lineno} ({(frame.line or '').strip()})"
    return "an unknown line"


def batch_bucket(n: int) -> int:
    """The batch size n active rows run at in static shapes: the next power of two (padding is nearly free
    where a step streams the weights, and at most log2(n) + 1 graphs are captured per generation call)."""
    return 1 << (n - 1).bit_length()


class CapturedCall:
    """``fn(*buffers)`` recorded once as a CUDA graph; :meth:`__call__` copies new inputs into the buffers,
    replays, and returns the buffers (which fn updates in place; the next call overwrites them).

    fn must only read its buffers and tensors whose storage stays put (weights, caches written in place),
    with shapes that do not depend on values, and never synchronise with the host: the warm-up run before
    the capture checks that under :class:`CaptureGuard` (also on CPU, where there is no graph and a call runs
    fn on the buffers: the same computation, for testing the static-buffer path).

    Args:
        fn: the function; what it returns is ignored.
        inputs: example inputs; their shapes, dtypes and device fix the buffers'.
    """

    def __init__(self, fn: Callable[..., object], *inputs: Optional[Tensor]) -> None:
        self.fn, self.buffers = fn, tuple(x.clone() if x is not None else None for x in inputs)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        device, name = self.buffers[0].device, getattr(fn, "__qualname__", repr(fn))
        # Lazy initialisation (cuBLAS workspaces, allocator pools) must not happen inside the capture:
        # one warm-up run on a side stream, on copies, since fn writes its buffers (PyTorch's recipe).
        side = torch.cuda.Stream(device) if device.type == "cuda" else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            # compiled code (Generator(inductor=True)) is opaque to a dispatch mode: the guard checks its Python
            with CaptureGuard(name), torch.compiler.set_stance("force_eager"):
                fn(*(x.clone() if x is not None else None for x in inputs))
            if side is not None:  # and the compiled code's own lazy work (loading kernels) is done before the capture
                fn(*(x.clone() if x is not None else None for x in inputs))
        if side is not None:
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = _capture(fn, self.buffers, name)

    def __call__(self, *inputs: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
        for buffer, x in zip(self.buffers, inputs):
            if buffer is not None:
                buffer.copy_(x)
        if self.graph is not None:
            self.graph.replay()
        else:
            self.fn(*self.buffers)
        return self.buffers


def _capture(fn: Callable[..., object], buffers: tuple[Optional[Tensor], ...], name: str) -> torch.cuda.CUDAGraph:
    """fn(*buffers) recorded on a side stream. A capture that fails leaves no state behind, and says so: torch
    would leave the stream's capture open, the current stream switched, the allocator routing to the graph's
    pool and the device's generator in capture mode (every later random draw of the process then fails)."""
    device = buffers[0].device
    with torch.cuda.device(device):
        generator = torch.cuda.default_generators[torch.cuda.current_device()]
        rng, pool = generator.clone_state(), torch.cuda.graph_pool_handle()
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            graph.capture_begin(pool)
            ended = False
            try:
                fn(*buffers)
                ended = True
                graph.capture_end()
            except BaseException as error:
                if not ended:
                    with contextlib.suppress(RuntimeError):  # ends the stream's capture, invalid by now
                        graph.capture_end()
                _release_pool(pool)
                generator.graphsafe_set_state(rng)
                raise RuntimeError(f"CUDA graph capture of {name} failed, nothing was captured and the process's CUDA "
                                   f"state is as before: {type(error).__name__}: {error}") from error
        torch.cuda.current_stream().wait_stream(stream)
    return graph


def _release_pool(pool: tuple[int, int]) -> None:
    """Stops routing allocations to a failed capture's memory pool and frees it (private torch API: skipped
    where it is missing; what remains then is the pool's memory, not a wrong result)."""
    index = torch.cuda.current_device()
    with contextlib.suppress(AttributeError, RuntimeError, TypeError):
        torch._C._cuda_endAllocateToPool(index, pool)
        torch._C._cuda_releasePool(index, pool)


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


class _InductorLayers:
    """A decode op's composed twin (``ref``) in plain PyTorch compiled by Inductor as one graph per shape (a graph
    break is an error; shapes are specialized, as the CUDA graph that captures the step is). Calls with a row subset
    (sentences with teacher-forced rows, which run step by step and are never captured) take the composed ops, so
    ragged prompts cost no compile."""

    # one compile per batch bucket and CFG shape (the first DDIM step has no unconditional rows), per model shape
    RECOMPILE_LIMIT = 64

    def __init__(self, ref: Callable[..., Tensor]) -> None:
        self.compiled = torch.compile(ref, fullgraph=True, dynamic=False)
        self.composed = functools.partial(ref, backend=None)
        self.rows = list(inspect.signature(ref).parameters).index("rows")

    def __call__(self, *args: object) -> Tensor:
        if args[self.rows] is not None:
            return self.composed(*args)
        with torch._dynamo.config.patch(recompile_limit=self.RECOMPILE_LIMIT):
            return self.compiled(*args, backend="ref")


@functools.cache
def _inductor_layers(ref: Callable[..., Tensor]) -> _InductorLayers:
    return _InductorLayers(ref)  # one per op: every generator shares its compiled code


def static_layers_decode(ref: Callable[..., Tensor], inductor: bool) -> Callable[..., Tensor]:
    """The static-shape step's layers: ref's composed ops, each on its fused kernel, or with ``inductor`` all of them
    compiled by Inductor (fused elementwise prologues and epilogues, its own GEMMs), the other route to few launches
    per step on a GPU."""
    return _inductor_layers(ref) if inductor else functools.partial(ref, backend=None)
