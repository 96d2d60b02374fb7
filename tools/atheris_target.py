"""Coverage-guided fuzzing of dilconv's public API with atheris.

Each input is decoded into a call of a public function with arbitrary, often invalid,
arguments: arrays of any rank, dtype, layout and contents (NaN, Inf, denormals, huge values),
lists, Python scalars, None, strings, nested tuples, huge integers, wrong `out=` arrays and
unknown `needs=` names. The contract checked:

- only ValueError or TypeError may escape (anything else, or a crash, is a bug);
- conv2d and conv2d_backward reject exactly the geometries output_shape rejects;
- a successful conv2d call returns the shapes and dtypes output_shape and the inputs
  predict, and, for finite inputs and zero padding, values within the derived error bound
  of the float64 oracle (on the kernel path chosen by the input: automatic or any of
  dilconv._dispatch.PATHS);
- conv1d, conv_transpose2d, their backward functions and the layers (Conv2d, Conv1d,
  ConvTranspose2d: construction, forward, backward) return float arrays.

Calls whose arrays would be larger than LIMIT elements are checked by output_shape only, so
the fuzzer never asks for gigabytes.

Run (atheris is in the `dev` extra):
    python tools/atheris_target.py -atheris_runs=100000 -max_len=512 [corpus_dir]
"""
import os
import sys

import atheris
import numpy as np

# The checkout's dilconv (built in place), not an installed copy.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
with atheris.instrument_imports(include=["dilconv"]):
    import dilconv
    from dilconv import _dispatch, reference, tolerance
    from dilconv._tuning import tuning
    from dilconv._validate import make_spec

ALLOWED = (ValueError, TypeError)
LIMIT = 1 << 16                 # elements of any array the call (or the oracle) creates
DTYPES = [np.float32, np.float64, np.float16, np.int8, np.int64, np.uint64, np.bool_,
          np.complex64, object, "U3", "S2", "datetime64[s]", np.longdouble, ">f4", "<f8",
          [("a", np.float32)]]
VALUES = [0.0, 1.0, -2.5, np.nan, np.inf, -np.inf, 1e-40, 5e-324, 3e38, 1e308, -0.0]
STRINGS = ["same", "valid", "full", "", "SAME", "zeros", "reflect", "replicate",
           "circular", "input", "weight", "bias", "x"]


class Decoder:
    """Turns fuzz bytes into Python values; every choice is one small integer."""

    def __init__(self, data: bytes):
        self.fdp = atheris.FuzzedDataProvider(data)

    def pick(self, seq):
        return seq[self.fdp.ConsumeIntInRange(0, len(seq) - 1)]

    def small(self, lo=-2, hi=6):
        return self.fdp.ConsumeIntInRange(lo, hi)

    def bool(self):
        return self.fdp.ConsumeBool()

    def int_like(self, huge=True):
        kind = self.small(0, 9)
        if kind <= 5 or (kind == 6 and not huge):
            return self.small(-2, 5)
        if kind == 6:
            return 2 ** self.small(20, 70) * self.pick([1, -1])
        if kind == 7:
            return self.pick([np.int64, np.int32, np.uint8, np.uint64])(self.small(0, 4))
        if kind == 8:
            return self.pick([True, False, np.bool_(True)])
        return self.pick([1.0, 2.5, float("nan"), None, "2", (), [], object()])

    def geometry_arg(self, huge=True):
        """stride / dilation / padding candidates: ints, pairs, nests, strings, junk.

        huge=False leaves out integers of 2**20 and more: valid huge geometries of the
        functions without an output_shape check would ask for terabytes."""
        kind = self.small(0, 6)
        if kind <= 2:
            return self.int_like(huge)
        if kind == 3:
            return tuple(self.int_like(huge) for _ in range(self.small(0, 3)))
        if kind == 4:
            return [self.int_like(huge), self.int_like(huge)]
        if kind == 5:
            return tuple(tuple(self.int_like(huge) for _ in range(self.small(0, 3)))
                         for _ in range(self.small(1, 3)))
        return self.pick(STRINGS + [np.array([1, 2]), np.array([[1]]), {"h": 1}])

    def array(self, rank_hint):
        """An array (or array-like) with a shape near `rank_hint` dims."""
        kind = self.small(0, 12)
        if kind == 0:
            return self.pick([None, 1.0, 3, "abc", {"a": 1}, [[1, 2], [3]], object()])
        rank = rank_hint if kind > 3 else self.small(0, 5)
        shape = tuple(self.small(1, 5) if self.small(0, 9) else self.small(0, 9)
                      for _ in range(rank))
        if kind == 1:
            # Zero-strided view with a possibly absurd shape: costs no memory.
            big = tuple(s if self.bool() else 2 ** self.small(10, 20) for s in shape)
            try:
                return np.broadcast_to(np.float32(1), big)
            except ValueError:
                return np.zeros(shape, np.float32)
        dtype = self.pick(DTYPES) if kind == 2 else self.pick([np.float32, np.float64])
        size = int(np.prod(shape))
        values = np.array([self.pick(VALUES) if self.small(0, 7) == 0 else self.small(-3, 3)
                           for _ in range(min(size, 64))] or [0.0])
        data = np.resize(values, size).reshape(shape)
        try:
            arr = data.astype(dtype)
        except (ValueError, TypeError, OverflowError):
            arr = data.astype(np.float64)
        layout = self.small(0, 5)
        if layout == 1:
            arr = np.asfortranarray(arr)
        elif layout == 2 and arr.ndim:
            arr = arr[..., ::-1]
        elif layout == 3:
            arr = arr.copy()
            arr.flags.writeable = False
        elif layout == 4 and arr.ndim:
            arr = np.repeat(arr, 2, axis=-1)[..., ::2]
        if kind == 3:
            return arr.tolist()
        return arr


def _float_arrays(*values):
    return all(isinstance(v, np.ndarray) and v.dtype.kind in "f" for v in values
               if v is not None)


def _size(shape):
    return int(np.prod(shape)) if shape else 1


def _check_forward(x, w, b, stride, padding, dilation, groups, y):
    """y against the oracle, when the inputs are finite and the oracle is cheap."""
    spec = make_spec(np.shape(x), np.shape(w), stride, padding, dilation, groups)
    padded = (spec.h + sum(spec.padding[0])) * (spec.w + sum(spec.padding[1]))
    dilated = ((spec.kh - 1) * spec.dilation[0] + 1) * ((spec.kw - 1) * spec.dilation[1] + 1)
    if padded * spec.n * spec.c > LIMIT or dilated * spec.o * spec.c > LIMIT:
        return
    dtype = y.dtype
    xs = np.asarray(x, dtype)
    xs = xs if xs.ndim == 4 else xs[None]
    ws = np.asarray(w, dtype)
    bs = None if b is None else np.asarray(b, dtype)
    if not all(np.isfinite(a).all() for a in (xs, ws) + (() if bs is None else (bs,))):
        return
    args = (spec.stride, spec.padding, spec.dilation, spec.groups)
    expected = reference.conv2d_reference(xs, ws, bs, *args)
    abs_sum = reference.conv2d_reference_abs(xs, ws, *args)
    if bs is not None:
        abs_sum = abs_sum + np.abs(bs.astype(np.float64))[None, :, None, None]
    if not abs_sum.max(initial=0) < np.finfo(dtype).max / 2:
        return                          # float32 partial sums may overflow: not a bug
    bound = tolerance.error_bound(abs_sum, tolerance.forward_terms(spec, bs is not None),
                                  dtype)
    got = y if y.ndim == 4 else y[None]
    ratio = tolerance.worst_ratio(got, expected, bound)
    if not ratio <= 1:
        raise AssertionError(f"conv2d off by {ratio:.3g} x bound: spec {spec}")


def fuzz_conv2d(d: Decoder, backward: bool):
    x = d.array(4 if d.small(0, 3) else 3)
    w = d.array(4)
    b = d.array(1) if d.bool() else None
    stride = d.geometry_arg() if d.small(0, 2) == 0 else d.small(1, 3)
    padding = d.geometry_arg() if d.small(0, 2) == 0 else d.small(0, 3)
    dilation = d.geometry_arg() if d.small(0, 2) == 0 else d.small(1, 3)
    kind = d.small(0, 5)
    groups = d.int_like() if kind == 0 else 1 if kind < 4 else d.small(2, 4)
    mode = d.pick(STRINGS + [None, 0]) if d.small(0, 5) == 0 else "zeros"

    try:
        shape = dilconv.output_shape(np.shape(x), np.shape(w), stride, padding, dilation,
                                     groups)
        geometry_ok = True
    except ALLOWED:
        shape, geometry_ok = None, False
    except Exception:
        # np.shape of a junk object: then the call itself must still fail cleanly.
        shape, geometry_ok = None, False
    sizes = [_size(np.shape(a)) for a in (x, w, b) if a is not None and hasattr(a, "shape")]
    if shape is not None:
        sizes.append(_size(shape))
    if sizes and max(sizes) > LIMIT:
        return

    if backward:
        gy_kind = d.small(0, 4)
        if shape is not None and gy_kind:
            gy = np.zeros(shape, d.pick([np.float32, np.float64])) + d.pick(VALUES)
        else:
            gy = d.array(4)
        needs = d.pick([("input", "weight", "bias"), ("weight",), ("input",), (), "bias",
                        ("inputs",), (None,), 3, None, ("bias", "bias")])
        result = dilconv.conv2d_backward(gy, x, w, stride, padding, dilation, groups,
                                         padding_mode=mode, needs=needs)
        if not geometry_ok:
            raise AssertionError("conv2d_backward accepted a geometry output_shape rejects")
        for name, got, like in zip(("input", "weight", "bias"), result,
                                   (x, w, np.zeros(np.shape(w)[:1]))):
            asked = name in ((needs,) if isinstance(needs, str) else tuple(needs))
            if asked != (got is not None):
                raise AssertionError(f"grad {name}: asked {asked}, got {type(got)}")
            if got is not None and got.shape != np.shape(like):
                raise AssertionError(f"grad {name} shape {got.shape} != {np.shape(like)}")
        return

    out = None
    if d.small(0, 3) == 0:
        out_kind = d.small(0, 3)
        if out_kind == 0 and shape is not None:
            out = np.full(shape, np.nan, d.pick([np.float32, np.float64]))
        elif out_kind == 1 and isinstance(x, np.ndarray) and x.flags.writeable:
            out = x                                   # aliasing: must be refused
        else:
            out = d.array(4)
    y = dilconv.conv2d(x, w, b, stride, padding, dilation, groups, padding_mode=mode,
                       out=out)
    if not geometry_ok:
        raise AssertionError("conv2d accepted a geometry output_shape rejects")
    if out is not None and y is not out:
        raise AssertionError("conv2d(out=...) did not return out")
    if y.shape != tuple(shape) or y.dtype not in (np.float32, np.float64):
        raise AssertionError(f"conv2d returned {y.shape} {y.dtype}, expected {shape}")
    if mode == "zeros":
        _check_forward(x, w, b, stride, padding, dilation, groups, y)


def _checked_result(arrays):
    for a in arrays:
        if a is not None and (not isinstance(a, np.ndarray)
                              or a.dtype not in (np.float32, np.float64)):
            raise AssertionError(f"result {type(a).__name__} {getattr(a, 'dtype', '')}")


def fuzz_other_functions(d: Decoder):
    """conv1d, conv_transpose2d (and their backward) and the layers: the exception
    contract and result types (the fuzz lab checks their values)."""
    def arg(low=0):
        return d.geometry_arg(huge=False) if d.small(0, 3) == 0 else d.small(low, 3)

    def operands(rank):
        """input (batched or not), weight, bias, grad_output; None if one is too big."""
        arrays = (d.array(rank if d.small(0, 3) else rank - 1), d.array(rank),
                  d.array(1) if d.bool() else None, d.array(rank))
        if any(_size(np.shape(a)) > LIMIT for a in arrays
               if a is not None and hasattr(a, "shape")):
            return None
        return arrays

    which = d.small(0, 2)
    mode = d.pick(STRINGS + [None]) if d.small(0, 3) == 0 else "zeros"
    needs = d.pick([("input", "weight", "bias"), ("weight",), (), "bias", ("inputs",), 3])
    if which == 0:
        if (arrays := operands(3)) is None:
            return
        x, w, b, gy = arrays
        args = (arg(1), arg(), arg(1), 1 if d.small(0, 2) else d.int_like(huge=False))
        causal = d.pick([False, False, True, 1, "yes"])
        if d.bool():
            _checked_result([dilconv.conv1d(x, w, b, *args, padding_mode=mode,
                                            causal=causal)])
        else:
            _checked_result(dilconv.conv1d_backward(gy, x, w, *args, padding_mode=mode,
                                                    causal=causal, needs=needs))
    elif which == 1:
        if (arrays := operands(4)) is None:
            return
        x, w, b, gy = arrays
        args = (arg(1), arg(), arg(), 1 if d.small(0, 2) else d.int_like(huge=False), arg(1))
        if d.bool():
            _checked_result([dilconv.conv_transpose2d(x, w, b, *args)])
        else:
            _checked_result(dilconv.conv_transpose2d_backward(gy, x, w, *args, needs=needs))
    else:
        cls = d.pick([dilconv.Conv2d, dilconv.Conv1d, dilconv.ConvTranspose2d])
        extra = {"output_padding": arg()} if cls is dilconv.ConvTranspose2d else {
            "padding_mode": mode}
        layer = cls(d.pick([1, 2, 3, 4, 0, -1, 2.0, None]), d.pick([1, 2, 4, 0, True, "2"]),
                    arg(1), stride=arg(1), padding=d.pick([arg(), "same", "valid"]),
                    dilation=arg(1), groups=d.pick([1, 1, 2, 0, 3.0]),
                    bias=d.pick([True, False, None]),
                    dtype=d.pick([np.float32, np.float64, "float32", np.int64, None]),
                    rng=d.small(0, 3), **extra)
        x = d.array(cls._ndim + 2 if d.small(0, 3) else cls._ndim + 1)
        if _size(np.shape(x)) > LIMIT:
            return
        y = layer(x)
        _checked_result([y])
        gy = np.ones_like(y) if d.small(0, 3) else d.array(y.ndim)
        _checked_result([layer.backward(gy), layer.weight_grad, layer.bias_grad])


def fuzz_small_functions(d: Decoder):
    which = d.small(0, 2)
    if which == 0:
        shape = dilconv.output_shape(
            d.pick([(1, 3, 8, 8), (3, 8, 8), "abc", None, (1, 3, 8.0, 8), (0, 3, 8, 8),
                    (2 ** 40, 3, 2 ** 30, 2 ** 30), np.array([2 ** 40, 3, 2 ** 22, 2 ** 22]),
                    np.array([1, 3, 8, 8], np.uint8), (np.int64(1), 3, np.int32(8), 8)]),
            d.pick([(4, 3, 3, 3), (4, 3, 3), (4, 1, 2 ** 62, 1), [4, 3, 1, 1],
                    np.array([4, 3, 3, 3])]),
            d.geometry_arg(), d.geometry_arg(), d.geometry_arg(), d.int_like())
        if not all(type(s) is int for s in shape):
            raise AssertionError(f"output_shape returned {shape!r}")
    elif which == 1:
        n = d.int_like()
        if (isinstance(n, (int, np.integer)) and not isinstance(n, (bool, np.bool_))
                and 4 < n <= 1024):
            n = 4                       # valid but slow; larger counts must be refused
        dilconv.set_num_threads(n)
    else:
        dilconv.set_num_threads(None)
        if not 1 <= dilconv.get_num_threads() <= os.cpu_count() * 4:
            raise AssertionError(f"get_num_threads() = {dilconv.get_num_threads()}")


STATS = {"calls": 0, "returned": 0, "ValueError": 0, "TypeError": 0}
STATS_EVERY = 25000


def TestOneInput(data: bytes):
    d = Decoder(data)
    which = d.small(0, 6)
    path = d.pick([None, None] + list(_dispatch.PATHS))
    STATS["calls"] += 1
    try:
        with tuning(path=path):
            if which <= 1:
                fuzz_conv2d(d, backward=False)
            elif which <= 3:
                fuzz_conv2d(d, backward=True)
            elif which <= 5:
                fuzz_other_functions(d)
            else:
                fuzz_small_functions(d)
        STATS["returned"] += 1
    except ALLOWED as exc:
        STATS[type(exc).__name__] = STATS.get(type(exc).__name__, 0) + 1
    if STATS["calls"] % STATS_EVERY == 0:
        print("dilconv-fuzz:", " ".join(f"{k}={v}" for k, v in STATS.items()),
              file=sys.stderr, flush=True)


def main():
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
