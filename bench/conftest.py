"""pytest-benchmark suites (not part of the default test run: ``python -m pytest bench``)."""

from tests.conftest import reference_dir  # noqa: F401  (the shared fixture-directory fixture)
