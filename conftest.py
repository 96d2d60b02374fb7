"""Doctest collection: dilconv/torch.py imports PyTorch, an optional dependency."""
import importlib.util


def _has_torch() -> bool:
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):        # ValueError: sys.modules["torch"] is None
        return False


collect_ignore = [] if _has_torch() else ["dilconv/torch.py"]
