"""Discovers the parity fixtures: every model, scheduler case and generation run listed by
``manifest.json`` and the ``fixtures.json`` files of ``$LCM_FAST_REFERENCE_FIXTURES``
(default ``../shared/fixtures/reference_lcm`` beside the repository). Nothing is hard-coded: the same
tests run on any fixture directory in this format."""

from __future__ import annotations

import json
from collections import defaultdict
from functools import cache

import pytest
import torch
from safetensors.torch import load_file

from ..conftest import REFERENCE as FIXTURES


def _manifest() -> dict:
    path = FIXTURES / "manifest.json"
    if not path.is_file():
        raise pytest.UsageError(
            f"parity fixtures not found at {FIXTURES} (set LCM_FAST_REFERENCE_FIXTURES to the reference_lcm directory)"
        )
    return json.loads(path.read_text())


MANIFEST = _manifest()


class FixtureSet:
    """One ``fixtures.json`` with its tensors (cloned: memory-mapped safetensors are only 8-byte
    aligned, which changes CPU BLAS paths, as the fixture README notes)."""

    def __init__(self, rel_json: str) -> None:
        self.path = FIXTURES / rel_json
        self.spec = json.loads(self.path.read_text())
        self._tensors = load_file(str(FIXTURES / self.spec["fixtures_file"]))

    def __getitem__(self, ref: dict) -> torch.Tensor:
        t = self._tensors[ref["key"]]
        assert list(t.shape) == ref["shape"], f"fixture {ref['key']}: shape {list(t.shape)} != {ref['shape']}"
        return t.clone()


@cache
def model_fixture(name: str) -> FixtureSet:
    return FixtureSet(MANIFEST["models"][name]["fixtures_json"])


@cache
def scheduler_fixture() -> FixtureSet:
    return FixtureSet(MANIFEST["scheduler"]["fixtures_json"])


@cache
def loaded_model(name: str):
    import lcm_fast

    return lcm_fast.load_official(FIXTURES / model_fixture(name).spec["model_card"])


def model_names(kind: str | None = None) -> list[str]:
    return [n for n, m in MANIFEST["models"].items() if kind is None or m["kind"] == kind]


def generation_runs() -> list[tuple[str, str]]:
    return [(name, tag) for name in model_names() for tag in model_fixture(name).spec.get("generate", {})]


def scheduler_cases() -> list[str]:
    return [c["name"] for c in scheduler_fixture().spec["cases"]]


# ---- worst observed error per fixture group, printed at the end of the run ----------------------------
WORST: dict[str, tuple[float, str]] = defaultdict(lambda: (0.0, ""))


def record(group: str, where: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    if err >= WORST[group][0]:
        WORST[group] = (err, where)


LOWEST_COSINE: dict[str, tuple[float, str]] = defaultdict(lambda: (1.0, ""))


def record_cosine(group: str, where: str, cosine: float) -> None:
    if cosine <= LOWEST_COSINE[group][0]:
        LOWEST_COSINE[group] = (cosine, where)


def pytest_terminal_summary(terminalreporter) -> None:
    if WORST:
        terminalreporter.section("parity: worst max-abs error per fixture group")
        for group in sorted(WORST):
            err, where = WORST[group]
            terminalreporter.write_line(f"{group:<36} {err:.3e}  ({where})")
    if LOWEST_COSINE:
        terminalreporter.section("reduced precision: lowest cosine to the official fp32 outputs (normalized space)")
        for group in sorted(LOWEST_COSINE):
            cosine, where = LOWEST_COSINE[group]
            terminalreporter.write_line(f"{group:<36} {cosine:.6f}  ({where})")
