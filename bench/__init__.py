"""Microbenchmarks of dilconv against its peers on real layers: `python -m bench --help`."""
