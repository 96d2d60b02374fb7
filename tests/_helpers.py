"""Shared test helpers: random cases, thread counts, and the oracle checks of
dilconv.testing."""
import contextlib

import numpy as np

import dilconv
from dilconv import tolerance
from dilconv.testing import assert_conv_close, conv2d_backward_expected, conv2d_expected


def random_case(rng, n, c, h, w, o, kh, kw, groups, dtype, bias=True):
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    wt = rng.standard_normal((o, c // groups, kh, kw)).astype(dtype)
    b = rng.standard_normal(o).astype(dtype) if bias else None
    return x, wt, b


@contextlib.contextmanager
def num_threads(threads):
    """dilconv's thread count set within the block, the default again after it."""
    dilconv.set_num_threads(threads)
    try:
        yield
    finally:
        dilconv.set_num_threads(None)


def check_forward(x, w, b, stride=1, padding=0, dilation=1, groups=1, threads=None):
    """Run conv2d and assert it is within the derived bound of the oracle."""
    y = dilconv.conv2d(x, w, b, stride, padding, dilation, groups)
    assert y.dtype == x.dtype
    assert_conv_close(y, "conv2d", x, w, b, stride, padding, dilation, groups)
    return y


def check_backward(gy, x, w, stride=1, padding=0, dilation=1, groups=1):
    grads = dilconv.conv2d_backward(gy, x, w, stride, padding, dilation, groups)
    for name, got, like in zip(("input", "weight", "bias"), grads, (x, w, w[:, 0, 0, 0])):
        assert got.shape == like.shape and got.dtype == x.dtype, name
    assert_conv_close(grads, "conv2d_backward", gy, x, w, stride, padding, dilation, groups)
    return grads


def forward_bound(x, w, b, spec):
    """Per-element error bound of conv2d(x, w, b) for the validated `spec`."""
    return conv2d_expected(x, w, b, spec.stride, spec.padding, spec.dilation,
                           spec.groups).bound(x.dtype)


def backward_bounds(gy, x, w, spec):
    """Per-element error bounds of the (input, weight, bias) gradients."""
    return tuple(e.bound(x.dtype) for e in conv2d_backward_expected(
        gy, x, w, spec.stride, spec.padding, spec.dilation, spec.groups))


def assert_adjoint(lhs, rhs, scale, terms):
    """Two float64 sums of the same `scale` = sum|terms|, each of up to `terms` rounded
    additions, agree within the derived bound."""
    bound = tolerance.error_bound(scale, terms, np.float64)
    assert abs(lhs - rhs) <= bound, (lhs, rhs, float(bound))


def assert_rejects(fn, kwargs, exc, words):
    """fn(**kwargs) raises `exc` whose message contains each of `words`."""
    import pytest
    with pytest.raises(exc) as info:
        fn(**kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
