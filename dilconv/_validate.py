"""Argument checking and normalisation: everything the kernels rely on is established here.

Every failure is a ValueError (bad value or shape) or TypeError (bad type or dtype) whose
message names the argument, what was expected and what was given.
"""
from __future__ import annotations

import functools
import numbers
from typing import NamedTuple, Optional

import numpy as np

# The checks every call makes, in C (KERNEL_DTYPES, as_is, is_plain, repeat_key).
from ._callpath import KERNEL_DTYPES, as_is, is_plain, repeat_key  # noqa: F401
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

    x: np.ndarray            # (N, C, H, W); conv2d's planes may lie apart (kernel_array)
    weight: np.ndarray       # (O, C/groups, kH, kW)
    bias: Optional[np.ndarray]
    spec: ConvSpec
    batched: bool
    dtype: np.dtype
    # Non-zero modes: `spec.padding` is still to be applied with this mode (see _padding).
    padding_mode: str = "zeros"


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


def is_lazy(value) -> bool:
    """A dask array (or another lazy collection): shape and dtype known, values not yet."""
    return hasattr(value, "__dask_graph__") and hasattr(value, "dtype")


def intake(named: dict, *, lazy: tuple = (), optional: tuple = ("bias",)) -> tuple:
    """Convert the array arguments of one call and choose the call's float dtype.

    Every entry point (conv2d, conv1d, conv_transpose2d, their backward functions, the
    layers, dilconv.dask) converts its arrays here and nowhere else. `named` maps argument
    names to what the caller passed; None is an absent argument for names in `optional`.
    Values that carry a dtype (ndarrays, numpy scalars, tensors, dask arrays) decide the
    dtype: float32 or float64 (both together is a TypeError naming them). Lists, Python
    numbers, ints, bools and float16 follow them, float64 if nothing decides.

    Returns ({name: ndarray of that dtype, or None}, dtype), copying only to change the
    dtype (the memory layout is `kernel_array`'s business, after the shape checks). Names in
    `lazy` (dilconv.dask's input and grad_output) may be dask arrays, returned as they are
    (only their dtype is checked); there, a dask array under any other name is a TypeError.
    Elsewhere a dask array is computed like any object with ``__array__``.
    """
    arrays, declared = {}, {}
    for name, value in named.items():
        if value is None and name in optional:
            arrays[name] = None
            continue
        if lazy and is_lazy(value):
            if name not in lazy:
                raise TypeError(f"{name} must be an in-memory array (numpy or array_like), "
                                f"got a {type(value).__name__}; dilconv.dask takes only the "
                                f"input and grad_output as dask arrays: pass "
                                f"{name}.compute()")
            declared[name] = as_array(name, np.empty(0, dtype=value.dtype))
            arrays[name] = value
            continue
        arr = as_array(name, value)
        arrays[name] = arr
        # Lists and Python numbers carry no dtype of their own: they follow the others.
        if hasattr(value, "dtype"):
            declared[name] = arr
    dtype = common_float_dtype(declared)
    for name, arr in arrays.items():
        if isinstance(arr, np.ndarray) and arr.dtype != dtype:
            arrays[name] = arr.astype(dtype)
    return arrays, dtype


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
    return padding_mode


def check_mode_padding(pads: tuple, padding_mode: str, input_shape: tuple) -> None:
    """PyTorch's limits on padding for the non-zero modes (those of torch.nn.functional.pad).

    'reflect' mirrors without repeating the edge, so each side needs padding < size;
    'circular' may wrap around at most once, so padding <= size; 'replicate' takes any.
    """
    limits = {"reflect": (lambda p, size: p < size, "less than"),
              "circular": (lambda p, size: p <= size, "at most")}
    if padding_mode not in limits:
        return
    fits, words = limits[padding_mode]
    for axis, size, side_names, amounts in zip(
            ("height", "width"), tuple(input_shape)[-2:], (("top", "bottom"), ("left", "right")),
            pads):
        for side, p in zip(side_names, amounts):
            if not fits(p, size):
                raise ValueError(
                    f"padding_mode={padding_mode!r} needs padding {words} the input {axis} "
                    f"on each side: padding {side} is {p}, input {axis} is {size} (padding "
                    f"{tuple(pads)}, input shape {tuple(input_shape)})")


def positive_int(name: str, value) -> int:
    """An int >= 1 (groups, channel counts), or a TypeError / ValueError naming it."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} of type "
                        f"{type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _layout_hint(input_shape: tuple, weight_shape: tuple, groups: int) -> str:
    """How to fix channels-last arrays (TensorFlow's NHWC input, HWIO weight) when the
    shapes fit that reading; else ''."""
    c, wc = input_shape[-3], weight_shape[1]
    if input_shape[-2] == weight_shape[2] == 1:
        return ""           # conv1d's (N, C, 1, L) views: the 2-D advice would mislead
    # The weight read as OIHW fits a channels-last input: only the input is transposed.
    nhwc = input_shape[-1] == wc * groups
    # A square kernel in the last two axes but not the first two: OIHW after all.
    oihw = weight_shape[2] == weight_shape[3] and weight_shape[0] != weight_shape[1]
    both = not nhwc and not oihw and input_shape[-1] == weight_shape[2] * groups
    hwio = not nhwc and not oihw and weight_shape[2] * groups == c
    hints = []
    if nhwc or both:
        order = "(0, 3, 1, 2)" if len(input_shape) == 4 else "(2, 0, 1)"
        hints.append(f"if the input is channels-last (NHWC, as in TensorFlow), pass "
                     f"input.transpose{order}: dilconv takes NCHW")
    if hwio or both:
        hints.append("if the weight is TensorFlow's HWIO (kH, kW, in, out), pass "
                     "weight.transpose(3, 2, 0, 1): dilconv takes OIHW")
    return "; " + "; ".join(hints) if hints else ""


def _check_groups(groups, input_shape: tuple, weight_shape: tuple) -> int:
    c, (o, weight_c) = input_shape[-3], weight_shape[:2]
    groups = positive_int("groups", groups)
    if c % groups:
        raise ValueError(f"groups={groups} must divide the input channels, got C={c}"
                         f"{_layout_hint(input_shape, weight_shape, groups)}")
    if o % groups:
        raise ValueError(f"groups={groups} must divide the output channels, got "
                         f"weight.shape[0]={o}")
    if weight_c * groups != c:
        raise ValueError(f"weight.shape[1] * groups must equal the input channels: weight "
                         f"has {weight_c} in-channels per group x groups={groups} = "
                         f"{weight_c * groups}, input has C={c} (input shape {input_shape}, "
                         f"weight shape {weight_shape})"
                         f"{_layout_hint(input_shape, weight_shape, groups)}")
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
    # Layers call again and again with the same geometry: valid specs of plain ints and
    # strings are remembered (specs are immutable). Anything else (bools, numpy ints,
    # lists) is checked afresh, so it gets its own error or conversion every time.
    args = (tuple(input_shape), tuple(weight_shape), stride, padding, dilation, groups)
    if is_plain(args):
        return _cached_spec(*args)
    return _make_spec(*args)


@functools.lru_cache(maxsize=256)
def _cached_spec(*args) -> ConvSpec:
    return _make_spec(*args)


def _make_spec(input_shape: tuple, weight_shape: tuple, stride, padding, dilation,
               groups) -> ConvSpec:
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
    groups = _check_groups(groups, input_shape, weight_shape)
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
              extra: Optional[dict] = None, input_planes: bool = False) -> tuple:
    """Validate a conv2d-style call. Returns (ConvCall, extra arrays converted likewise).
    `input_planes`: the input may keep channel planes apart (see `kernel_array`)."""
    check_padding_mode(padding_mode)
    extra = extra or {}
    arrays, dtype = intake({"input": input, "weight": weight, "bias": bias, **extra})
    x, w, b = arrays["input"], arrays["weight"], arrays["bias"]
    extra_arrays = {name: arrays[name] for name in extra}
    spec = make_spec(x.shape, w.shape, stride, padding, dilation, groups)
    check_mode_padding(spec.padding, padding_mode, x.shape)
    if b is not None and b.shape != (spec.o,):
        raise ValueError(f"bias must have shape ({spec.o},) to match weight.shape[0], got "
                         f"shape {b.shape}")
    batched = x.ndim == 4
    x = kernel_array(x, dtype, input_planes)
    call = ConvCall(
        x=x if batched else x[None],
        weight=kernel_array(w, dtype),
        bias=None if b is None else kernel_array(b, dtype),
        spec=spec, batched=batched, dtype=dtype, padding_mode=padding_mode)
    return call, extra_arrays


def as_operand(name: str, arr: np.ndarray, shape: tuple, dtype: np.dtype) -> np.ndarray:
    """A C-contiguous `dtype` copy (or view) of `arr`, which must have `shape`."""
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {arr.shape}")
    return kernel_array(arr, dtype)


def kernel_array(arr: np.ndarray, dtype: np.dtype, planes: bool = False) -> np.ndarray:
    """`arr` as the kernels read it: C-contiguous, `dtype`, and aligned to its items
    (buffers from pickle or the network can start at any byte; the kernels' loads assume
    whole items). A copy only where needed. With `planes`, an array of `dtype` whose
    planes (last two axes) are C-contiguous and aligned, however far apart they lie, as
    it is (the panel forward reads it in place; `_dispatch.forward` copies it for the
    others)."""
    if as_is(arr, dtype):
        return arr
    if planes and planes_contiguous(arr, dtype):
        return arr
    return np.require(arr, dtype=dtype, requirements=("C", "A"))


def planes_contiguous(arr: np.ndarray, dtype: np.dtype) -> bool:
    """Every plane of `arr` (its last two axes) C-contiguous, items of `dtype` aligned."""
    item = np.dtype(dtype).itemsize
    return (arr.dtype == dtype and arr.ndim >= 2 and arr.size > 0 and arr.flags.aligned
            and arr.strides[-1] == item and arr.strides[-2] == arr.shape[-1] * item)


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


class TransposeCall(NamedTuple):
    """A validated conv_transpose2d call, phrased as the conv2d it is the adjoint of.

    `spec` is that conv2d: its input is the transposed output (N, C_out, Ho, Wo), its output
    is (N, C_in, spec.ho, spec.wo). `x` is the transposed input, extended with zero rows or
    columns at the bottom/right when output_padding >= stride makes spec.ho > H (spec.wo > W).
    `spec` is None when the output is empty (Ho or Wo is 0).
    """

    x: np.ndarray            # (N, C_in, spec.ho, spec.wo)
    weight: np.ndarray       # (C_in, C_out/groups, kH, kW)
    bias: Optional[np.ndarray]
    spec: Optional[ConvSpec]
    batched: bool
    dtype: np.dtype
    output_shape: tuple      # (N, C_out, Ho, Wo)
    input_hw: tuple          # (H, W) of the transposed input


def check_transpose_padding(padding, what: str = "conv_transpose2d") -> None:
    """Transposed convolutions take amounts only: 'same' and 'valid' have no meaning there."""
    if isinstance(padding, str):
        raise ValueError(f"{what} padding must be an int, a pair or "
                         f"((top, bottom), (left, right)), got the string {padding!r}")


def transpose_call(input, weight, bias, stride, padding, output_padding, groups, dilation,
                   extra: Optional[dict] = None) -> tuple:
    """Validate a conv_transpose2d call. Returns (TransposeCall, extra arrays converted)."""
    extra = extra or {}
    arrays, dtype = intake({"input": input, "weight": weight, "bias": bias, **extra})
    x, w, b = arrays["input"], arrays["weight"], arrays["bias"]
    extra_arrays = {name: arrays[name] for name in extra}
    _check_rank(x.shape, w.shape)
    n, c_in, h, wd = x.shape if x.ndim == 4 else (1,) + x.shape
    if n < 0 or min(c_in, h, wd) < 1 or min(w.shape) < 1:
        raise ValueError(f"input channels, height, width and all weight dimensions must be "
                         f">= 1, got input shape {x.shape}, weight shape {w.shape}")
    if w.shape[0] != c_in:
        raise ValueError(f"conv_transpose2d weight is (C_in, C_out/groups, kH, kW): "
                         f"weight.shape[0] must equal the input channels C_in={c_in}, got "
                         f"weight shape {w.shape}")
    groups = positive_int("groups", groups)
    if c_in % groups:
        raise ValueError(f"groups={groups} must divide the input channels C_in={c_in}")
    c_out = w.shape[1] * groups
    stride = int_pair("stride", stride, 1)
    dilation = int_pair("dilation", dilation, 1)
    output_padding = int_pair("output_padding", output_padding, 0)
    check_transpose_padding(padding)
    pads = padding_amounts(padding, w.shape[2:], stride, dilation)
    out_hw = []
    for axis, size, k, s, d, op, (lo, hi) in zip(
            ("height", "width"), (h, wd), w.shape[2:], stride, dilation, output_padding,
            pads):
        if op >= s and op >= d:
            raise ValueError(f"output_padding must be smaller than either stride or dilation "
                             f"along each axis, got output_padding={output_padding}, "
                             f"stride={stride}, dilation={dilation}")
        size_out = (size - 1) * s - lo - hi + d * (k - 1) + op + 1
        if size_out < 0:
            raise ValueError(f"conv_transpose2d output {axis} would be {size_out}: "
                             f"(input {size} - 1) * stride {s} - padding {lo}+{hi} + dilation "
                             f"{d} * (kernel {k} - 1) + output_padding {op} + 1; input shape "
                             f"{x.shape}, weight shape {w.shape}")
        out_hw.append(size_out)
    if b is not None and b.shape != (c_out,):
        raise ValueError(f"bias must have shape ({c_out},) = weight.shape[1] * groups, got "
                         f"shape {b.shape}")
    output_shape = (n, c_out) + tuple(out_hw)
    batched = x.ndim == 4
    x = kernel_array(x if batched else x[None], dtype)
    spec = None
    # An empty output (size 0, which PyTorch allows) has no conv2d adjoint to run.
    if min(out_hw):
        spec = make_spec(output_shape, w.shape, stride, pads, dilation, groups)
        if (spec.ho, spec.wo) != (h, wd):
            x = np.pad(x, ((0, 0), (0, 0), (0, spec.ho - h), (0, spec.wo - wd)))
    call = TransposeCall(
        x=x, weight=kernel_array(w, dtype),
        bias=None if b is None else kernel_array(b, dtype),
        spec=spec, batched=batched, dtype=dtype, output_shape=output_shape,
        input_hw=(h, wd))
    return call, extra_arrays


def _int_1d(name: str, value, minimum: int) -> int:
    """A conv1d stride/dilation: an int or a 1-sequence (PyTorch's (k,)), >= minimum."""
    if _is_sequence(value):
        if len(value) != 1:
            raise ValueError(f"{name} must be an int or a 1-tuple for conv1d, got "
                             f"{tuple(value)!r} of length {len(value)}")
        value = value[0]
    return int_pair(name, value, minimum)[0]


def conv1d_args(input, weight, bias, grad_output, stride, padding, dilation,
                causal) -> tuple:
    """Turn a conv1d call into the conv2d call on (N, C, 1, L) views; no data is copied.

    Returns (input, weight, bias, grad_output, stride, padding, dilation) for conv2d; bias
    and grad_output are None when not given.
    """
    named = {"input": input, "weight": weight, "bias": bias}
    if grad_output is not None:
        named["grad_output"] = grad_output
    arrays, _ = intake(named)
    x, w, b = arrays["input"], arrays["weight"], arrays["bias"]
    if x.ndim not in (2, 3):
        raise ValueError(f"conv1d input must be 3-D (N, C, L) or 2-D (C, L), got shape "
                         f"{x.shape}")
    if w.ndim != 3:
        raise ValueError(f"conv1d weight must be 3-D (out_channels, in_channels/groups, k), "
                         f"got shape {w.shape}")
    gy = None
    if grad_output is not None:
        gy = arrays["grad_output"]
        if gy.ndim != x.ndim:
            raise ValueError(f"grad_output must have the rank of input ({x.ndim}-D), got "
                             f"shape {gy.shape}")
        gy = gy[..., None, :]
    stride = _int_1d("stride", stride, 1)
    dilation = _int_1d("dilation", dilation, 1)
    pads: object
    if isinstance(padding, str):
        pads = padding                       # 'same' / 'valid': conv2d checks them
    elif _is_sequence(padding) and len(padding) == 1:
        pads = ((0, 0), (padding[0],) * 2)
    elif _is_sequence(padding):
        if len(padding) != 2:
            raise ValueError(f"conv1d padding must be an int, (p,), (left, right), 'same' or "
                             f"'valid', got {tuple(padding)!r} of length {len(padding)}")
        pads = ((0, 0), tuple(padding))
    else:
        pads = ((0, 0), (padding, padding))
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if causal:
        given = padding_amounts(pads, (1, w.shape[-1]), (1, stride), (1, dilation))
        if given != ((0, 0), (0, 0)):
            raise ValueError(f"causal=True sets the padding to ((k-1)*dilation, 0); it "
                             f"cannot be combined with padding={padding!r}")
        pads = ((0, 0), (dilation * (w.shape[-1] - 1), 0))
    return x[..., None, :], w[:, :, None, :], b, gy, (1, stride), pads, (1, dilation)
