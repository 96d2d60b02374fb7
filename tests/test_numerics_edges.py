"""NaN/Inf propagation, denormal inputs, float32 sums of 10**5 terms.

The oracle multiplies the zeros it inserts and pads with (0 * inf = nan), so non-finite
cases are checked against a direct sum over the taps that fall inside the image (what the
kernels promise: taps in the zero padding are never multiplied) and against PyTorch.
"""
import time

import numpy as np
import pytest

import dilconv
from dilconv import tolerance
from dilconv._dispatch import PATHS
from dilconv._tuning import tuning
from dilconv._validate import make_spec

from _helpers import check_backward, check_forward


def _taps(spec):
    """Per tap: (kh, kw, out rows, out cols, in rows, in cols) of the in-image outputs."""
    for kh in range(spec.kh):
        for kw in range(spec.kw):
            oh = np.arange(spec.oh_lo[kh], spec.oh_hi[kh])
            ow = np.arange(spec.ow_lo[kw], spec.ow_hi[kw])
            ih = oh * spec.stride[0] + kh * spec.dilation[0] - spec.padding[0][0]
            iw = ow * spec.stride[1] + kw * spec.dilation[1] - spec.padding[1][0]
            yield kh, kw, oh, ow, ih, iw


def _direct_sums(x, w, b, gy, spec):
    """Forward and all gradients as float64 sums over in-image taps only (tiny shapes)."""
    with np.errstate(invalid="ignore"):       # inf - inf is the point here
        return _direct_sums_unchecked(x, w, b, gy, spec)


def _direct_sums_unchecked(x, w, b, gy, spec):
    cg, og = spec.c // spec.groups, spec.o // spec.groups
    y = np.zeros(spec.output_shape) + (0 if b is None else b[None, :, None, None])
    gx, gw = np.zeros(x.shape), np.zeros(w.shape)
    for o in range(spec.o):
        for ci in range(cg):
            c = (o // og) * cg + ci
            for kh, kw, oh, ow, ih, iw in _taps(spec):
                xs = x[:, c][:, ih][:, :, iw]
                y[:, o, oh[:, None], ow] += w[o, ci, kh, kw] * xs
                gyo = gy[:, o][:, oh][:, :, ow]
                gx[:, c, ih[:, None], iw] += w[o, ci, kh, kw] * gyo
                gw[o, ci, kh, kw] += (gyo * xs).sum()
    return y, gx, gw, gy.sum(axis=(0, 2, 3))


def _same_nonfinite(got, want):
    """Identical NaN and +-Inf positions; the finite rest is compared separately."""
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want))
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))


def _poison(rng, a, count):
    flat = a.reshape(-1)
    idx = rng.choice(flat.size, size=min(count, flat.size), replace=False)
    flat[idx] = rng.choice([np.nan, np.inf, -np.inf], size=idx.size)
    return a


GEOMETRIES = [
    # (x shape, w shape, stride, padding, dilation, groups)
    ((2, 4, 9, 10), (6, 2, 3, 3), 1, 3, 2, 2),                # padding wider than taps
    ((1, 3, 11, 8), (4, 3, 3, 2), (2, 1), ((4, 0), (1, 3)), (3, 2), 1),
    ((2, 16, 7, 7), (16, 16, 3, 3), 1, 2, 2, 1),              # gemm by default
    ((2, 3, 8, 27), (6, 1, 3, 3), 1, ((3, 1), (4, 2)), (2, 3), 3),   # depthwise by default
]


@pytest.mark.parametrize("where", ["input", "weight", "bias", "grad_output"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_nonfinite_values_propagate_like_the_tap_sum(geometry, path, where, rng):
    xs, ws, stride, padding, dilation, groups = geometry
    spec = make_spec(xs, ws, stride, padding, dilation, groups)
    arrays = dict(input=rng.standard_normal(xs), weight=rng.standard_normal(ws),
                  bias=rng.standard_normal(ws[0]),
                  grad_output=rng.standard_normal(spec.output_shape))
    _poison(rng, arrays[where], 3)
    x, w, b, gy = (arrays[k].astype(np.float32) for k in ("input", "weight", "bias",
                                                          "grad_output"))
    expected = _direct_sums(*(a.astype(np.float64) for a in (x, w, b, gy)), spec)
    with tuning(path=path):
        y = dilconv.conv2d(x, w, b, stride, padding, dilation, groups)
        grads = dilconv.conv2d_backward(gy, x, w, stride, padding, dilation, groups)
    abs_sums = _direct_sums(*(np.abs(np.nan_to_num(a.astype(np.float64), posinf=0,
                                                   neginf=0)) for a in (x, w, b, gy)), spec)
    terms = (tolerance.forward_terms(spec, True), tolerance.grad_input_terms(spec),
             tolerance.grad_weight_terms(spec), tolerance.grad_weight_terms(spec))
    for got, want, abs_sum, k in zip((y,) + tuple(grads), expected, abs_sums, terms):
        _same_nonfinite(got, want)
        bound = tolerance.error_bound(abs_sum, k, np.float32)
        with np.errstate(invalid="ignore"):   # inf - inf where both are inf
            assert tolerance.worst_ratio(got, want, bound) <= 1


def test_weight_nan_in_the_padding_is_not_multiplied():
    # Hand-computed: a NaN corner tap meets only padding for the first output row and
    # column, so those outputs stay finite (the tap is skipped, not multiplied by 0).
    w = np.ones((1, 1, 3, 3))
    w[0, 0, 0, 0] = np.nan
    y = dilconv.conv2d(np.ones((1, 1, 4, 4)), w, padding=1)[0, 0]
    np.testing.assert_array_equal(y[0], [4, 6, 6, 4])
    np.testing.assert_array_equal(y[:, 0], [4, 6, 6, 4])
    assert np.isnan(y[1:, 1:]).all()


@pytest.mark.parametrize("path", PATHS)
def test_nonfinite_inputs_match_torch(path, rng):
    """Non-finite inputs and biases propagate exactly as in PyTorch.

    With non-finite *weights* PyTorch's CPU kernels multiply the zero padding
    (0 * nan = nan, 0 * inf = nan), so outputs whose NaN/Inf tap lies in the padding are
    NaN there and finite here; only outputs that use every tap are compared for them.
    """
    torch = pytest.importorskip("torch")
    xs, ws, stride, padding, dilation, groups = (2, 16, 9, 9), (16, 8, 3, 3), 1, 2, 2, 2
    x = _poison(rng, rng.standard_normal(xs), 6).astype(np.float32)
    w = _poison(rng, rng.standard_normal(ws), 2).astype(np.float32)
    b = _poison(rng, rng.standard_normal(ws[0]), 1).astype(np.float32)
    finite_w = np.where(np.isfinite(w), w, 0)
    with tuning(path=path):
        y = dilconv.conv2d(x, w, b, stride, padding, dilation, groups)
        y_finite_w = dilconv.conv2d(x, finite_w, b, stride, padding, dilation, groups)
    args = (stride, padding, dilation, groups)
    ty = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w),
                                    torch.from_numpy(b), *args).numpy()
    ty_finite_w = torch.nn.functional.conv2d(torch.from_numpy(x),
                                             torch.from_numpy(finite_w),
                                             torch.from_numpy(b), *args).numpy()
    _same_nonfinite(y_finite_w, ty_finite_w)
    _same_nonfinite(y[:, :, 2:-2, 2:-2], ty[:, :, 2:-2, 2:-2])   # every tap in the image
    assert np.isnan(ty).sum() >= np.isnan(y).sum()


def _timed(fn, repeat=5):
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype, tiny", [(np.float32, 1e-40), (np.float64, 1e-310)])
def test_denormals_do_not_slow_kernels_down_catastrophically(path, dtype, tiny, rng):
    """Inputs and products in the subnormal range against normal ones (timing; slow)."""
    x = rng.uniform(0.5, 1, (2, 32, 64, 64)).astype(dtype)
    w = rng.uniform(0.5, 1, (32, 32, 3, 3)).astype(dtype)
    gy = rng.uniform(0.5, 1, (2, 32, 60, 60)).astype(dtype)
    ratios = {}
    with tuning(path=path):
        for what, fn in (("forward", lambda a: dilconv.conv2d(a, w, dilation=2)),
                         ("backward", lambda a: dilconv.conv2d_backward(gy, a, w,
                                                                        dilation=2))):
            normal = _timed(lambda: fn(x))
            subnormal = _timed(lambda: fn(x * dtype(tiny)))
            ratios[what] = subnormal / normal
    print(f"subnormal / normal time, {np.dtype(dtype).name}, {path}: {ratios}")
    # x86 without flush-to-zero pays ~100 cycles per subnormal operation; a slowdown of
    # two orders of magnitude would make a model with tiny activations unusable.
    assert max(ratios.values()) < 100, ratios


@pytest.mark.parametrize("path", PATHS)
def test_float32_forward_sums_of_1e5_terms(path, rng):
    # C_in x kH x kW = 11200 x 3 x 3 = 100,800 terms per output.
    x = rng.standard_normal((1, 11200, 6, 6)).astype(np.float32)
    w = rng.standard_normal((2, 11200, 3, 3)).astype(np.float32)
    b = rng.standard_normal(2).astype(np.float32)
    with tuning(path=path):
        check_forward(x, w, b, padding=1, dilation=2)


@pytest.mark.parametrize("path", PATHS)
def test_float32_backward_sums_of_1e5_terms(path, rng):
    # grad weight / bias: N x Ho x Wo = 2 x 226 x 226 = 102,152 terms; grad input: O x 3 x 3
    # = 11,250 x 9 = 101,250 terms.
    x = rng.standard_normal((2, 2, 230, 230)).astype(np.float32)
    w = rng.standard_normal((2, 2, 3, 3)).astype(np.float32)
    gy = rng.standard_normal((2, 2, 226, 226)).astype(np.float32)
    with tuning(path=path):
        check_backward(gy, x, w, dilation=2)
    x = rng.standard_normal((1, 1, 6, 6)).astype(np.float32)
    w = rng.standard_normal((11250, 1, 3, 3)).astype(np.float32)
    gy = rng.standard_normal((1, 11250, 4, 4)).astype(np.float32)
    with tuning(path=path):
        check_backward(gy, x, w, padding=1, dilation=2)
