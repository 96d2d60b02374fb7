"""Doctest collection: dilconv/torch.py and dilconv/dask.py import optional dependencies."""
import importlib.util


def _has(module) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):        # ValueError: sys.modules[module] is None
        return False


collect_ignore = [path for module, path in (("torch", "dilconv/torch.py"),
                                            ("dask", "dilconv/dask.py"))
                  if not _has(module)]
