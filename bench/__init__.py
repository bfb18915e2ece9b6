"""Benchmarks of trio_dpsup: ``python -m bench [--quick]`` (see the README's Performance)."""
