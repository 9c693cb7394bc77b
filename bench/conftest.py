"""pytest-benchmark suites (not part of the default test run: ``python -m pytest bench``)."""

from tests.conftest import faiss, reference_dir  # noqa: F401  (the shared fixtures)
