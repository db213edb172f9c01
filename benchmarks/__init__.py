"""Benchmark binaries (absl apps). Run from the repository root: python -m benchmarks.NAME."""
