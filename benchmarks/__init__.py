"""Benchmark scripts: each prints measured figures (and ratios against targets) for docs/BENCHMARKS.md."""
