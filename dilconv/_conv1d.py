"""1-D dilated convolution (WaveNet / TCN) as a view onto the 2-D kernels.

(N, C, L) arrays are viewed as (N, C, 1, L) and weights (O, C/groups, k) as (O, C/groups, 1, k);
no data is copied and no loop is duplicated.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
from numpy.typing import ArrayLike

from . import _validate
from ._api import Conv2dGrads, conv2d, conv2d_backward
from ._types import Needs, PaddingMode

Int1d = Union[int, Tuple[int]]
Padding1d = Union[int, Tuple[int], Tuple[int, int], str]


def conv1d(input: ArrayLike, weight: ArrayLike, bias: Optional[ArrayLike] = None,
           stride: Int1d = 1, padding: Padding1d = 0, dilation: Int1d = 1, groups: int = 1,
           *, padding_mode: PaddingMode = "zeros", causal: bool = False,
           out: Optional[np.ndarray] = None) -> np.ndarray:
    """1-D dilated convolution (cross-correlation), as torch.nn.functional.conv1d.

    Dilation d spaces the k taps d samples apart: output t reads inputs t*stride - left_pad
    + j*d for j < k. Stacking layers with d = 1, 2, 4, ... gives the exponentially growing
    receptive field of WaveNet and TCNs.

    Parameters
    ----------
    input : array_like, (N, C, L) or (C, L)
    weight : array_like, (O, C/groups, k)
    bias : array_like (O,), optional
    stride, dilation : int or (int,)
    padding : int, (int,), (left, right), 'same' or 'valid'
    groups : int
    padding_mode : {'zeros', 'reflect', 'replicate', 'circular'}
    causal : bool
        Pad (k-1)*dilation on the left only, so output t depends on inputs <= t (with
        stride 1, the output has the input's length). Conflicts with a nonzero `padding`.
    out : ndarray, optional
        Where to write the result (exact shape and dtype).

    Returns
    -------
    ndarray of the input's float dtype, (N, O, Lo) or (O, Lo), with
    Lo = floor((L + left + right - dilation*(k-1) - 1) / stride) + 1.

    Examples
    --------
    >>> import numpy as np, dilconv
    >>> x = np.arange(6.0)[None, None]                      # (1, 1, 6)
    >>> w = np.array([[[1.0, -1.0]]])                       # y[t] = x[t-2] - x[t]
    >>> dilconv.conv1d(x, w, dilation=2, causal=True)
    array([[[ 0., -1., -2., -2., -2., -2.]]])
    """
    x, w, b, _, stride2, pads, dilation2 = _validate.conv1d_args(
        input, weight, bias, None, stride, padding, dilation, causal)
    out2 = None if out is None else _view_out(out)
    y = conv2d(x, w, b, stride2, pads, dilation2, groups, padding_mode=padding_mode,
               out=out2)
    return out if out is not None else y[..., 0, :]


def _view_out(out) -> np.ndarray:
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy ndarray, got {type(out).__name__}")
    return out[..., None, :]


def conv1d_backward(grad_output: ArrayLike, input: ArrayLike, weight: ArrayLike,
                    stride: Int1d = 1, padding: Padding1d = 0, dilation: Int1d = 1,
                    groups: int = 1, *, padding_mode: PaddingMode = "zeros",
                    causal: bool = False,
                    needs: Needs = ("input", "weight", "bias")) -> Conv2dGrads:
    """Gradients of :func:`conv1d` with respect to input, weight and bias.

    Parameters
    ----------
    grad_output : array_like
        Gradient of the loss with respect to conv1d's output (its exact shape).
    input, weight, stride, padding, dilation, groups, padding_mode, causal
        As given to :func:`conv1d`.
    needs : iterable of {'input', 'weight', 'bias'}
        Which gradients to compute; the others are returned as None.

    Returns
    -------
    Conv2dGrads(input, weight, bias)
        With the 1-D shapes of input (N, C, L), weight (O, C/groups, k) and bias (O,).

    Examples
    --------
    >>> import numpy as np, dilconv
    >>> x = np.arange(6.0)[None, None]; w = np.array([[[1.0, -1.0]]])
    >>> g = dilconv.conv1d_backward(np.ones((1, 1, 6)), x, w, dilation=2, causal=True)
    >>> g.input, g.weight
    (array([[[ 0.,  0.,  0.,  0., -1., -1.]]]), array([[[ 6., 15.]]]))
    """
    x, w, _, gy, stride2, pads, dilation2 = _validate.conv1d_args(
        input, weight, None, grad_output, stride, padding, dilation, causal)
    grads = conv2d_backward(gy, x, w, stride2, pads, dilation2, groups,
                            padding_mode=padding_mode, needs=needs)
    def squeeze(g):
        return None if g is None else g[..., 0, :]      # drop the height-1 axis (a view)

    return Conv2dGrads(squeeze(grads.input), squeeze(grads.weight), grads.bias)
