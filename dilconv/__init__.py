"""dilconv: fast, deterministic dilated convolution for numpy arrays.

Dilation d spaces a kernel's taps d pixels apart, so a k x k kernel sees a (k-1)*d+1 window
at k*k cost. Semantics follow torch.nn.functional.conv2d (cross-correlation, NCHW, OIHW).
"""
import importlib.machinery as _machinery
import os as _os


def _check_built() -> None:
    """A source tree whose kernels were never compiled (e.g. the repository root after a
    non-editable ``pip install .``, which Python imports first) fails with a puzzling
    circular-import error deep inside; say what is wrong instead."""
    here = _os.path.dirname(_os.path.abspath(__file__))
    suffixes = tuple(_machinery.EXTENSION_SUFFIXES)
    if not any(name.endswith(suffixes) for name in _os.listdir(here)):
        raise ImportError(
            f"dilconv's compiled kernels are missing: {here} holds only the Python sources "
            f"(no {suffixes[0]} modules next to them), so this is an unbuilt source tree. "
            f"Build it in place with `python -m pip install -e .` (in the repository root), "
            f"or run Python from outside the source tree to use the installed dilconv.")


_check_built()

from ._api import Conv2dGrads, conv2d, conv2d_backward, output_shape
from ._config import show_config
from ._conv1d import conv1d, conv1d_backward
from ._threads import get_num_threads, set_num_threads
from ._transpose import conv_transpose2d, conv_transpose2d_backward
from .layers import Conv1d, Conv2d, ConvTranspose2d

__version__ = "0.1.0"

__all__ = ["conv2d", "conv2d_backward", "Conv2dGrads", "output_shape", "conv1d",
           "conv1d_backward", "conv_transpose2d", "conv_transpose2d_backward",
           "Conv2d", "Conv1d", "ConvTranspose2d", "get_num_threads", "set_num_threads",
           "show_config"]


def __getattr__(name):
    # dilconv.testing on first use, as numpy.testing (it is not needed to compute).
    if name == "testing":
        import importlib
        return importlib.import_module(".testing", __name__)
    raise AttributeError(f"module 'dilconv' has no attribute {name!r}")
