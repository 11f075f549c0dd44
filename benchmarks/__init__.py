"""Benchmarks: see _harness.py for the conventions (--quick, --out DIR, run(quick, out))."""
