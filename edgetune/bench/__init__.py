"""Benchmarks: speed against a baseline measured in the same run."""
