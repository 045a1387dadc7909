"""The kernel benchmark harness: ``python -m benchmarks run --suite kernels`` (see README.md)."""
