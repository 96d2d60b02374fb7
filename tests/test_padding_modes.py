"""padding_mode 'reflect', 'replicate', 'circular': oracle, PyTorch, PyTorch's size rules."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import dilconv
from dilconv._validate import make_spec

from dilconv.testing import assert_expected, conv2d_backward_expected, conv2d_expected

from _helpers import assert_adjoint, random_case

MODES = ("reflect", "replicate", "circular")

CASES = [
    # (n, c, h, w, o, kh, kw, stride, padding, dilation, groups)
    (2, 2, 7, 8, 3, 3, 3, 1, 1, 1, 1),
    (1, 4, 9, 6, 4, 3, 2, (2, 1), (2, 3), (2, 3), 2),
    (2, 3, 6, 7, 3, 3, 3, 1, "same", 2, 3),                 # depthwise, 'same'
    (1, 2, 5, 5, 2, 2, 3, (1, 2), ((4, 0), (1, 3)), 2, 1),  # asymmetric
    (1, 1, 4, 4, 1, 2, 2, 1, ((3, 3), (3, 3)), 3, 1),       # reflect's limit: size - 1
    (2, 2, 8, 1, 2, 3, 1, 1, ((2, 2), (0, 0)), 2, 1),       # width 1, no width padding
    (0, 2, 5, 5, 2, 3, 3, 1, 1, 1, 1),                      # empty batch
]


def _pads(case, x_shape, w_shape):
    n, c, h, w, o, kh, kw, stride, padding, dilation, groups = case
    return make_spec(x_shape, w_shape, stride, padding, dilation, groups)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES)
def test_matches_oracle(case, mode, dtype, rng):
    n, c, h, w, o, kh, kw, stride, padding, dilation, groups = case
    x, wt, b = random_case(rng, n, c, h, w, o, kh, kw, groups, dtype)
    spec = _pads(case, x.shape, wt.shape)
    args = (spec.stride, spec.padding, spec.dilation, groups, mode)
    y = dilconv.conv2d(x, wt, b, stride, padding, dilation, groups, padding_mode=mode)
    assert y.dtype == dtype
    assert_expected(y, conv2d_expected(x, wt, b, *args), dtype, what="forward")
    gy = rng.standard_normal(y.shape).astype(dtype)
    grads = dilconv.conv2d_backward(gy, x, wt, stride, padding, dilation, groups,
                                    padding_mode=mode)
    for name, got, want in zip(("input", "weight", "bias"), grads,
                               conv2d_backward_expected(gy, x, wt, *args)):
        assert got.dtype == dtype
        assert_expected(got, want, dtype, what=f"grad {name}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES[:5])
def test_backward_is_the_adjoint(case, mode, rng):
    # <conv(x), g> = <x, grad_input>: checks the fold without any oracle.
    n, c, h, w, o, kh, kw, stride, padding, dilation, groups = case
    x, wt, _ = random_case(rng, n, c, h, w, o, kh, kw, groups, np.float64, bias=False)
    args = (stride, padding, dilation, groups)
    y = dilconv.conv2d(x, wt, None, *args, padding_mode=mode)
    g = rng.standard_normal(y.shape)
    gx = dilconv.conv2d_backward(g, x, wt, *args, padding_mode=mode, needs="input").input
    # Scale: the sum of |w x g| over every product in either side.
    scale = np.vdot(dilconv.conv2d(np.abs(x), np.abs(wt), None, *args, padding_mode=mode),
                    np.abs(g))
    assert_adjoint(np.vdot(y, g), np.vdot(x, gx), scale, wt[0].size * o + y.size + x.size)


def test_hand_computed_1d_modes():
    # One row [1, 2, 3], kernel [1] (identity), padding 2 each side.
    x = np.array([[[[1.0, 2.0, 3.0]]]])
    w = np.ones((1, 1, 1, 1))
    expected = {"replicate": [1, 1, 1, 2, 3, 3, 3], "circular": [2, 3, 1, 2, 3, 1, 2],
                "reflect": [3, 2, 1, 2, 3, 2, 1]}
    for mode, row in expected.items():
        y = dilconv.conv2d(x, w, padding=((0, 0), (2, 2)), padding_mode=mode)
        np.testing.assert_array_equal(y[0, 0, 0], row)
        # Gradient of sum(y): how often each pixel was copied.
        g = dilconv.conv2d_backward(np.ones_like(y), x, w, padding=((0, 0), (2, 2)),
                                    padding_mode=mode, needs="input").input
        np.testing.assert_array_equal(g[0, 0, 0], [row.count(v) for v in (1, 2, 3)])


@pytest.mark.parametrize("mode", MODES)
def test_unbatched_and_out(mode, rng):
    x, wt, b = random_case(rng, 1, 2, 6, 6, 3, 3, 3, 1, np.float32)
    y = dilconv.conv2d(x, wt, b, padding=2, dilation=2, padding_mode=mode)
    np.testing.assert_array_equal(
        dilconv.conv2d(x[0], wt, b, padding=2, dilation=2, padding_mode=mode), y[0])
    out = np.empty_like(y)
    assert dilconv.conv2d(x, wt, b, padding=2, dilation=2, padding_mode=mode, out=out) is out
    np.testing.assert_array_equal(out, y)
    g1 = dilconv.conv2d_backward(y[0], x[0], wt, padding=2, dilation=2, padding_mode=mode)
    g4 = dilconv.conv2d_backward(y, x, wt, padding=2, dilation=2, padding_mode=mode)
    np.testing.assert_array_equal(g1.input, g4.input[0])
    np.testing.assert_array_equal(g1.weight, g4.weight)


@pytest.mark.parametrize("mode, size, pad, ok", [
    ("reflect", 4, 3, True), ("reflect", 4, 4, False), ("reflect", 1, 1, False),
    ("reflect", 1, 0, True),
    ("circular", 4, 4, True), ("circular", 4, 5, False), ("circular", 1, 1, True),
    ("replicate", 1, 7, True), ("replicate", 3, 30, True),
])
def test_padding_limits(mode, size, pad, ok):
    x = np.zeros((1, 1, 5, size))
    w = np.zeros((1, 1, 1, 1))
    for padding in (((0, 0), (pad, 0)), ((0, 0), (0, pad)), (0, pad)):
        if ok:
            dilconv.conv2d(x, w, padding=padding, padding_mode=mode)
            continue
        with pytest.raises(ValueError) as info:
            dilconv.conv2d(x, w, padding=padding, padding_mode=mode)
        for word in ("padding", mode, f"is {pad}", f"width is {size}"):
            assert word in str(info.value), (word, str(info.value))
        with pytest.raises(ValueError, match=mode):
            dilconv.conv2d_backward(np.zeros((1, 1, 5, size + pad)), x, w, padding=padding,
                                    padding_mode=mode)


def test_same_padding_limit_is_checked(rng):
    # 'same' with a dilated kernel pads 4 per side: too much to reflect a 4-wide image.
    x = np.zeros((1, 1, 9, 4))
    w = np.zeros((1, 1, 3, 3))
    with pytest.raises(ValueError, match="reflect"):
        dilconv.conv2d(x, w, padding="same", dilation=4, padding_mode="reflect")
    assert dilconv.conv2d(x, w, padding="same", dilation=4,
                          padding_mode="circular").shape == x.shape


@st.composite
def mode_cases(draw):
    mode = draw(st.sampled_from(MODES))
    groups = draw(st.sampled_from([1, 2]))
    c, o = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    limit = {"reflect": lambda s: s - 1, "circular": lambda s: s, "replicate": lambda s: 8}
    pads = tuple((draw(st.integers(0, limit[mode](s))), draw(st.integers(0, limit[mode](s))))
                 for s in (h, w))
    return (mode, draw(st.integers(0, 2)), c, h, w, o, kh, kw, stride, pads, dilation,
            groups, draw(st.sampled_from([np.float32, np.float64])),
            draw(st.integers(0, 2 ** 32 - 1)))


@given(mode_cases())
def test_property_random_modes_match_oracle(case):
    mode, n, c, h, w, o, kh, kw, stride, pads, dilation, groups, dtype, seed = case
    rng = np.random.default_rng(seed)
    try:
        spec = make_spec((n, c, h, w), (o, c // groups, kh, kw), stride, pads, dilation,
                         groups)
    except ValueError:
        return      # dilated kernel larger than the padded image: not this test's subject
    x, wt, b = random_case(rng, n, c, h, w, o, kh, kw, groups, dtype)
    args = (stride, pads, dilation, groups)
    y = dilconv.conv2d(x, wt, b, *args, padding_mode=mode)
    assert_expected(y, conv2d_expected(x, wt, b, *args, mode), dtype, what="forward")
    gy = rng.standard_normal(spec.output_shape).astype(dtype)
    grads = dilconv.conv2d_backward(gy, x, wt, *args, padding_mode=mode)
    for got, want in zip(grads, conv2d_backward_expected(gy, x, wt, *args, mode)):
        assert_expected(got, want, dtype)
