"""scripts/gpu_check.py runs end to end without a GPU: its GPU stages are reported skipped, the table still comes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU behaviour of the script")
def test_gpu_check_reports_gpu_stages_skipped_on_cpu(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts/gpu_check.py"), "--stages", "info,tests,memcheck,train",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    table = (tmp_path / "summary.txt").read_text()
    assert table in out.stdout and "| stage | result | seconds | key figures |" in table
    assert "| info | pass |" in table and "ops without their CUDA kernel:" in table
    for stage in ("tests", "memcheck", "train"):
        assert f"| {stage} | skipped (no GPU) |" in table
    assert "===== info: pass" in (tmp_path / "stages.log").read_text()
    bad = subprocess.run([sys.executable, str(ROOT / "scripts/gpu_check.py"), "--stages", "info,lint"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown stages ['lint']" in bad.stderr


def test_rvq_figures_read_what_the_benchmarks_record(tmp_path):
    """The rvq stage's summary reads the keys bench_rvq.py's GPU cases write (a typo there would only show on the
    GPU machine): one encode, decode and training record each, as the benchmarks write them."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts/gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = gpu_check  # its dataclasses look their module up
    spec.loader.exec_module(gpu_check)
    common = dict(device="GPU", M=64, K=8192, d=1024)
    records = [
        dict(op="rvq_encode", n=4096, search_resolved="bf16", exact_s=0.2, auto_s=0.01, speedup=20.0,
             exact_vectors_per_s=2e4, vectors_per_s=4e5, exact_tflops=18.0, tflops=400.0, vector_match=1.0),
        dict(op="rvq_decode", n=65536, vectors_per_s=1e6, gbps=3000.0),
        dict(op="rvq_train", n=262144, n_iter=10, search="auto", search_resolved="bf16", train_s=3.0,
             vectors_per_s=1e5, assignment_tflops=300.0, paper_scaled_s=64.0),
    ]
    (tmp_path / "bench-rvq.json").write_text(json.dumps({"benchmarks": [{"extra_info": {**common, **r}} for r in records]}))
    figures = gpu_check._rvq("", tmp_path)
    assert figures == ("encode 64x8192: 400k vectors/s, 400 TFLOP/s (bf16) = 20.0x the fp32 search, 100.00% same; "
                       "decode 64x8192: 1000k vectors/s; train 64x8192 n262144 bf16: 3.0 s, paper-scaled 64 s")
