"""The ``lcm-fast`` command line (``python -m lcm_fast.cli``)."""
