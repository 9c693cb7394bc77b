"""``python -m lcm_fast.info``: the environment, the extension build, and the backend each op takes.

Paste its output at the top of every bug report.
"""

from __future__ import annotations

import platform

import torch

from . import __version__
from . import _ext
from .ops import OPS
from .ops._dispatch import requested_backend
from .ops.rvq import native_bf16


def report() -> str:
    lines = [
        f"lcm_fast {__version__}  python {platform.python_version()}  torch {torch.__version__}",
        f"torch CUDA: {torch.version.cuda or 'none'}  available: {torch.cuda.is_available()}"
        + (f"  device: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
        f"extension lcm_fast._C: {'loaded' if _ext.EXT_AVAILABLE else 'NOT loaded (' + str(_ext.EXT_ERROR) + ')'}",
    ]
    info = _ext.build_info()
    if info is not None:
        lines += [
            f"  built against torch {info['torch_version']} with {info['compiler']}",
            f"  flags: {info['cxx_flags'].strip()}",
            f"  SIMD: {', '.join(info['simd']) or 'baseline'} (at::vec {info['at_vec_capability']})",
            f"  OpenMP: {info['openmp']} ({info['openmp_max_threads']} threads; ATen {info['aten_num_threads']})",
            f"  CUDA kernels: {info['cuda_archs'] or 'not compiled'}",
        ]
        if info["torch_version"] != torch.__version__:
            lines.append(f"  WARNING: running torch {torch.__version__}, rebuild the extension against it")
    lines.append("ops (backend for fp32 inputs on cpu / cuda, and why):")
    width = max(map(len, OPS), default=0) + 2
    for name, spec in OPS.items():
        for device in ("cpu", "cuda"):
            reasons = spec.reasons(device, torch.float32)
            backend = "ref" if reasons or requested_backend() == "ref" else "ext"
            why = f"  ({'; '.join(reasons)})" if reasons else ""
            lines.append(f"  {name:<{width}} {device:<5} {backend}{why}")
    search = ("bf16 candidates, certified fp32 re-rank (the CPU has bf16 dot products)" if native_bf16("cpu")
              else "fp32 (no bf16 dot-product instructions)")
    lines.append(f"rvq encode search='auto' on cpu: {search}")
    if torch.cuda.is_available():
        search = ("bf16 candidates on tensor cores, certified fp32 re-rank" if native_bf16("cuda")
                  else "fp32 (no bf16 tensor cores: compute capability < 8.0)")
        lines.append(f"rvq encode search='auto' on cuda: {search}")
    lines.append(f"backend request: {requested_backend()} (LCM_FAST_BACKEND / lcm_fast.set_backend)")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
