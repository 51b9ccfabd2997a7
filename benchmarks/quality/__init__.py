"""Training-quality harness (issue 11): ``python -m benchmarks.quality [--quick]``."""
