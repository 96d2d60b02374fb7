"""conv_transpose2d and its backward against the oracle (as conv2d's adjoint)."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import dilconv
from dilconv._dispatch import PATHS
from dilconv._tuning import tuning
from dilconv._validate import padding_amounts

from dilconv.testing import (assert_expected, conv_transpose2d_backward_expected,
                             conv_transpose2d_expected)

from _helpers import assert_adjoint, assert_rejects

CASES = [
    # (n, c_in, h, w, c_out/groups, kh, kw, stride, padding, output_padding, dilation, groups)
    (2, 3, 5, 6, 4, 3, 3, 1, 0, 0, 1, 1),
    (1, 4, 5, 4, 3, 3, 2, (2, 1), (1, 0), (1, 0), (1, 2), 2),
    (2, 2, 3, 3, 2, 3, 3, 1, 0, 1, 2, 1),                     # output_padding >= stride
    (1, 3, 4, 4, 1, 2, 2, 3, 2, 2, 1, 3),                     # depthwise-like
    (2, 2, 6, 5, 2, 3, 3, (1, 2), ((3, 1), (0, 2)), (0, 1), (3, 1), 1),   # asymmetric
    (1, 8, 6, 6, 8, 3, 3, 2, 1, 1, 2, 1),                     # many channels (gemm)
    (0, 2, 3, 3, 2, 3, 3, 2, 0, 1, 1, 1),                     # empty batch
    (1, 1, 1, 1, 2, 1, 1, 1, 0, 0, 1, 1),                     # 1 pixel
]


def _normalise(case):
    n, c, h, w, og, kh, kw, stride, padding, op, dilation, groups = case
    pair = lambda v: v if isinstance(v, tuple) else (v, v)
    stride, op, dilation = pair(stride), pair(op), pair(dilation)
    pads = padding_amounts(padding, (kh, kw), stride, dilation)
    return stride, pads, op, dilation


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_matches_oracle(case, bias, dtype, path, rng):
    n, c, h, w, og, kh, kw, stride, padding, op, dilation, groups = case
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    wt = rng.standard_normal((c, og, kh, kw)).astype(dtype)
    b = rng.standard_normal(og * groups).astype(dtype) if bias else None
    args = (stride, padding, op, groups, dilation)
    oracle_args = _normalise(case) + (groups,)
    with tuning(path=path):
        y = dilconv.conv_transpose2d(x, wt, b, *args)
        assert y.dtype == dtype
        assert_expected(y, conv_transpose2d_expected(x, wt, b, *oracle_args), dtype,
                        what="forward")
        gy = rng.standard_normal(y.shape).astype(dtype)
        grads = dilconv.conv_transpose2d_backward(gy, x, wt, *args)
    for name, got, want in zip(("input", "weight", "bias"), grads,
                               conv_transpose2d_backward_expected(gy, x, wt, *oracle_args)):
        assert got.dtype == dtype
        assert_expected(got, want, dtype, what=f"grad {name}")


def test_output_size_formula():
    # (H-1)*s - (pt+pb) + d*(k-1) + output_padding + 1, per axis.
    y = dilconv.conv_transpose2d(np.zeros((1, 2, 5, 7)), np.zeros((2, 3, 3, 2)),
                                 stride=(2, 3), padding=((1, 2), (0, 1)),
                                 output_padding=(1, 0), dilation=(2, 4))
    assert y.shape == (1, 3, 4 * 2 - 3 + 2 * 2 + 1 + 1, 6 * 3 - 1 + 4 * 1 + 0 + 1)


def test_seed_kernel_scattered_by_hand():
    # conv_transpose2d of the seed output with the seed kernel is conv2d's input gradient:
    # each output value spreads w * value over the dilated window.
    y = np.array([[8.0, 10.0], [2.0, 8.0]])
    w = np.array([[2.0, 0.0], [1.0, 3.0]])
    got = dilconv.conv_transpose2d(y[None, None], w[None, None], dilation=2)[0, 0]
    np.testing.assert_array_equal(got, [[16, 20, 0, 0], [4, 16, 0, 0],
                                        [8, 10, 24, 30], [2, 8, 6, 24]])


@pytest.mark.parametrize("case", CASES[:6])
def test_is_the_adjoint_of_conv2d(case, rng):
    # <conv_transpose2d(x), z> = <x, conv2d(z)> with the same weight and arguments.
    n, c, h, w, og, kh, kw, stride, padding, op, dilation, groups = case
    x = rng.standard_normal((n, c, h, w))
    wt = rng.standard_normal((c, og, kh, kw))
    y = dilconv.conv_transpose2d(x, wt, None, stride, padding, op, groups, dilation)
    z = rng.standard_normal(y.shape)
    cz = dilconv.conv2d(z, wt, None, stride, padding, dilation, groups)
    cz = cz[:, :, :h, :w]               # output_padding rows no input reads
    scale = np.vdot(dilconv.conv_transpose2d(np.abs(x), np.abs(wt), None, stride, padding,
                                             op, groups, dilation), np.abs(z))
    assert_adjoint(np.vdot(y, z), np.vdot(x, cz), scale, wt.size + y.size + x.size)


def test_unbatched_and_needs(rng):
    x = rng.standard_normal((2, 4, 5)).astype(np.float32)
    wt = rng.standard_normal((2, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    y = dilconv.conv_transpose2d(x, wt, b, 2, 1, 1, 1, 2)
    np.testing.assert_array_equal(y, dilconv.conv_transpose2d(x[None], wt, b, 2, 1, 1, 1,
                                                              2)[0])
    g1 = dilconv.conv_transpose2d_backward(y, x, wt, 2, 1, 1, 1, 2)
    g4 = dilconv.conv_transpose2d_backward(y[None], x[None], wt, 2, 1, 1, 1, 2)
    for a, b_ in zip(g1, g4):
        np.testing.assert_array_equal(a, b_[0] if a.ndim == 3 else b_)
    g = dilconv.conv_transpose2d_backward(y, x, wt, 2, 1, 1, 1, 2, needs=("weight",))
    assert g.input is None and g.bias is None
    np.testing.assert_array_equal(g.weight, g1.weight)


X = np.zeros((1, 4, 5, 5), np.float32)
W = np.zeros((4, 3, 3, 3), np.float32)


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(output_padding=1), ValueError, ["output_padding", "stride", "dilation"]),
    (dict(output_padding=(0, 2), stride=2), ValueError, ["output_padding=(0, 2)"]),
    (dict(output_padding=-1), ValueError, ["output_padding", ">= 0"]),
    (dict(padding=7), ValueError, ["output height", "-"]),
    (dict(padding="same"), ValueError, ["padding", "'same'"]),
    (dict(weight=np.zeros((3, 3, 3, 3), np.float32)), ValueError,
     ["weight.shape[0]", "C_in=4", "(3, 3, 3, 3)"]),
    (dict(groups=3), ValueError, ["groups=3", "C_in=4"]),
    (dict(groups=1.0), TypeError, ["groups"]),
    (dict(bias=np.zeros(4, np.float32)), ValueError, ["bias", "(3,)", "(4,)"]),
    (dict(weight=W.astype(np.float64)), TypeError, ["float32", "float64"]),
    (dict(input=np.zeros((4, 5), np.float32)), ValueError, ["input", "(4, 5)"]),
    (dict(stride=0), ValueError, ["stride"]),
])
def test_rejects(kwargs, exc, words):
    assert_rejects(dilconv.conv_transpose2d, {"input": X, "weight": W, **kwargs}, exc, words)


def test_backward_rejects_wrong_grad_output():
    with pytest.raises(ValueError, match=r"grad_output.*\(1, 3, 7, 7\)"):
        dilconv.conv_transpose2d_backward(np.zeros((1, 3, 7, 6), np.float32), X, W)


@st.composite
def transpose_cases(draw):
    groups = draw(st.sampled_from([1, 2]))
    c, og = groups * draw(st.integers(1, 2)), draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    op = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
    pads = tuple((draw(st.integers(0, 3)), draw(st.integers(0, 3))) for _ in range(2))
    h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    return (draw(st.integers(0, 2)), c, h, w, og, kh, kw, stride, pads, op, dilation, groups,
            draw(st.sampled_from([np.float32, np.float64])), draw(st.booleans()),
            draw(st.integers(0, 2 ** 32 - 1)))


@given(transpose_cases())
def test_property_random_cases_match_oracle(case):
    n, c, h, w, og, kh, kw, stride, pads, op, dilation, groups, dtype, bias, seed = case
    sizes = [(size - 1) * s - lo - hi + d * (k - 1) + p + 1 for size, k, s, d, p, (lo, hi)
             in zip((h, w), (kh, kw), stride, dilation, op, pads)]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    wt = rng.standard_normal((c, og, kh, kw)).astype(dtype)
    b = rng.standard_normal(og * groups).astype(dtype) if bias else None
    args = (stride, pads, op, groups, dilation)
    if min(sizes) < 0:
        with pytest.raises(ValueError, match="output"):
            dilconv.conv_transpose2d(x, wt, b, *args)
        return
    if min(sizes) == 0:                 # empty output (as PyTorch allows): zero gradients
        y = dilconv.conv_transpose2d(x, wt, b, *args)
        assert y.shape == (n, og * groups, *sizes)
        grads = dilconv.conv_transpose2d_backward(y, x, wt, *args)
        assert not any(g.any() for g in grads)
        assert (grads.input.shape, grads.weight.shape) == (x.shape, wt.shape)
        return
    oracle_args = (stride, pads, op, dilation, groups)
    y = dilconv.conv_transpose2d(x, wt, b, *args)
    assert_expected(y, conv_transpose2d_expected(x, wt, b, *oracle_args), dtype,
                    what="forward")
    gy = rng.standard_normal(y.shape).astype(dtype)
    grads = dilconv.conv_transpose2d_backward(gy, x, wt, *args)
    for got, want in zip(grads, conv_transpose2d_backward_expected(gy, x, wt, *oracle_args)):
        assert_expected(got, want, dtype)
