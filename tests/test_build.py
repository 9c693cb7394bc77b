"""The compiled extension: it loads, reports its build, and the package works without it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from lcm_fast import _ext
from lcm_fast.info import report
from lcm_fast.ops.rvq import native_bf16


def test_extension_loaded():
    assert _ext.EXT_AVAILABLE, f"lcm_fast._C did not load: {_ext.EXT_ERROR}"


def test_build_info():
    info = _ext.build_info()
    assert info["torch_version"] == torch.__version__
    assert info["openmp"] is not None and info["openmp_max_threads"] >= 1
    assert info["aten_num_threads"] == torch.get_num_threads()
    assert "-O3" in info["cxx_flags"] and "-march=native" not in info["cxx_flags"]
    assert info["with_cuda"] == bool(info["cuda_archs"])
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and " avx2 " in cpuinfo.read_text() and not os.environ.get("LCM_FAST_CPU_ARCH"):
        # x86-64-v3 and the at::vec defines, so that vectorised kernels really use AVX2
        assert {"avx2", "fma", "f16c"} <= set(info["simd"])
        assert info["at_vec_capability"] == "AVX2"


def test_info_report():
    text = report()
    assert f"torch {torch.__version__}" in text
    assert "extension lcm_fast._C: loaded" in text
    assert "SIMD:" in text and "OpenMP:" in text and "CUDA kernels:" in text
    for op in ("guided_ddim_step_", "adaln_norm_modulate", "adaln_gated_residual_norm_modulate"):
        assert re.search(rf"^  {op} +cpu +ext$", text, re.M), text
    assert "rvq encode search='auto' on cpu: " + ("bf16" if native_bf16("cpu") else "fp32") in text
    out = subprocess.run([sys.executable, "-m", "lcm_fast.info"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == text


def test_works_without_extension(reference_dir):
    code = f"""
import torch, lcm_fast
assert not lcm_fast.EXT_AVAILABLE
m = lcm_fast.load_official({str(reference_dir / 'two_tower_b/checkpoints/step_1')!r})
out = lcm_fast.generate(m, torch.randn(1, 2, 256) * 0.01, max_gen_len=1,
                        options=lcm_fast.GenerationOptions(inference_timesteps=5, seed=1))
assert out.sequences[0].shape == (3, 256)
from lcm_fast.info import report
print(report())
"""
    env = dict(os.environ, LCM_FAST_DISABLE_EXT="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "NOT loaded (disabled by LCM_FAST_DISABLE_EXT=1)" in out.stdout
    assert re.search(r"^  guided_ddim_step_ +cpu +ref  \(extension not loaded", out.stdout, re.M), out.stdout


def test_tests_and_benchmarks_collect_without_faiss():
    """faiss is optional (the GPU machine has none): without it every test and benchmark module still collects, and
    only the comparisons with faiss skip. A module-level ``import faiss`` once hid every RVQ CUDA test there."""
    code = ("import sys; sys.modules['faiss'] = None; import pytest; "
            "sys.exit(pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', 'tests', 'bench']))")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    summary = out.stdout.strip().splitlines()[-1]
    assert out.returncode == 0 and not re.search(r"\d+ errors?", summary), out.stdout[-3000:] + out.stderr[-3000:]
    assert "tests/ops/test_rvq.py::test_codes_match_faiss_compute_codes" in out.stdout
    assert "bench/bench_rvq.py::test_encode_gpu" in out.stdout
