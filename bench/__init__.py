"""Benchmarks of dilconv (run as modules: python -m bench.<name>)."""
