"""pytest-benchmark suites (not part of the default test run: ``python -m pytest bench``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REFERENCE = Path(
    os.environ.get("LCM_FAST_REFERENCE_FIXTURES", Path(__file__).resolve().parents[1].parent / "shared/fixtures/reference_lcm")
)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not (REFERENCE / "manifest.json").is_file():
        pytest.fail(f"reference fixtures not found at {REFERENCE}; set LCM_FAST_REFERENCE_FIXTURES")
    return REFERENCE
