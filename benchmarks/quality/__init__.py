"""Training-quality harness: the losses ALSALS's variants reach on small CPU workloads, against
Adam and others (``python -m benchmarks.quality [--quick]``; benchmarks/quality/README.md)."""
