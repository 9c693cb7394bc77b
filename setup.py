"""Build driver: runs CMake (CMakeLists.txt) for the extension lcm_fast._C.

Environment:
  LCM_FAST_SKIP_EXT=1      pure-Python install, no extension (the package falls back to PyTorch).
  LCM_FAST_WITH_CUDA=0     skip the CUDA kernels even with nvcc and a CUDA torch.
  LCM_FAST_CPU_ARCH=...    -march target (default x86-64-v3 when the build host has AVX2).
  TORCH_CUDA_ARCH_LIST     CUDA archs (default "8.0;9.0").
  MAX_JOBS                 parallel compile jobs.

The CMake build directory is build/cmake-<python>-<torch>, kept between builds so that re-running
`pip install --no-build-isolation -e .` only recompiles what changed.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _tool(name: str) -> str:
    """The tool from this interpreter's environment first (pip's cmake>=3.26, needed for CUDA builds)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which(name, path=path)
    if found is None:
        raise RuntimeError(f"{name} not found: pip install -r requirements-dev.txt (or set LCM_FAST_SKIP_EXT=1)")
    return found


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import torch  # the torch we build against must be the one we run with

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}"
        build_dir = ROOT / "build" / f"cmake-{tag}"
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = [
            _tool("cmake"), "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={_tool('ninja')}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DLCM_FAST_WITH_CUDA={'OFF' if os.environ.get('LCM_FAST_WITH_CUDA') == '0' else 'ON'}",
        ]
        subprocess.run(cfg, check=True)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run([_tool("cmake"), "--build", str(build_dir), "-j", jobs], check=True)


ext_modules = [] if os.environ.get("LCM_FAST_SKIP_EXT") == "1" else [CMakeExtension("lcm_fast._C")]

setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild})
