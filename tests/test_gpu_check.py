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
