"""Testing helpers, like ``numpy.testing``: dilconv's oracle with the derived error bounds.

For code built on dilconv (your own kernels, layers, wrappers) and for dilconv's own tests,
fuzz lab and benchmarks: one place that says what a convolution's result should be and how
far a float32/float64 computation may stray from it.

- :func:`assert_conv_close` checks the result of a call against the independent oracle
  (:mod:`dilconv.reference`: ``scipy.signal.correlate2d`` on zero-inserted kernels), element
  by element, within ``c*K*eps*sum|a||b|`` (:mod:`dilconv.tolerance`).
- :func:`expected` returns the oracle's values and bounds for a call, shaped as dilconv
  returns them; the ``*_expected`` functions do the same on normalised, batched arguments.
- :func:`pad` and :func:`fold` are the padding modes on the oracle's side, built on
  ``numpy.pad`` (not on dilconv's own padding code).
- :class:`TorchReference` runs PyTorch behind dilconv's signatures (a second opinion).

>>> import numpy as np, dilconv, dilconv.testing
>>> rng = np.random.default_rng(0)
>>> x = rng.standard_normal((2, 4, 12, 12)).astype(np.float32)
>>> w = rng.standard_normal((8, 2, 3, 3)).astype(np.float32)
>>> y = dilconv.conv2d(x, w, None, 1, "same", 2, 2, padding_mode="reflect")
>>> ratio = dilconv.testing.assert_conv_close(y, "conv2d", x, w, None, 1, "same", 2, 2,
...                                           padding_mode="reflect")
>>> bool(ratio <= 1)                     # worst error / bound, returned for the record
True
>>> dilconv.testing.assert_conv_close(y + 1e-3, "conv2d", x, w, None, 1, "same", 2, 2,
...                                   padding_mode="reflect")
Traceback (most recent call last):
...
AssertionError: conv2d output: off by ... x the derived error bound at index ...
"""
from __future__ import annotations

import inspect
import warnings
from types import SimpleNamespace
from typing import NamedTuple, Optional

import numpy as np

from . import _padding, _validate, reference, tolerance

__all__ = ["Expected", "NUMPY_PAD_MODES", "OPS", "TorchReference", "assert_conv_close",
           "assert_expected", "compare", "conv2d_backward_expected", "conv2d_expected",
           "conv_transpose2d_backward_expected", "conv_transpose2d_expected", "expected",
           "fold", "pad", "terms"]

# PyTorch's padding modes as numpy.pad modes (the same within PyTorch's size limits).
NUMPY_PAD_MODES = {"zeros": "constant", **_padding.NUMPY_MODES}
# Public functions `expected` and `assert_conv_close` know, and the names of their outputs.
OPS = {"conv2d": ("output",), "conv1d": ("output",), "conv_transpose2d": ("output",),
       "conv2d_backward": ("input", "weight", "bias"),
       "conv1d_backward": ("input", "weight", "bias"),
       "conv_transpose2d_backward": ("input", "weight", "bias")}
ZERO = ((0, 0), (0, 0))


class Expected(NamedTuple):
    """The oracle's value of one output (float64) and what bounds its error."""

    value: np.ndarray        # float64
    abs_sum: np.ndarray      # sum |a||b| over the terms of each element
    terms: int               # K: terms summed into one element (an upper bound)

    def bound(self, dtype, sides: int = 1) -> np.ndarray:
        """Per-element bound for a result computed in `dtype`; `sides=2` when the other
        side is not the oracle but another rounded computation (a peer)."""
        return sides * tolerance.error_bound(self.abs_sum, self.terms, dtype)

    def plus_bias(self, bias) -> "Expected":
        """Plus a per-channel bias (axis 1), one more term of each sum."""
        if bias is None:
            return self
        b = np.asarray(bias, np.float64).reshape((1, -1) + (1,) * (self.value.ndim - 2))
        return Expected(self.value + b, self.abs_sum + np.abs(b), self.terms + 1)

    def reshape(self, shape) -> "Expected":
        return Expected(self.value.reshape(shape), self.abs_sum.reshape(shape), self.terms)


# --- the padding modes, on the oracle's side ------------------------------------------

def pad(x, pads, mode: str) -> np.ndarray:
    """`x` (..., H, W) padded by ((top, bottom), (left, right)) in PyTorch's `mode`."""
    widths = ((0, 0),) * (np.ndim(x) - 2) + tuple(tuple(p) for p in pads)
    return np.pad(x, widths, mode=NUMPY_PAD_MODES[mode])


def fold(grad_padded, size, pads, mode: str) -> tuple:
    """Gradient of ``pad(x, pads, mode)`` with respect to x (H, W = `size`): each padded
    pixel's gradient added to the pixel it copies. Returns (gradient, most copies of one
    pixel), the latter for the error bound."""
    h, w = size
    index = pad(np.arange(h * w).reshape(h, w), pads, mode)
    lead = grad_padded.shape[:-2]
    rows = int(np.prod(lead))
    flat = np.asarray(grad_padded, np.float64).reshape(rows, index.size)
    targets = (index.ravel()[None, :] + (np.arange(rows) * h * w)[:, None]).ravel()
    folded = np.bincount(targets, weights=flat.ravel(), minlength=rows * h * w)
    copies = int(np.bincount(index.ravel(), minlength=h * w).max())
    return folded.reshape(lead + (h, w)), copies


# --- the oracle on normalised arguments -----------------------------------------------

def _f64(a):
    return None if a is None else np.asarray(a, np.float64)


def _geometry(x_shape, w_shape, stride, pads, dilation, groups) -> SimpleNamespace:
    """The fields dilconv.tolerance reads, from shapes (no validation: the oracle's own)."""
    n, c, h, w = x_shape
    o, _, kh, kw = w_shape
    ho, wo = (reference._out_size(size, k, s, d, *p) for size, k, s, d, p in zip(
        (h, w), (kh, kw), stride, dilation, pads))
    return SimpleNamespace(n=n, c=c, h=h, w=w, o=o, kh=kh, kw=kw, ho=ho, wo=wo,
                           groups=groups)


def terms(spec, backward: bool = False, bias: bool = False) -> tuple:
    """K, the terms summed into one element, of each output of a conv2d with the geometry
    `spec` (a ConvSpec, or anything with its fields): (forward,) or, for the backward,
    (input, weight, bias) gradients."""
    if backward:
        k_w = tolerance.grad_weight_terms(spec)
        return (tolerance.grad_input_terms(spec), k_w, k_w)
    return (tolerance.forward_terms(spec, bias),)


def conv2d_expected(x, w, b, stride, pads, dilation, groups, mode="zeros") -> Expected:
    """The oracle's conv2d of batched x (N, C, H, W), w (O, C/groups, kH, kW), bias b or
    None; stride and dilation (h, w) pairs, pads ((top, bottom), (left, right)), PyTorch's
    padding `mode`."""
    x, w = _f64(x), _f64(w)
    if mode != "zeros":
        x, pads = pad(x, pads, mode), ZERO
    args = (tuple(stride), tuple(map(tuple, pads)), tuple(dilation), groups)
    spec = _geometry(x.shape, w.shape, *args)
    return Expected(reference.conv2d_reference(x, w, None, *args),
                    reference.conv2d_reference_abs(x, w, *args),
                    terms(spec)[0]).plus_bias(b)


def conv2d_backward_expected(gy, x, w, stride, pads, dilation, groups,
                             mode="zeros") -> tuple:
    """(input, weight, bias) gradients of :func:`conv2d_expected`'s convolution for the
    batched grad_output `gy`, as three :class:`Expected`."""
    gy, x, w = _f64(gy), _f64(x), _f64(w)
    size, mode_pads = x.shape[2:], pads
    if mode != "zeros":
        x, pads = pad(x, pads, mode), ZERO
    args = (tuple(stride), tuple(map(tuple, pads)), tuple(dilation), groups)
    spec = _geometry(x.shape, w.shape, *args)
    gx, gw, gb = reference.conv2d_backward_reference(gy, x, w, *args)
    ax, aw, ab = reference.conv2d_backward_reference_abs(gy, x, w, *args)
    copies = 1
    if mode != "zeros":
        gx, copies = fold(gx, size, mode_pads, mode)
        ax, _ = fold(ax, size, mode_pads, mode)
    k_in, k_w, k_b = terms(spec, backward=True)
    return (Expected(gx, ax, k_in * copies), Expected(gw, aw, k_w), Expected(gb, ab, k_b))


def _transposed(x_shape, w_shape, stride, pads, output_padding, dilation, groups):
    """The conv2d geometry whose adjoint conv_transpose2d is: its input shape."""
    n, _, h, wd = x_shape
    out_hw = [(size - 1) * s - lo - hi + d * (k - 1) + op + 1 for size, k, s, d, op, (lo, hi)
              in zip((h, wd), w_shape[2:], stride, dilation, output_padding, pads)]
    return (n, w_shape[1] * groups) + tuple(out_hw)


def _extend(x, spec):
    """x with zero rows/columns at the bottom/right: the adjoint conv2d's output shape."""
    return np.pad(x, ((0, 0), (0, 0), (0, spec.ho - x.shape[2]), (0, spec.wo - x.shape[3])))


def conv_transpose2d_expected(x, w, b, stride, pads, output_padding, dilation,
                              groups) -> Expected:
    """The oracle's conv_transpose2d of batched x (N, C_in, H, W), w (C_in, C_out/groups,
    kH, kW): the input gradient of the conv2d it is the adjoint of."""
    x, w = _f64(x), _f64(w)
    shape = _transposed(x.shape, w.shape, stride, pads, output_padding, dilation, groups)
    spec = _geometry(shape, w.shape, stride, pads, dilation, groups)
    gx = conv2d_backward_expected(_extend(x, spec), np.zeros(shape), w, stride, pads,
                                  dilation, groups)[0]
    return gx.plus_bias(b)


def conv_transpose2d_backward_expected(gy, x, w, stride, pads, output_padding, dilation,
                                       groups) -> tuple:
    """(input, weight, bias) gradients of :func:`conv_transpose2d_expected`'s call."""
    gy, x, w = _f64(gy), _f64(x), _f64(w)
    spec = _geometry(gy.shape, w.shape, stride, pads, dilation, groups)
    h, wd = x.shape[2:]
    gx = conv2d_expected(gy, w, None, stride, pads, dilation, groups)
    gw = conv2d_backward_expected(_extend(x, spec), gy, w, stride, pads, dilation,
                                  groups)[1]
    gb = Expected(gy.sum(axis=(0, 2, 3)), np.abs(gy).sum(axis=(0, 2, 3)),
                  max(1, gy.shape[0] * gy.shape[2] * gy.shape[3]))
    return (Expected(gx.value[:, :, :h, :wd], gx.abs_sum[:, :, :h, :wd], gx.terms), gw, gb)


# --- the oracle for a public call -------------------------------------------------------

def _bound_args(op: str, args, kwargs) -> dict:
    import dilconv
    if op not in OPS:
        raise ValueError(f"op must be one of {sorted(OPS)}, got {op!r}")
    bound = inspect.signature(getattr(dilconv, op)).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _squeeze_height(exp: Expected, drop: bool) -> Expected:
    return exp.reshape(exp.value.shape[:-2] + exp.value.shape[-1:]) if drop else exp


def expected(op, *args, **kwargs) -> tuple:
    """The oracle's results for ``dilconv.<op>(*args, **kwargs)``, one :class:`Expected`
    per output (the forward functions have one, the backward ones three: input, weight and
    bias, whatever `needs` says), shaped as dilconv returns them.

    `op` is a public function or its name (:data:`OPS`). Arguments are read as dilconv
    reads them (its validator normalises padding forms, dtypes and unbatched input); the
    values are the oracle's own, computed in float64.
    """
    op = getattr(op, "__name__", op)
    a = _bound_args(op, args, kwargs)
    backward = op.endswith("_backward")
    if op.startswith("conv_transpose2d"):
        arrays, _ = _validate.intake({k: a.get(k) for k in ("input", "weight", "bias",
                                                            "grad_output") if k in a})
        x, w = arrays["input"], arrays["weight"]
        batched = x.ndim == 4
        stride = _validate.int_pair("stride", a["stride"], 1)
        dilation = _validate.int_pair("dilation", a["dilation"], 1)
        geometry = (stride, _validate.padding_amounts(a["padding"], w.shape[2:], stride,
                                                      dilation),
                    _validate.int_pair("output_padding", a["output_padding"], 0), dilation,
                    a["groups"])
        x4 = x if batched else x[None]
        if backward:
            gy = arrays["grad_output"]
            results = conv_transpose2d_backward_expected(gy if batched else gy[None], x4, w,
                                                         *geometry)
        else:
            results = (conv_transpose2d_expected(x4, w, arrays.get("bias"), *geometry),)
        flat = False
    else:
        flat = op.startswith("conv1d")
        if flat:
            x, w, b, gy, stride, padding, dilation = _validate.conv1d_args(
                a["input"], a["weight"], a.get("bias"), a.get("grad_output"), a["stride"],
                a["padding"], a["dilation"], a["causal"])
        else:
            x, w, b, gy = a["input"], a["weight"], a.get("bias"), a.get("grad_output")
            stride, padding, dilation = a["stride"], a["padding"], a["dilation"]
        extra = {"grad_output": gy} if backward else None
        call, extra = _validate.conv_call(x, w, b, stride, padding, dilation, a["groups"],
                                          a["padding_mode"], extra=extra)
        spec = call.spec
        batched = call.batched
        geometry = (spec.stride, spec.padding, spec.dilation, spec.groups, call.padding_mode)
        if backward:
            gy = extra["grad_output"]
            results = conv2d_backward_expected(gy if batched else gy[None], call.x,
                                               call.weight, *geometry)
        else:
            results = (conv2d_expected(call.x, call.weight, call.bias, *geometry),)
    out = []
    for name, exp in zip(OPS[op], results):
        if name in ("output", "input"):
            exp = _squeeze_height(exp, flat)
            if not batched:
                exp = exp.reshape(exp.value.shape[1:])
        elif name == "weight":
            exp = _squeeze_height(exp, flat)
        out.append(exp)
    return tuple(out)


# --- comparisons --------------------------------------------------------------------------

def compare(got, exp: Expected, dtype, sides: int = 1) -> dict:
    """The worst element of |got - expected| / bound: its ratio (> 1 fails), error, bound,
    index and values, and the largest error anywhere (max_err)."""
    bound = exp.bound(dtype, sides)
    ratio = tolerance.worst_ratio(got, exp.value, bound)
    info = {"ratio": ratio, "max_err": 0.0, "bound": 0.0, "index": None}
    got = np.asarray(got)
    if got.size:
        err = np.abs(got.astype(np.float64) - exp.value)
        err = np.where(np.isnan(err), np.inf, err)
        where = np.unravel_index(int(np.argmax(err / bound)), err.shape)
        info.update(max_err=float(err.max()), err=float(err[where]),
                    bound=float(bound[where]), index=[int(i) for i in where],
                    got=float(got[where]), expected=float(exp.value[where]))
    return info


def assert_expected(got, exp: Expected, dtype, sides: int = 1, what: str = "") -> float:
    """Assert `got` (computed in `dtype`) is within the bound of `exp`; returns the worst
    ratio of error to bound."""
    got = np.asarray(got)
    if got.shape != exp.value.shape:
        raise AssertionError(f"{what}: shape {got.shape}, expected {exp.value.shape}")
    info = compare(got, exp, dtype, sides)
    if not info["ratio"] <= 1.0:
        raise AssertionError(
            f"{what}: off by {info['ratio']:.3g} x the derived error bound at index "
            f"{tuple(info['index'] or ())}: got {info.get('got')!r}, expected "
            f"{info.get('expected')!r}, bound {info['bound']:.3g}")
    return info["ratio"]


def assert_conv_close(actual, op, *args, sides: int = 1, **kwargs) -> float:
    """Assert `actual` is ``dilconv.<op>(*args, **kwargs)`` within the derived bound.

    `actual`: the array a forward function returns, or the (input, weight, bias) triple a
    backward one returns (``Conv2dGrads``; None entries, not asked for, are skipped). It may
    come from any implementation: your kernel, a layer, a wrapper. The bound is that of a
    sum computed in `actual`'s float dtype; ``sides=2`` when the reference you mean to match
    is itself rounded (another library). Returns the worst error / bound ratio (<= 1).
    Raises AssertionError naming the output, the worst element and its bound.
    """
    name = getattr(op, "__name__", op)
    exps = expected(name, *args, **kwargs)
    outputs = (actual,) if len(exps) == 1 else tuple(actual)
    if len(outputs) != len(exps):
        raise AssertionError(f"{name}: {len(outputs)} results, expected {len(exps)}")
    worst = 0.0
    for label, got, exp in zip(OPS[name], outputs, exps):
        if got is None:
            continue
        got = np.asarray(got)
        dtype = got.dtype if got.dtype in (np.float32, np.float64) else np.float64
        worst = max(worst, assert_expected(got, exp, dtype, sides, f"{name} {label}"))
    return worst


# --- PyTorch as a second opinion ----------------------------------------------------------

class TorchReference:
    """``torch.nn.functional``'s conv2d, conv1d and conv_transpose2d behind dilconv's
    signatures (``F.pad`` for asymmetric padding and the padding modes, as the nn layers
    do; gradients from autograd), returning numpy arrays. Needs PyTorch.

    `threads`: ``torch.set_num_threads`` at construction (None leaves it).
    """

    def __init__(self, threads: Optional[int] = None):
        import torch
        if threads is not None:
            torch.set_num_threads(threads)
        # padding='same' with even kernels warns about a padded copy: true, and irrelevant.
        warnings.filterwarnings("ignore", message="Using padding='same'")
        self.torch, self.F = torch, torch.nn.functional

    def _tensor(self, a, grad=False):
        a = np.asarray(a)
        # A fresh copy: torch refuses negative strides, even on an axis of length one,
        # which numpy calls contiguous.
        a = np.array(a, dtype=a.dtype.newbyteorder("="), order="C")
        return self.torch.tensor(a, requires_grad=grad)

    def _conv2d(self, x, w, b, stride, padding, dilation, groups, mode):
        F = self.F
        if mode == "zeros" and (isinstance(padding, (str, int)) or isinstance(padding[0], int)):
            return F.conv2d(x, w, b, stride, padding, dilation, groups)
        (t, bt), (l, r) = _amounts(padding, w.shape[-2:], dilation)
        xp = F.pad(x, (l, r, t, bt), mode="constant" if mode == "zeros" else mode)
        return F.conv2d(xp, w, b, stride, 0, dilation, groups)

    def _conv1d(self, x, w, b, stride, padding, dilation, groups, mode, causal=False):
        F = self.F
        if causal:
            d = dilation if isinstance(dilation, int) else dilation[0]
            padding = ((w.shape[-1] - 1) * d, 0)
        symmetric = isinstance(padding, (str, int)) or len(padding) == 1
        if mode == "zeros" and symmetric:
            return F.conv1d(x, w, b, stride, padding, dilation, groups)
        if isinstance(padding, str):
            d = dilation if isinstance(dilation, int) else dilation[0]
            _, (lo, hi) = _amounts(padding, (1, w.shape[-1]), (1, d))
        else:
            lo, hi = (padding, padding) if isinstance(padding, int) else (padding[0],
                                                                          padding[-1])
        xp = F.pad(x, (lo, hi), mode="constant" if mode == "zeros" else mode)
        return F.conv1d(xp, w, b, stride, 0, dilation, groups)

    def _transpose(self, x, w, b, stride, padding, output_padding, groups, dilation):
        F = self.F
        if isinstance(padding, int) or isinstance(padding[0], int):
            return F.conv_transpose2d(x, w, b, stride, padding, output_padding, groups,
                                      dilation)
        # Asymmetric: the full output (no padding), cropped by the pads; output_padding
        # rows/columns beyond it only get the bias.
        full = F.conv_transpose2d(x, w, None, stride, 0, 0, groups, dilation)
        (t, bt), (l, r) = padding
        op = (output_padding,) * 2 if isinstance(output_padding, int) else output_padding
        ho, wo = (full.shape[-2] - t - bt + op[0], full.shape[-1] - l - r + op[1])
        full = F.pad(full, (0, max(0, l + wo - full.shape[-1]), 0,
                            max(0, t + ho - full.shape[-2])))
        y = full[..., t:t + ho, l:l + wo]
        return y if b is None else y + b[:, None, None]

    def _forward(self, fn, input, weight, bias, out, *args):
        b = None if bias is None else self._tensor(bias)
        with self.torch.no_grad():
            y = fn(self._tensor(input), self._tensor(weight), b, *args).numpy()
        if out is None:
            return y
        out[...] = y
        return out

    def _backward(self, fn, n_bias, grad_output, input, weight, needs, *args):
        import dilconv
        x, w = self._tensor(input, True), self._tensor(weight, True)
        b = self.torch.zeros(n_bias, dtype=w.dtype, requires_grad=True)
        y = fn(x, w, b, *args)
        grads = self.torch.autograd.grad(y, (x, w, b), self._tensor(grad_output),
                                         allow_unused=True)
        found = dict(zip(("input", "weight", "bias"), (g.numpy() for g in grads)))
        return dilconv.Conv2dGrads(*(found[n] if n in needs else None
                                     for n in ("input", "weight", "bias")))

    def conv2d(self, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
               padding_mode="zeros", out=None):
        return self._forward(self._conv2d, input, weight, bias, out, stride, padding,
                             dilation, groups, padding_mode)

    def conv2d_backward(self, grad_output, input, weight, stride=1, padding=0, dilation=1,
                        groups=1, *, padding_mode="zeros", needs=_validate.GRAD_NAMES):
        return self._backward(self._conv2d, np.shape(weight)[0], grad_output, input, weight,
                              needs, stride, padding, dilation, groups, padding_mode)

    def conv1d(self, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
               padding_mode="zeros", causal=False, out=None):
        return self._forward(self._conv1d, input, weight, bias, out, stride, padding,
                             dilation, groups, padding_mode, causal)

    def conv1d_backward(self, grad_output, input, weight, stride=1, padding=0, dilation=1,
                        groups=1, *, padding_mode="zeros", causal=False,
                        needs=_validate.GRAD_NAMES):
        return self._backward(self._conv1d, np.shape(weight)[0], grad_output, input, weight,
                              needs, stride, padding, dilation, groups, padding_mode, causal)

    def conv_transpose2d(self, input, weight, bias=None, stride=1, padding=0,
                         output_padding=0, groups=1, dilation=1):
        return self._forward(self._transpose, input, weight, bias, None, stride, padding,
                             output_padding, groups, dilation)

    def conv_transpose2d_backward(self, grad_output, input, weight, stride=1, padding=0,
                                  output_padding=0, groups=1, dilation=1, *,
                                  needs=_validate.GRAD_NAMES):
        return self._backward(self._transpose, np.shape(weight)[1] * groups, grad_output,
                              input, weight, needs, stride, padding, output_padding, groups,
                              dilation)


def _amounts(padding, kernel, dilation):
    """((top, bottom), (left, right)) of a padding argument, as nn.Conv2d reads it."""
    dilation = (dilation, dilation) if isinstance(dilation, int) else dilation
    if padding == "valid":
        return ((0, 0), (0, 0))
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return tuple((t // 2, t - t // 2) for t in totals)
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    if isinstance(padding[0], int):
        return ((padding[0], padding[0]), (padding[1], padding[1]))
    return tuple(tuple(p) for p in padding)
