"""Public functions: validate, dispatch to a kernel, return numpy arrays."""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np
from numpy.typing import ArrayLike

from . import _dispatch, _padding, _tuning, _validate
from ._types import IntPair, Needs, Padding, PaddingMode


class Conv2dGrads(NamedTuple):
    """Gradients of conv2d; an entry not asked for with `needs=` is None."""

    input: Optional[np.ndarray]
    weight: Optional[np.ndarray]
    bias: Optional[np.ndarray]


# The kernels' bias argument of a call without one: empty, so one array per dtype serves
# every call (read-only, as the kernels read it).
_NO_BIAS = {dtype: np.empty(0, dtype) for dtype in _validate.KERNEL_DTYPES}
for _empty in _NO_BIAS.values():
    _empty.flags.writeable = False


def _no_bias(dtype: np.dtype) -> np.ndarray:
    return _NO_BIAS[dtype]


def conv2d(input: ArrayLike, weight: ArrayLike, bias: Optional[ArrayLike] = None,
           stride: IntPair = 1, padding: Padding = 0, dilation: IntPair = 1, groups: int = 1,
           *, padding_mode: PaddingMode = "zeros",
           out: Optional[np.ndarray] = None) -> np.ndarray:
    """2-D dilated convolution (cross-correlation), as torch.nn.functional.conv2d.

    Dilation d spaces the taps of the kernel d pixels apart, so a k x k kernel covers a
    (k-1)*d+1 window at the cost of k*k multiply-adds:

        out[n, o, i, j] = bias[o] + sum over c, a, b of
                          weight[o, c, a, b] * input[n, c, i*stride - top + a*d,
                                                     j*stride - left + b*d]

    (c over the input channels of o's group; taps outside the input read the padding).
    With the 4 x 4 image and 2 x 2 kernel below and d = 2, out[0, 0] is
    2*x[0, 0] + 0*x[0, 2] + 1*x[2, 0] + 3*x[2, 2] = 2 + 0 + 3 + 3 = 8: a 3 x 3 window,
    2 x 2 outputs. A 256 x 256 image with a 3 x 3 kernel at d = 2 gives 252 x 252.

    Parameters
    ----------
    input : array_like, (N, C, H, W) or (C, H, W)
    weight : array_like, (O, C/groups, kH, kW)
    bias : array_like (O,), optional
    stride, dilation : int or (int, int)
    padding : int, (int, int), ((top, bottom), (left, right)), 'same' or 'valid'
        'same' (stride 1 only) keeps H x W, the odd pixel going bottom/right as in PyTorch.
    groups : int
        Input and output channels split into `groups` independent convolutions.
    padding_mode : {'zeros', 'reflect', 'replicate', 'circular'}
        What the padding contains, as in torch.nn.Conv2d: zeros, the mirror image without
        the edge (padding < size per side), copies of the edge pixel, or the opposite side
        of the image (padding <= size).
    out : ndarray, optional
        Where to write the result: exact output shape and dtype, not overlapping the
        inputs.

    Returns
    -------
    ndarray of the input's float dtype, (N, O, Ho, Wo) or (O, Ho, Wo) like the input, with
    Ho = floor((H + pad_top + pad_bottom - dilation*(kH-1) - 1) / stride) + 1 (same for Wo).

    Raises
    ------
    ValueError, TypeError
        For bad shapes, values, types or dtypes; the message names the argument.

    Examples
    --------
    >>> import numpy as np, dilconv
    >>> x = np.array([[1, 2, 3, 0], [0, 1, 2, 3], [3, 0, 1, 2], [2, 3, 0, 1]], float)
    >>> w = np.array([[2, 0], [1, 3]], float)
    >>> dilconv.conv2d(x[None, None], w[None, None], dilation=2)[0, 0]
    array([[ 8., 10.],
           [ 2.,  8.]])
    >>> dilconv.conv2d(x[None], w[None, None], dilation=2, padding="same",
    ...                padding_mode="circular").shape
    (1, 4, 4)
    """
    key = None
    if out is None:
        key = _validate.repeat_key(input, weight, bias, stride, padding, dilation, groups,
                                   padding_mode)
        if key is not None:
            y = _repeat_forward(key, input, weight, bias)
            if y is not None:
                return y
    call, _ = _validate.conv_call(input, weight, bias, stride, padding, dilation, groups,
                                  padding_mode, input_planes=True)
    call, _ = _padding.materialise(call)
    spec = call.spec
    if key is not None:
        _remember(key, spec, call.batched, ("forward",), call.dtype)
    shape = spec.output_shape if call.batched else spec.output_shape[1:]
    if out is not None:
        _validate.check_out(out, shape, call.dtype,
                            (("input", input), ("weight", weight), ("bias", bias)))
    # Kernels write into a C-contiguous, aligned batched array; any other `out` gets a copy.
    if out is not None and out.flags.c_contiguous and out.flags.aligned:
        y = out if call.batched else out[None]
    else:
        y = np.empty(spec.output_shape, dtype=call.dtype)
    if spec.n:
        bias_arr = call.bias if call.bias is not None else _no_bias(call.dtype)
        _dispatch.forward(call.x, call.weight, bias_arr, y, spec)
    result = y if call.batched else y[0]
    if out is not None:
        if result is not out and not np.shares_memory(result, out):
            out[...] = result
        return out
    return result


class _Repeat(NamedTuple):
    """What a call with a repeat_key found: its spec and the kernel family of each op it
    runs, under a tuning and DILCONV_PATH."""

    spec: object
    batched: bool
    tuning: object
    forced: Optional[str]
    paths: dict


# repeat key -> _Repeat: a layer called again and again skips validation and planning.
_REPEATS: dict = {}
REPEAT_ENTRIES = 256


def _remember(key, spec, batched: bool, ops, dtype) -> None:
    tuning, forced = _tuning.current(), _dispatch.forced_path()
    if len(_REPEATS) >= REPEAT_ENTRIES:
        _REPEATS.clear()
    _REPEATS[key] = _Repeat(spec, batched, tuning, forced,
                            {op: _dispatch.geometry_path(spec, op, tuning, forced,
                                                         dtype.itemsize)
                             for op in ops})


def _repeat(key) -> Optional[_Repeat]:
    """The entry remembered for `key` if it holds for the tuning and DILCONV_PATH in force."""
    entry = _REPEATS.get(key)
    if (entry is None or entry.tuning is not _tuning.current()
            or entry.forced != _dispatch.forced_path()):
        return None
    return entry


def _repeat_forward(key, input, weight, bias) -> Optional[np.ndarray]:
    """conv2d of a call whose key was remembered (see _repeat); None otherwise."""
    entry = _repeat(key)
    if entry is None:
        return None
    spec = entry.spec
    y = np.empty(spec.output_shape, dtype=input.dtype)
    if spec.n:
        _dispatch.forward(input if entry.batched else input[None], weight,
                          _no_bias(input.dtype) if bias is None else bias, y, spec,
                          entry.tuning, entry.paths["forward"])
    return y if entry.batched else y[0]


def _backward_key(grad_output, input, weight, stride, padding, dilation, groups,
                  padding_mode, needs):
    """conv2d_backward's repeat key (see _validate.repeat_key), or None."""
    key = _validate.repeat_key(input, weight, None, stride, padding, dilation, groups,
                               padding_mode)
    if (key is None or not _validate.is_plain(needs)
            or not _validate.as_is(grad_output, input.dtype)):
        return None
    return ("backward", key, grad_output.shape, needs)


def _repeat_backward(key, grad_output, input, weight) -> Optional[Conv2dGrads]:
    """conv2d_backward of a call whose key was remembered (see _repeat); None otherwise."""
    entry = _repeat(key)
    if entry is None:
        return None
    x, gy = (input, grad_output) if entry.batched else (input[None], grad_output[None])
    return _gradients(gy, x, weight, entry.spec, entry.batched, entry.paths, entry.tuning)


def conv2d_backward(grad_output: ArrayLike, input: ArrayLike, weight: ArrayLike,
                    stride: IntPair = 1, padding: Padding = 0, dilation: IntPair = 1,
                    groups: int = 1, *, padding_mode: PaddingMode = "zeros",
                    needs: Needs = ("input", "weight", "bias")) -> Conv2dGrads:
    """Gradients of conv2d with respect to input, weight and bias.

    Parameters
    ----------
    grad_output : array_like
        Gradient of the loss with respect to conv2d's output: exactly the forward output's
        shape.
    input, weight, stride, padding, dilation, groups, padding_mode
        As given to :func:`conv2d` (the bias does not affect any gradient). With a
        non-zero padding_mode the gradient of each padding pixel is added to the pixel it
        copies.
    needs : iterable of {'input', 'weight', 'bias'}
        Which gradients to compute; the others are returned as None.

    Returns
    -------
    Conv2dGrads(input, weight, bias)

    Examples
    --------
    >>> import numpy as np, dilconv
    >>> x = np.ones((1, 1, 4, 4)); w = np.ones((1, 1, 2, 2))
    >>> g = dilconv.conv2d_backward(np.ones((1, 1, 2, 2)), x, w, dilation=2)
    >>> g.bias, g.weight[0, 0]
    (array([4.]), array([[4., 4.],
           [4., 4.]]))
    """
    key = _backward_key(grad_output, input, weight, stride, padding, dilation, groups,
                        padding_mode, needs)
    if key is not None:
        grads = _repeat_backward(key, grad_output, input, weight)
        if grads is not None:
            return grads
    needs = _validate.check_needs(needs)
    call, extra = _validate.conv_call(input, weight, None, stride, padding, dilation, groups,
                                      padding_mode, extra={"grad_output": grad_output})
    call, pads = _padding.materialise(call)
    spec, dtype = call.spec, call.dtype
    expected = spec.output_shape if call.batched else spec.output_shape[1:]
    gy = _validate.as_operand("grad_output", extra["grad_output"], expected, dtype)
    if not call.batched:
        gy = gy[None]
    ops = tuple(op for op, name in (("grad_input", "input"), ("grad_weight", "weight"),
                                    ("grad_bias", "bias")) if name in needs)
    if key is not None:
        _remember(key, spec, call.batched, ops, dtype)
    return _gradients(gy, call.x, call.weight, spec, call.batched, dict.fromkeys(ops),
                      None, pads, call.padding_mode)


def _gradients(gy, x, weight, spec, batched: bool, paths: dict, tuning,
               pads: Optional[tuple] = None, padding_mode: str = "zeros") -> Conv2dGrads:
    """The gradients of the ops in `paths` (op -> kernel family, None: select's) of a
    validated call on batched arrays; `pads`: a padding mode's padding to fold back."""
    dtype = x.dtype
    grad_input = grad_weight = grad_bias = None
    if "grad_input" in paths:
        grad_input = np.zeros(x.shape, dtype=dtype)
        if spec.n:
            _dispatch.grad_input(gy, weight, grad_input, spec, tuning, paths["grad_input"])
        if pads is not None:
            grad_input = _padding.fold(grad_input, pads, padding_mode)
        if not batched:
            grad_input = grad_input[0]
    if "grad_weight" in paths:
        grad_weight = np.zeros(weight.shape, dtype=dtype)
        if spec.n:
            _dispatch.grad_weight(gy, x, grad_weight, spec, tuning, paths["grad_weight"])
    if "grad_bias" in paths:
        grad_bias = np.zeros(spec.o, dtype=dtype)
        if spec.n:
            _dispatch.grad_bias(gy, grad_bias, spec, tuning)
    return Conv2dGrads(grad_input, grad_weight, grad_bias)


def output_shape(input_shape: Sequence[int], weight_shape: Sequence[int], stride: IntPair = 1,
                 padding: Padding = 0, dilation: IntPair = 1, groups: int = 1) -> tuple:
    """Shape of conv2d's output for these shapes and arguments, without computing it.

    >>> import dilconv
    >>> dilconv.output_shape((1, 3, 256, 256), (16, 3, 3, 3), dilation=2)
    (1, 16, 252, 252)
    """
    for name, shape in (("input_shape", input_shape), ("weight_shape", weight_shape)):
        if not _validate._is_sequence(shape) or not all(
                isinstance(s, (int, np.integer)) and not isinstance(s, (bool, np.bool_))
                for s in shape):
            raise TypeError(f"{name} must be a tuple of ints, got {shape!r}")
    spec = _validate.make_spec(tuple(input_shape), tuple(weight_shape), stride, padding,
                               dilation, groups)
    return spec.output_shape if len(input_shape) == 4 else spec.output_shape[1:]
