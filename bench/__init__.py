"""Benchmark harness (not tests): ``python -m bench --size 15000``. See bench/README.md."""
