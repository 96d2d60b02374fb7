"""Argument checking and normalisation: everything the kernels rely on is established here.

Every failure is a ValueError (bad value or shape) or TypeError (bad type or dtype) whose
message names the argument, what was expected and what was given.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple, Optional

import numpy as np

from ._geometry import ConvSpec, conv_output_size

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
GRAD_NAMES = ("input", "weight", "bias")
# Largest element count we hand to a kernel: its float64 size in bytes still fits in intp.
MAX_ELEMENTS = 2 ** 59
# Largest stride, dilation, padding or padded extent along an axis: index arithmetic in the
# kernels (sums of a few such terms) cannot overflow int64.
MAX_EXTENT = 2 ** 60


class ConvCall(NamedTuple):
    """A validated call: C-contiguous native-endian arrays of one float dtype + geometry."""

    x: np.ndarray            # (N, C, H, W)
    weight: np.ndarray       # (O, C/groups, kH, kW)
    bias: Optional[np.ndarray]
    spec: ConvSpec
    batched: bool
    dtype: np.dtype


def as_array(name: str, value) -> np.ndarray:
    """`value` as an ndarray of real numbers (no copy yet), or a TypeError naming it."""
    if value is None:
        raise TypeError(f"{name} must be an array of real numbers, got None")
    try:
        arr = np.asarray(value)
    except MemoryError:
        raise
    except Exception as exc:  # __array__ of foreign objects can raise anything
        raise TypeError(f"{name} must be an array of real numbers, could not convert "
                        f"{type(value).__name__}: {exc}") from None
    kind = arr.dtype.kind
    if kind == "c":
        raise TypeError(f"{name} has complex dtype {arr.dtype}; dilconv supports real "
                        f"float32 and float64 only")
    if kind not in "biuf" or (kind == "f" and arr.dtype.itemsize > 8):
        raise TypeError(f"{name} has unsupported dtype {arr.dtype}; expected float32 or "
                        f"float64 (ints, bools and float16 are converted)")
    return arr


def common_float_dtype(named: dict) -> np.dtype:
    """float32 or float64 from the float arrays among `named`; mixing them is a TypeError.

    Non-float arrays (ints, bools, float16) follow the float arrays, float64 if none.
    """
    wide = {name: arr.dtype for name, arr in named.items()
            if arr is not None and arr.dtype.kind == "f" and arr.dtype.itemsize >= 4}
    sizes = {dt.itemsize for dt in wide.values()}
    if len(sizes) > 1:
        listed = ", ".join(f"{name} is {np.dtype(dt).name}" for name, dt in wide.items())
        raise TypeError(f"dtype mismatch: {listed}; dilconv computes float32 and float64 "
                        f"natively and does not mix them: cast with .astype() first")
    return np.dtype(np.float32) if sizes == {4} else np.dtype(np.float64)


def _declared(value, arr: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """`arr` if `value` carried its own dtype (an array); lists and Python numbers are None:
    they take the float dtype of the other arrays."""
    return arr if hasattr(value, "dtype") else None


def _as_int(name: str, value, *, where: str = "") -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int or a pair of ints, got "
                        f"{value!r}{where} of type {type(value).__name__}")
    return int(value)


def _is_sequence(value) -> bool:
    return isinstance(value, (tuple, list)) or (isinstance(value, np.ndarray)
                                                and value.ndim == 1)


def int_pair(name: str, value, minimum: int) -> tuple:
    """An int or a 2-sequence of ints, each >= minimum, as (h, w)."""
    if _is_sequence(value):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair (h, w), got {tuple(value)!r} "
                             f"of length {len(value)}")
        pair = tuple(_as_int(name, v, where=f" in {tuple(value)!r}") for v in value)
    else:
        v = _as_int(name, value)
        pair = (v, v)
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum} along each axis, got {pair}")
    if max(pair) > MAX_EXTENT:
        raise ValueError(f"{name} must be <= {MAX_EXTENT} along each axis, got {pair}")
    return pair


def padding_amounts(padding, kernel: tuple, stride: tuple, dilation: tuple) -> tuple:
    """Normalise `padding` to ((top, bottom), (left, right))."""
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0), (0, 0))
        if padding == "same":
            if stride != (1, 1):
                raise ValueError(f"padding='same' is not supported for strided convolutions "
                                 f"(stride={stride}); give explicit padding instead")
            amounts = []
            for k, d in zip(kernel, dilation):
                total = d * (k - 1)
                # The odd pixel goes bottom/right, as in PyTorch.
                amounts.append((total // 2, total - total // 2))
            return tuple(amounts)
        raise ValueError(f"padding must be an int, a pair, ((top, bottom), (left, right)), "
                         f"'same' or 'valid'; got the string {padding!r}")
    if _is_sequence(padding) and len(padding) == 2 and all(_is_sequence(p) for p in padding):
        pairs = []
        for axis, side in zip(("(top, bottom)", "(left, right)"), padding):
            if len(side) != 2:
                raise ValueError(f"padding {axis} must have 2 entries, got {tuple(side)!r}")
            pairs.append(tuple(_as_int("padding", v, where=f" in {tuple(side)!r}")
                               for v in side))
        if min(pairs[0] + pairs[1]) < 0:
            raise ValueError(f"padding must be >= 0, got {tuple(pairs)}")
        return tuple(pairs)
    ph, pw = int_pair("padding", padding, 0)
    return ((ph, ph), (pw, pw))


def check_padding_mode(padding_mode) -> str:
    if not isinstance(padding_mode, str):
        raise TypeError(f"padding_mode must be a string, one of {PADDING_MODES}, got "
                        f"{padding_mode!r}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    if padding_mode != "zeros":
        raise NotImplementedError(f"padding_mode={padding_mode!r} is not implemented yet; "
                                  f"only 'zeros' is available")
    return padding_mode


def _check_groups(groups, c: int, o: int, weight_c: int) -> int:
    if isinstance(groups, (bool, np.bool_)) or not isinstance(groups, numbers.Integral):
        raise TypeError(f"groups must be an int, got {groups!r} of type "
                        f"{type(groups).__name__}")
    groups = int(groups)
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    if c % groups:
        raise ValueError(f"groups={groups} must divide the input channels, got C={c}")
    if o % groups:
        raise ValueError(f"groups={groups} must divide the output channels, got "
                         f"weight.shape[0]={o}")
    if weight_c * groups != c:
        raise ValueError(f"weight.shape[1] * groups must equal the input channels: weight "
                         f"has {weight_c} in-channels per group x groups={groups} = "
                         f"{weight_c * groups}, input has C={c}")
    return groups


def _check_rank(input_shape: tuple, weight_shape: tuple) -> None:
    if len(input_shape) not in (3, 4):
        raise ValueError(f"input must be 4-D (N, C, H, W) or 3-D (C, H, W), got shape "
                         f"{input_shape}")
    if len(weight_shape) != 4:
        raise ValueError(f"weight must be 4-D (out_channels, in_channels/groups, kH, kW), "
                         f"got shape {weight_shape}")


def make_spec(input_shape: tuple, weight_shape: tuple, stride, padding, dilation,
              groups) -> ConvSpec:
    """Check shapes and arguments together; the spec is always batched (N, C, H, W)."""
    # Python ints: numpy ints would wrap around in the size checks below.
    input_shape = tuple(int(s) for s in input_shape)
    weight_shape = tuple(int(s) for s in weight_shape)
    _check_rank(input_shape, weight_shape)
    n, c, h, w = input_shape if len(input_shape) == 4 else (1,) + input_shape
    o, wc, kh, kw = weight_shape
    # Arguments first, then shapes (PyTorch's order): the error names the bad argument.
    stride = int_pair("stride", stride, 1)
    dilation = int_pair("dilation", dilation, 1)
    pads = padding_amounts(padding, (kh, kw), stride, dilation)
    if n < 0:
        raise ValueError(f"input batch size must be >= 0, got input shape {input_shape}")
    if min(c, h, w) < 1:
        raise ValueError(f"input channels, height and width must be >= 1, got input shape "
                         f"{input_shape}")
    if min(o, wc, kh, kw) < 1:
        raise ValueError(f"weight dimensions must all be >= 1, got weight shape "
                         f"{weight_shape}")
    groups = _check_groups(groups, c, o, wc)
    for axis, size, k, d, (lo, hi) in (("height", h, kh, dilation[0], pads[0]),
                                        ("width", w, kw, dilation[1], pads[1])):
        dilated = d * (k - 1) + 1
        if size + lo + hi > MAX_EXTENT:
            raise ValueError(f"padded input {axis} {size + lo + hi} (input {size} + padding "
                             f"{lo}+{hi}) exceeds {MAX_EXTENT}; input shape {input_shape}")
        if size + lo + hi < dilated:
            raise ValueError(
                f"dilated kernel {axis} {dilated} (kernel {k}, dilation {d}) is larger than "
                f"the padded input {axis} {size + lo + hi} (input {size} + padding {lo}+{hi}); "
                f"input shape {input_shape}, weight shape {weight_shape}")
    ho = conv_output_size(h, kh, stride[0], dilation[0], *pads[0])
    wo = conv_output_size(w, kw, stride[1], dilation[1], *pads[1])
    for what, count in (("input", n * c * h * w), ("output", n * o * ho * wo),
                        ("weight", o * wc * kh * kw)):
        if count > MAX_ELEMENTS:
            raise ValueError(f"{what} would have {count} elements, more than dilconv "
                             f"supports ({MAX_ELEMENTS}); input shape {input_shape}, weight "
                             f"shape {weight_shape}")
    return ConvSpec(n=n, c=c, h=h, w=w, o=o, kh=kh, kw=kw, stride=stride, dilation=dilation,
                    padding=pads, groups=groups)


def conv_call(input, weight, bias, stride, padding, dilation, groups, padding_mode,
              extra: Optional[dict] = None) -> tuple:
    """Validate a conv2d-style call. Returns (ConvCall, extra arrays converted likewise)."""
    check_padding_mode(padding_mode)
    x = as_array("input", input)
    w = as_array("weight", weight)
    b = None if bias is None else as_array("bias", bias)
    extra_arrays = {name: as_array(name, v) for name, v in (extra or {}).items()}
    dtype = common_float_dtype({
        "input": _declared(input, x), "weight": _declared(weight, w),
        "bias": _declared(bias, b),
        **{name: _declared(extra[name], arr) for name, arr in extra_arrays.items()}})
    spec = make_spec(x.shape, w.shape, stride, padding, dilation, groups)
    if b is not None and b.shape != (spec.o,):
        raise ValueError(f"bias must have shape ({spec.o},) to match weight.shape[0], got "
                         f"shape {b.shape}")
    batched = x.ndim == 4
    x = np.ascontiguousarray(x, dtype=dtype)
    call = ConvCall(
        x=x if batched else x[None],
        weight=np.ascontiguousarray(w, dtype=dtype),
        bias=None if b is None else np.ascontiguousarray(b, dtype=dtype),
        spec=spec, batched=batched, dtype=dtype)
    return call, extra_arrays


def as_operand(name: str, arr: np.ndarray, shape: tuple, dtype: np.dtype) -> np.ndarray:
    """A C-contiguous `dtype` copy (or view) of `arr`, which must have `shape`."""
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {arr.shape}")
    return np.ascontiguousarray(arr, dtype=dtype)


def check_out(out, shape: tuple, dtype: np.dtype, inputs: tuple) -> None:
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy ndarray, got {type(out).__name__}")
    if out.shape != tuple(shape):
        raise ValueError(f"out must have shape {tuple(shape)}, got {out.shape}")
    if out.dtype != dtype:
        raise TypeError(f"out must have dtype {dtype.name} (native byte order), got "
                        f"{out.dtype.str}")
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    for name, arr in inputs:
        if arr is not None and np.may_share_memory(out, arr):
            raise ValueError(f"out overlaps {name} in memory; pass a separate array")


def check_needs(needs) -> frozenset:
    if isinstance(needs, str):
        needs = (needs,)
    try:
        names = tuple(needs)
    except TypeError:
        raise TypeError(f"needs must be an iterable of names from {GRAD_NAMES}, got "
                        f"{needs!r}") from None
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"needs must contain names from {GRAD_NAMES}, got {name!r}")
        if name not in GRAD_NAMES:
            raise ValueError(f"needs has unknown gradient {name!r}; choose from {GRAD_NAMES}")
    return frozenset(names)
