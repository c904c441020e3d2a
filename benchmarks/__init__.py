"""Benchmarks of raypipe against its peers; `python -m benchmarks` runs them (see benchmarks/RESULTS.md)."""
