"""Benchmarks (run_all.py runs the suite; gpu.sh the GPU rows)."""
