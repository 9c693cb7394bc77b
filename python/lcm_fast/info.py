"""``python -m lcm_fast.info``: the environment, the extension build, and the backend each op takes.

Paste its output at the top of every bug report.
"""

from __future__ import annotations

import platform

import torch

from . import __version__
from . import _ext


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
    # Fused ops register themselves in torch.ops.lcm_fast; until an op family lands, every
    # computation (models, scheduler, generation) takes the plain-PyTorch reference path.
    ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("lcm_fast::"))
    lines.append("ops: " + (", ".join(ops) if ops else "none registered: models and generation run in plain PyTorch"))
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
