"""Transposed convolution as the adjoint of conv2d, on the conv2d kernels.

conv_transpose2d(x, w) is conv2d's input gradient with x in the role of grad_output, for the
conv2d whose weight is w (PyTorch's transposed layout (C_in, C_out/groups, kH, kW) is exactly
that conv2d's (O, C/groups, kH, kW)). Its input gradient is therefore a conv2d forward and its
weight gradient is conv2d's weight gradient with the two activations swapped.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from numpy.typing import ArrayLike

from . import _dispatch, _validate
from ._api import Conv2dGrads
from ._types import IntPair, Needs, Padding


def conv_transpose2d(input: ArrayLike, weight: ArrayLike, bias: Optional[ArrayLike] = None,
                     stride: IntPair = 1, padding: Padding = 0, output_padding: IntPair = 0,
                     groups: int = 1, dilation: IntPair = 1) -> np.ndarray:
    """2-D transposed convolution, as torch.nn.functional.conv_transpose2d (same argument
    order).

    Each input pixel scatters the kernel, scaled by its value, into the output: the adjoint
    of :func:`conv2d` with the same stride, padding, dilation and groups. Dilation d spaces
    the scattered taps d pixels apart.

    Parameters
    ----------
    input : array_like, (N, C_in, H, W) or (C_in, H, W)
    weight : array_like, (C_in, C_out/groups, kH, kW)
        PyTorch's transposed-convolution layout.
    bias : array_like (C_out,), optional
    stride, dilation : int or (int, int)
    padding : int, (int, int) or ((top, bottom), (left, right))
        Rows/columns removed from each side of the full output (as in PyTorch).
    output_padding : int or (int, int)
        Extra rows/columns added at the bottom/right; each must be smaller than the stride or
        the dilation of its axis.
    groups : int

    Returns
    -------
    ndarray of the input's float dtype, (N, C_out, Ho, Wo) or (C_out, Ho, Wo), with
    Ho = (H - 1)*stride - (top + bottom) + dilation*(kH - 1) + output_padding + 1.

    Examples
    --------
    >>> import numpy as np, dilconv
    >>> x = np.zeros((1, 1, 2, 2)); x[0, 0, 0, 0] = 1.0     # one impulse
    >>> w = np.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    >>> dilconv.conv_transpose2d(x, w, dilation=2)[0, 0]     # the kernel, dilated
    array([[1., 0., 2., 0.],
           [0., 0., 0., 0.],
           [3., 0., 4., 0.],
           [0., 0., 0., 0.]])
    """
    call, _ = _validate.transpose_call(input, weight, bias, stride, padding, output_padding,
                                       groups, dilation)
    spec = call.spec
    y = np.zeros(call.output_shape, dtype=call.dtype)
    if spec is not None and spec.n:
        _dispatch.grad_input(call.x, call.weight, y, spec)
    if call.bias is not None:
        y += call.bias[:, None, None]
    return y if call.batched else y[0]


def conv_transpose2d_backward(grad_output: ArrayLike, input: ArrayLike, weight: ArrayLike,
                              stride: IntPair = 1, padding: Padding = 0,
                              output_padding: IntPair = 0, groups: int = 1,
                              dilation: IntPair = 1, *,
                              needs: Needs = ("input", "weight", "bias")
                              ) -> Conv2dGrads:
    """Gradients of :func:`conv_transpose2d` with respect to input, weight and bias.

    Parameters
    ----------
    grad_output : array_like
        Gradient of the loss with respect to conv_transpose2d's output (its exact shape).
    input, weight, stride, padding, output_padding, groups, dilation
        As given to :func:`conv_transpose2d`.
    needs : iterable of {'input', 'weight', 'bias'}
        Which gradients to compute; the others are returned as None.

    Returns
    -------
    Conv2dGrads(input, weight, bias)

    Examples
    --------
    >>> import numpy as np, dilconv
    >>> x = np.ones((1, 1, 2, 2)); w = np.ones((1, 1, 2, 2))
    >>> y = dilconv.conv_transpose2d(x, w, dilation=2)
    >>> g = dilconv.conv_transpose2d_backward(np.ones_like(y), x, w, dilation=2)
    >>> g.input[0, 0], g.bias
    (array([[4., 4.],
           [4., 4.]]), array([16.]))
    """
    needs = _validate.check_needs(needs)
    call, extra = _validate.transpose_call(input, weight, None, stride, padding,
                                           output_padding, groups, dilation,
                                           extra={"grad_output": grad_output})
    spec, dtype, x = call.spec, call.dtype, call.x
    expected = call.output_shape
    gy = _validate.as_operand("grad_output", extra["grad_output"],
                              expected if call.batched else expected[1:], dtype)
    if not call.batched:
        gy = gy[None]
    # Empty output or batch: nothing flows, all gradients are zero.
    run = spec is not None and spec.n > 0
    grad_input = grad_weight = grad_bias = None
    if "input" in needs:
        grad_input = np.zeros(x.shape if spec is None else spec.output_shape, dtype=dtype)
        if run:
            _dispatch.forward(gy, call.weight, np.empty(0, dtype=dtype), grad_input, spec)
        h, w = call.input_hw
        grad_input = np.ascontiguousarray(grad_input[:, :, :h, :w])
        if not call.batched:
            grad_input = grad_input[0]
    if "weight" in needs:
        grad_weight = np.zeros(call.weight.shape, dtype=dtype)
        if run:
            # conv2d's weight gradient with its grad_output = our input, its input = gy.
            _dispatch.grad_weight(call.x, gy, grad_weight, spec)
    if "bias" in needs:
        grad_bias = gy.sum(axis=(0, 2, 3), dtype=dtype)
    return Conv2dGrads(grad_input, grad_weight, grad_bias)
