"""Layer objects with PyTorch's constructor, initialisation, repr and state_dict.

A model's ``nn.Conv2d`` / ``nn.Conv1d`` / ``nn.ConvTranspose2d`` becomes ``dilconv.Conv2d`` /
``Conv1d`` / ``ConvTranspose2d`` with the same arguments; weights move with ``state_dict()``
and ``load_state_dict()`` (numpy arrays here, tensors there).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Optional, Union

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from . import _validate
from ._api import conv2d, conv2d_backward
from ._conv1d import conv1d, conv1d_backward
from ._transpose import conv_transpose2d, conv_transpose2d_backward
from ._types import PaddingMode

__all__ = ["Conv1d", "Conv2d", "ConvTranspose2d"]

Seed = Union[None, int, np.random.Generator, np.random.SeedSequence]


class IncompatibleKeys(NamedTuple):
    """What load_state_dict(strict=False) skipped (as PyTorch's return value)."""

    missing_keys: list
    unexpected_keys: list


def _float_dtype(dtype) -> np.dtype:
    """float32 or float64, from a numpy dtype or PyTorch's (torch.float64 -> float64)."""
    if type(dtype).__module__ == "torch":
        dtype = str(dtype).replace("torch.", "")
    try:
        result = np.dtype(dtype)
    except TypeError:
        result = None
    if result not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    return result


def _check_device(device) -> None:
    """PyTorch's device= argument: dilconv computes on the CPU only."""
    if device is not None and str(device) != "cpu":
        raise ValueError(f"device must be None or 'cpu' (dilconv runs on the CPU), got "
                         f"{device!r}")


class _ConvNd:
    """Shared state and behaviour; subclasses say which functional computes them."""

    _ndim = 2
    _transposed = False

    def _setup(self, in_channels, out_channels, kernel_size, stride, padding, dilation,
               groups, bias, padding_mode, dtype, rng, output_padding=0) -> None:
        name = type(self).__name__
        self.in_channels = _validate.positive_int("in_channels", in_channels)
        self.out_channels = _validate.positive_int("out_channels", out_channels)
        self.groups = _validate.positive_int("groups", groups)
        for what, count in (("in_channels", self.in_channels),
                            ("out_channels", self.out_channels)):
            if count % self.groups:
                raise ValueError(f"{what}={count} must be divisible by groups={self.groups}")
        self.kernel_size = self._ints("kernel_size", kernel_size, 1)
        self.stride = self._ints("stride", stride, 1)
        self.dilation = self._ints("dilation", dilation, 1)
        self.output_padding = self._ints("output_padding", output_padding, 0)
        self.padding = self._padding(padding)
        self.padding_mode = _validate.check_padding_mode(padding_mode)
        if self._transposed and self.padding_mode != "zeros":
            raise ValueError(f'Only "zeros" padding mode is supported for {name}, got '
                             f'padding_mode={padding_mode!r}')
        self.dtype = _float_dtype(dtype)
        if self._transposed:
            shape = (self.in_channels, self.out_channels // self.groups) + self.kernel_size
        else:
            shape = (self.out_channels, self.in_channels // self.groups) + self.kernel_size
        # PyTorch's reset_parameters: kaiming_uniform_(a=sqrt(5)) has bound
        # sqrt(6 / ((1 + a^2) fan_in)) = 1/sqrt(fan_in), the bias the same bound.
        bound = 1.0 / math.sqrt(shape[1] * math.prod(self.kernel_size))
        gen = np.random.default_rng(rng)
        self.weight = gen.uniform(-bound, bound, shape).astype(self.dtype)
        self.bias = (gen.uniform(-bound, bound, self.out_channels).astype(self.dtype)
                     if bias else None)
        self.weight_grad: Optional[np.ndarray] = None
        self.bias_grad: Optional[np.ndarray] = None
        self._input: Optional[np.ndarray] = None

    def _ints(self, name: str, value, minimum: int) -> tuple:
        if self._ndim == 1:
            return (_validate._int_1d(name, value, minimum),)
        return _validate.int_pair(name, value, minimum)

    def _padding(self, padding):
        if self._transposed:
            _validate.check_transpose_padding(padding, type(self).__name__)
        if isinstance(padding, str):
            # The functional's own rules ('same' needs stride 1), on the 2-D geometry.
            ones = (1,) * (2 - self._ndim)
            _validate.padding_amounts(padding, ones + self.kernel_size, ones + self.stride,
                                      ones + self.dilation)
            return padding
        if self._ndim == 1:
            if _validate._is_sequence(padding) and len(padding) == 2:
                return tuple(_validate.int_pair("padding", padding, 0))   # (left, right)
            return (_validate._int_1d("padding", padding, 0),)
        (t, b), (l, r) = _validate.padding_amounts(padding, self.kernel_size, self.stride,
                                                   self.dilation)
        # Symmetric amounts print as PyTorch's (h, w); asymmetric ones stay nested.
        return (t, l) if (t, l) == (b, r) else ((t, b), (l, r))

    # Computation -------------------------------------------------------------------------
    def _forward(self, x, weight, bias) -> np.ndarray:
        raise NotImplementedError

    def _backward(self, grad_output, x, weight, needs) -> Any:
        raise NotImplementedError

    def forward(self, input: ArrayLike) -> np.ndarray:
        """The layer's output for `input`; remembers `input` for :meth:`backward`."""
        # Converted as the functional would (lists take the layer's dtype), and kept so.
        arrays, _ = _validate.intake({"input": input, "weight": self.weight})
        self._input = arrays["input"]
        return self._forward(self._input, self.weight, self.bias)

    __call__ = forward

    def backward(self, grad_output: ArrayLike) -> np.ndarray:
        """Gradient with respect to the last forward's input.

        Also stores the gradients of the parameters in ``weight_grad`` and ``bias_grad``
        (replacing earlier ones, not accumulating). The input given to forward must not have
        been modified since.
        """
        if self._input is None:
            raise RuntimeError(f"{type(self).__name__}.backward() needs a forward() call "
                               f"first")
        needs = ("input", "weight") + (("bias",) if self.bias is not None else ())
        grads = self._backward(grad_output, self._input, self.weight, needs)
        self.weight_grad, self.bias_grad = grads.weight, grads.bias
        return grads.input

    # PyTorch interoperability -------------------------------------------------------------
    def extra_repr(self) -> str:
        """Arguments as in PyTorch's ``repr`` (defaults left out)."""
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}")
        if self.padding != (0,) * len(self.padding):
            s += f", padding={self.padding}"
        if self.dilation != (1,) * self._ndim:
            s += f", dilation={self.dilation}"
        if self.output_padding != (0,) * self._ndim:
            s += f", output_padding={self.output_padding}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return s

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    def state_dict(self) -> dict:
        """{'weight': ..., 'bias': ...} (no 'bias' without one): the layer's own arrays.

        For a PyTorch module: ``module.load_state_dict({k: torch.from_numpy(v) for k, v in
        layer.state_dict().items()})``.

        >>> import dilconv
        >>> {k: v.shape for k, v in dilconv.Conv2d(2, 4, 3).state_dict().items()}
        {'weight': (4, 2, 3, 3), 'bias': (4,)}
        """
        state = {"weight": self.weight}
        if self.bias is not None:
            state["bias"] = self.bias
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any],
                        strict: bool = True) -> IncompatibleKeys:
        """Copy 'weight' (and 'bias') into the layer, cast to its dtype.

        Values may be numpy arrays or anything ``numpy.asarray`` takes, including CPU torch
        tensors, so ``layer.load_state_dict(module.state_dict())`` works directly.

        >>> import numpy as np, dilconv
        >>> layer = dilconv.Conv1d(1, 1, 2, bias=False)
        >>> layer.load_state_dict({"weight": [[[1.0, -1.0]]]})
        IncompatibleKeys(missing_keys=[], unexpected_keys=[])
        >>> layer(np.array([[1, 4, 9]], np.float32))        # the layer's dtype: float32
        array([[-3., -5.]], dtype=float32)
        """
        expected = self.state_dict()
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected]
        if strict and (missing or unexpected):
            raise ValueError(f"state_dict does not match {type(self).__name__}: missing "
                             f"keys {missing}, unexpected keys {unexpected}")
        values = {}
        for key, target in expected.items():
            if key not in state_dict:
                continue
            value = state_dict[key]
            if hasattr(value, "detach"):            # a torch tensor: no autograd, CPU
                value = value.detach().cpu()
            value = _validate.as_array(f"state_dict[{key!r}]", value)
            if value.shape != target.shape:
                raise ValueError(f"state_dict[{key!r}] has shape {value.shape}, the layer "
                                 f"needs {target.shape}")
            values[key] = value
        for key, value in values.items():       # all checked before anything is changed
            expected[key][...] = value
        return IncompatibleKeys(missing, unexpected)


class _Conv(_ConvNd):
    """Conv2d / Conv1d: PyTorch's constructor; `_function` computes them."""

    _function: Any
    _function_backward: Any

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1,
                 padding=0, dilation=1, groups: int = 1, bias: bool = True,
                 padding_mode: PaddingMode = "zeros", device=None,
                 dtype: DTypeLike = np.float32, rng: Seed = None) -> None:
        _check_device(device)
        self._setup(in_channels, out_channels, kernel_size, stride, padding, dilation,
                    groups, bias, padding_mode, dtype, rng)

    def _forward(self, x, weight, bias):
        return self._function(x, weight, bias, self.stride, self.padding, self.dilation,
                              self.groups, padding_mode=self.padding_mode)

    def _backward(self, grad_output, x, weight, needs):
        return self._function_backward(grad_output, x, weight, self.stride, self.padding,
                                       self.dilation, self.groups,
                                       padding_mode=self.padding_mode, needs=needs)


class Conv2d(_Conv):
    """2-D (dilated) convolution layer, as torch.nn.Conv2d.

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size, stride, dilation : int or (int, int)
    padding : int, (int, int), ((top, bottom), (left, right)), 'same' or 'valid'
    groups : int
    bias : bool
    padding_mode : {'zeros', 'reflect', 'replicate', 'circular'}
    device : None or 'cpu'
        Accepted for PyTorch's signature; dilconv computes on the CPU.
    dtype : float32 (default) or float64
        numpy's or PyTorch's (torch.float64 works too).
    rng : None, int or numpy.random.Generator
        Seed for PyTorch's default initialisation: weight and bias uniform in
        +-1/sqrt(in_channels/groups * kH * kW).

    Attributes
    ----------
    weight : ndarray (out_channels, in_channels/groups, kH, kW)
    bias : ndarray (out_channels,) or None
    weight_grad, bias_grad : ndarray or None
        Set by :meth:`backward`.

    Examples
    --------
    >>> import numpy as np, dilconv
    >>> layer = dilconv.Conv2d(3, 8, 3, padding=2, dilation=2, rng=0)
    >>> layer
    Conv2d(3, 8, kernel_size=(3, 3), stride=(1, 1), padding=(2, 2), dilation=(2, 2))
    >>> x = np.ones((1, 3, 16, 16), np.float32)
    >>> y = layer(x); y.shape
    (1, 8, 16, 16)
    >>> layer.backward(np.ones_like(y)).shape, layer.weight_grad.shape
    ((1, 3, 16, 16), (8, 3, 3, 3))
    """

    _ndim = 2
    _function = staticmethod(conv2d)
    _function_backward = staticmethod(conv2d_backward)


class Conv1d(_Conv):
    """1-D (dilated) convolution layer, as torch.nn.Conv1d (WaveNet / TCN layers).

    Arguments as :class:`Conv2d` with ints (or 1-tuples) for kernel_size, stride, dilation;
    `padding` is an int, (p,), (left, right), 'same' or 'valid'. Input (N, C, L) or (C, L);
    weight (out_channels, in_channels/groups, k).

    Examples
    --------
    >>> import numpy as np, dilconv
    >>> dilconv.Conv1d(16, 16, 2, dilation=4, bias=False)
    Conv1d(16, 16, kernel_size=(2,), stride=(1,), dilation=(4,), bias=False)
    >>> causal = dilconv.Conv1d(1, 1, 2, padding=(4, 0), dilation=4, rng=0)
    >>> causal(np.zeros((1, 1, 100), np.float32)).shape
    (1, 1, 100)
    """

    _ndim = 1
    _function = staticmethod(conv1d)
    _function_backward = staticmethod(conv1d_backward)


class ConvTranspose2d(_ConvNd):
    """2-D transposed convolution layer, as torch.nn.ConvTranspose2d (same argument order).

    Weight (in_channels, out_channels/groups, kH, kW); initialised as PyTorch does, with
    fan_in = out_channels/groups * kH * kW. Only padding_mode='zeros', as in PyTorch.

    Examples
    --------
    >>> import numpy as np, dilconv
    >>> up = dilconv.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1, rng=0)
    >>> up
    ConvTranspose2d(4, 2, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), output_padding=(1, 1))
    >>> up(np.zeros((1, 4, 8, 8), np.float32)).shape
    (1, 2, 16, 16)
    """

    _ndim = 2
    _transposed = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1,
                 padding=0, output_padding=0, groups: int = 1, bias: bool = True,
                 dilation=1, padding_mode: PaddingMode = "zeros", device=None,
                 dtype: DTypeLike = np.float32, rng: Seed = None) -> None:
        _check_device(device)
        self._setup(in_channels, out_channels, kernel_size, stride, padding, dilation,
                    groups, bias, padding_mode, dtype, rng, output_padding)

    def _forward(self, x, weight, bias):
        return conv_transpose2d(x, weight, bias, self.stride, self.padding,
                                self.output_padding, self.groups, self.dilation)

    def _backward(self, grad_output, x, weight, needs):
        return conv_transpose2d_backward(grad_output, x, weight, self.stride, self.padding,
                                         self.output_padding, self.groups, self.dilation,
                                         needs=needs)
