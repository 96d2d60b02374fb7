"""dilconv: fast, deterministic dilated convolution for numpy arrays.

Dilation d spaces a kernel's taps d pixels apart, so a k x k kernel sees a (k-1)*d+1 window
at k*k cost. Semantics follow torch.nn.functional.conv2d (cross-correlation, NCHW, OIHW).
"""
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
