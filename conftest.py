"""Doctests of optional modules run only when their dependencies are installed."""
import importlib.util

collect_ignore = [] if importlib.util.find_spec("dask") else ["dilconv/dask.py"]
