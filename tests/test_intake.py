"""One intake for every entry point: lists, Python and numpy ints, bools, float16 and foreign
array types are converted the same way everywhere, to the float dtype of the arrays that
carry one (float64 if none does).

Values are 0/1, so every conversion is exact: a call with converted arguments must give
bitwise the result of the same call on float arrays of the chosen dtype (itself checked
against the oracle elsewhere).
"""
import numpy as np
import pytest

import dilconv


class Foreign:
    """An array type numpy knows only through __array__ (no dtype attribute)."""

    def __init__(self, arr):
        self.arr = arr

    def __array__(self, dtype=None, copy=None):
        return self.arr if dtype is None else self.arr.astype(dtype)


CONVERSIONS = {
    "list": lambda a: a.tolist(),
    "int": lambda a: a.astype(np.int64),
    "bool": lambda a: a.astype(bool),
    "float16": lambda a: a.astype(np.float16),
    "foreign": Foreign,
}


def _bits(rng, shape):
    return rng.integers(0, 2, shape).astype(np.float32)


def _entry_points(rng):
    """name -> (function, {argument: float32 array}, kwargs)."""
    x, w, b = _bits(rng, (2, 4, 9, 8)), _bits(rng, (6, 2, 3, 2)), _bits(rng, (6,))
    gy = _bits(rng, dilconv.output_shape(x.shape, w.shape, 1, 2, 2, 2))
    wt = _bits(rng, (4, 3, 3, 2))
    ty = dilconv.conv_transpose2d(x, wt, None, 2, 1, 1, 2, 2)
    x1, w1, b1 = _bits(rng, (2, 4, 20)), _bits(rng, (6, 2, 3)), _bits(rng, (6,))
    gy1 = _bits(rng, (2, 6, 20))
    conv = dict(stride=1, padding=2, dilation=2, groups=2)
    transpose = dict(stride=2, padding=1, output_padding=1, groups=2, dilation=2)
    conv1 = dict(dilation=3, groups=2, causal=True)
    return {
        "conv2d": (dilconv.conv2d, dict(input=x, weight=w, bias=b), conv),
        "conv2d_backward": (dilconv.conv2d_backward,
                            dict(grad_output=gy, input=x, weight=w), conv),
        "conv1d": (dilconv.conv1d, dict(input=x1, weight=w1, bias=b1), conv1),
        "conv1d_backward": (dilconv.conv1d_backward,
                            dict(grad_output=gy1, input=x1, weight=w1), conv1),
        "conv_transpose2d": (dilconv.conv_transpose2d,
                             dict(input=x, weight=wt, bias=b[:6]), transpose),
        "conv_transpose2d_backward": (dilconv.conv_transpose2d_backward,
                                      dict(grad_output=_bits(rng, ty.shape), input=x,
                                           weight=wt), transpose),
    }


ENTRY_POINTS = list(_entry_points(np.random.default_rng(0)))


def _results(value):
    return tuple(value) if isinstance(value, tuple) else (value,)


def _assert_same(got, want, dtype):
    for g, r in zip(_results(got), _results(want)):
        assert isinstance(g, np.ndarray) and g.dtype == dtype, (type(g), g.dtype)
        assert g.tobytes() == np.ascontiguousarray(r).tobytes()


@pytest.mark.parametrize("how", sorted(CONVERSIONS))
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_each_argument_follows_the_float_arrays(entry, how):
    fn, arrays, kwargs = _entry_points(np.random.default_rng(1))[entry]
    for dtype in (np.float32, np.float64):
        typed = {k: v.astype(dtype) for k, v in arrays.items()}
        want = fn(**typed, **kwargs)
        for name in typed:
            got = fn(**{**typed, name: CONVERSIONS[how](arrays[name])}, **kwargs)
            _assert_same(got, want, dtype)


@pytest.mark.parametrize("how", sorted(CONVERSIONS))
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_nothing_declared_computes_float64(entry, how):
    fn, arrays, kwargs = _entry_points(np.random.default_rng(2))[entry]
    want = fn(**{k: v.astype(np.float64) for k, v in arrays.items()}, **kwargs)
    got = fn(**{k: CONVERSIONS[how](v) for k, v in arrays.items()}, **kwargs)
    _assert_same(got, want, np.float64)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_float32_with_float64_names_both(entry):
    fn, arrays, kwargs = _entry_points(np.random.default_rng(3))[entry]
    names = list(arrays)
    mixed = {**arrays, names[-1]: arrays[names[-1]].astype(np.float64)}
    with pytest.raises(TypeError, match=f"{names[-1]} is float64") as info:
        fn(**mixed, **kwargs)
    assert "float32" in str(info.value)


@pytest.mark.parametrize("bad, word", [(np.ones(3, np.complex64), "complex"),
                                       (np.array(["a"]), "dtype"),
                                       (object(), "dtype")])
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_unsupported_arrays_name_the_argument(entry, bad, word):
    fn, arrays, kwargs = _entry_points(np.random.default_rng(4))[entry]
    name = list(arrays)[-1]
    with pytest.raises(TypeError, match=word) as info:
        fn(**{**arrays, name: bad}, **kwargs)
    assert name in str(info.value)


LAYERS = [
    (dilconv.Conv2d, dict(in_channels=4, out_channels=6, kernel_size=3, padding=2,
                          dilation=2, groups=2), (2, 4, 9, 8)),
    (dilconv.Conv1d, dict(in_channels=4, out_channels=6, kernel_size=3, padding=(4, 0),
                          dilation=2, groups=2), (2, 4, 20)),
    (dilconv.ConvTranspose2d, dict(in_channels=4, out_channels=6, kernel_size=3, stride=2,
                                   padding=1, output_padding=1, groups=2), (2, 4, 5, 6)),
]


@pytest.mark.parametrize("how", sorted(CONVERSIONS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls, kwargs, shape", LAYERS)
def test_layers_convert_input_and_grad_to_their_dtype(cls, kwargs, shape, dtype, how):
    rng = np.random.default_rng(5)
    x = _bits(rng, shape)
    layer = cls(**kwargs, dtype=dtype, rng=0)
    y = layer(x.astype(dtype))
    gy = _bits(rng, y.shape)
    want = (y, layer.backward(gy.astype(dtype)), layer.weight_grad, layer.bias_grad)
    got_y = layer(CONVERSIONS[how](x))
    got = (got_y, layer.backward(CONVERSIONS[how](gy)), layer.weight_grad, layer.bias_grad)
    _assert_same(got, want, dtype)


@pytest.mark.parametrize("cls, kwargs, shape", LAYERS)
def test_layers_reject_the_other_float_dtype(cls, kwargs, shape):
    layer = cls(**kwargs, rng=0)                     # float32
    with pytest.raises(TypeError, match="input is float64"):
        layer(np.zeros(shape))


def test_dask_array_weight_in_memory_is_computed():
    da = pytest.importorskip("dask.array")
    fn, arrays, kwargs = _entry_points(np.random.default_rng(6))["conv2d"]
    want = fn(**arrays, **kwargs)
    got = fn(**{**arrays, "weight": da.from_array(arrays["weight"], chunks=2)}, **kwargs)
    _assert_same(got, want, np.float32)


class TestDask:
    """dilconv.dask goes through the same intake: the same dtypes, and weight and bias must
    be in memory (a clear TypeError, not a shape error about a stand-in)."""

    @pytest.fixture(autouse=True)
    def _dask(self):
        self.da = pytest.importorskip("dask.array")
        import dilconv.dask
        self.dask = dilconv.dask

    def _arrays(self):
        fn, arrays, kwargs = _entry_points(np.random.default_rng(7))["conv2d_backward"]
        return arrays, kwargs

    @pytest.mark.parametrize("how", sorted(CONVERSIONS))
    def test_weight_and_bias_follow_the_input(self, how):
        arrays, kwargs = self._arrays()
        x = self.da.from_array(arrays["input"], chunks=(1, 4, 5, 4))
        b = np.ones(6, np.float32)
        want = dilconv.conv2d(arrays["input"], arrays["weight"], b, **kwargs)
        got = self.dask.conv2d(x, CONVERSIONS[how](arrays["weight"]), CONVERSIONS[how](b),
                               **kwargs)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got.compute(), want, rtol=1e-6)

    @pytest.mark.parametrize("how", sorted(CONVERSIONS))
    def test_numpy_side_operands_are_converted(self, how):
        arrays, kwargs = self._arrays()
        want = dilconv.conv2d_backward(**{k: v.astype(np.float64) for k, v in arrays.items()},
                                       **kwargs)
        grads = self.dask.conv2d_backward(
            **{k: CONVERSIONS[how](v) for k, v in arrays.items()}, **kwargs)
        for got, ref in zip(grads, want):
            assert got.dtype == np.float64
            np.testing.assert_allclose(got.compute(), ref, rtol=1e-12)

    @pytest.mark.parametrize("name", ["weight", "bias"])
    def test_dask_weight_or_bias_is_a_clear_type_error(self, name):
        arrays, kwargs = self._arrays()
        args = {"input": self.da.from_array(arrays["input"]), "weight": arrays["weight"],
                "bias": np.ones(6, np.float32)}
        args[name] = self.da.from_array(args[name])
        with pytest.raises(TypeError, match=f"{name} must be an in-memory array"):
            self.dask.conv2d(**args, **kwargs)

    def test_mixed_dtypes_name_both(self):
        arrays, kwargs = self._arrays()
        with pytest.raises(TypeError, match="input is float32, weight is float64"):
            self.dask.conv2d(self.da.from_array(arrays["input"]),
                             arrays["weight"].astype(np.float64), **kwargs)
