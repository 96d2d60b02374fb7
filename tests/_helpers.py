"""Shared test helpers: random cases and comparisons against the oracle."""
import numpy as np

import dilconv
from dilconv import reference, tolerance
from dilconv._validate import make_spec


def random_case(rng, n, c, h, w, o, kh, kw, groups, dtype, bias=True):
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    wt = rng.standard_normal((o, c // groups, kh, kw)).astype(dtype)
    b = rng.standard_normal(o).astype(dtype) if bias else None
    return x, wt, b


def check_forward(x, w, b, stride=1, padding=0, dilation=1, groups=1, threads=None):
    """Run conv2d and assert it is within the derived bound of the oracle."""
    spec = make_spec(x.shape, w.shape, stride, padding, dilation, groups)
    y = dilconv.conv2d(x, w, b, stride, padding, dilation, groups)
    assert y.dtype == x.dtype and y.shape == spec.output_shape
    args = (spec.stride, spec.padding, spec.dilation, spec.groups)
    expected = reference.conv2d_reference(x, w, b, *args)
    ratio = tolerance.worst_ratio(y, expected, forward_bound(x, w, b, spec))
    assert ratio <= 1.0, f"forward off by {ratio:.3g} x bound"
    return y


def check_backward(gy, x, w, stride=1, padding=0, dilation=1, groups=1):
    spec = make_spec(x.shape, w.shape, stride, padding, dilation, groups)
    grads = dilconv.conv2d_backward(gy, x, w, stride, padding, dilation, groups)
    args = (spec.stride, spec.padding, spec.dilation, spec.groups)
    expected = reference.conv2d_backward_reference(gy, x, w, *args)
    for name, got, exp, bound, like in zip(("input", "weight", "bias"), grads, expected,
                                           backward_bounds(gy, x, w, spec),
                                           (x, w, w[:, 0, 0, 0])):
        assert got.shape == like.shape and got.dtype == x.dtype, name
        ratio = tolerance.worst_ratio(got, exp, bound)
        assert ratio <= 1.0, f"grad {name} off by {ratio:.3g} x bound"
    return grads


def forward_bound(x, w, b, spec):
    """Per-element error bound of conv2d(x, w, b) for the validated `spec`."""
    args = (spec.stride, spec.padding, spec.dilation, spec.groups)
    abs_sum = reference.conv2d_reference_abs(x, w, *args)
    if b is not None:
        abs_sum = abs_sum + np.abs(b.astype(np.float64))[None, :, None, None]
    return tolerance.error_bound(abs_sum, tolerance.forward_terms(spec, b is not None),
                                 x.dtype)


def backward_bounds(gy, x, w, spec):
    """Per-element error bounds of the (input, weight, bias) gradients."""
    args = (spec.stride, spec.padding, spec.dilation, spec.groups)
    abs_sums = reference.conv2d_backward_reference_abs(gy, x, w, *args)
    terms = (tolerance.grad_input_terms(spec), tolerance.grad_weight_terms(spec),
             tolerance.grad_weight_terms(spec))
    return tuple(tolerance.error_bound(a, k, x.dtype) for a, k in zip(abs_sums, terms))


def assert_rejects(fn, kwargs, exc, words):
    """fn(**kwargs) raises `exc` whose message contains each of `words`."""
    import pytest
    with pytest.raises(exc) as info:
        fn(**kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
