"""conv1d / conv1d_backward (incl. causal) against the oracle and by construction."""
import numpy as np
import pytest

import dilconv
from dilconv._validate import make_spec
from dilconv.testing import assert_expected, conv2d_backward_expected, conv2d_expected

from _helpers import assert_rejects

CASES = [
    # (n, c, length, o, k, stride, padding, dilation, groups, padding_mode)
    (2, 3, 20, 4, 3, 1, 0, 1, 1, "zeros"),
    (1, 4, 33, 4, 2, 1, (8, 0), 8, 2, "zeros"),       # WaveNet-like layer
    (3, 2, 17, 6, 3, 2, (2,), 3, 2, "zeros"),
    (2, 4, 15, 4, 5, 1, "same", 2, 4, "zeros"),        # depthwise, 'same'
    (1, 2, 9, 2, 3, 1, "valid", 4, 1, "zeros"),
    (2, 2, 12, 3, 3, 1, 4, 2, 1, "reflect"),
    (2, 2, 12, 3, 3, 3, (5, 1), 2, 1, "circular"),
    (1, 3, 7, 3, 2, 1, "same", 3, 3, "replicate"),
    (0, 2, 8, 2, 3, 1, 1, 1, 1, "zeros"),
]


def _as_2d(x, w, stride, padding, dilation):
    """The conv2d arguments of a conv1d: (N, C, 1, L) and (O, C/g, 1, k)."""
    if isinstance(padding, str):
        pads = padding
    else:
        p = (padding,) if isinstance(padding, int) else padding
        pads = ((0, 0), (p[0], p[-1]))
    return x[:, :, None], w[:, :, None], (1, stride), pads, (1, dilation)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES)
def test_matches_oracle(case, dtype, rng):
    n, c, length, o, k, stride, padding, dilation, groups, mode = case
    x = rng.standard_normal((n, c, length)).astype(dtype)
    w = rng.standard_normal((o, c // groups, k)).astype(dtype)
    b = rng.standard_normal(o).astype(dtype)
    x2, w2, s2, p2, d2 = _as_2d(x, w, stride, padding, dilation)
    spec = make_spec(x2.shape, w2.shape, s2, p2, d2, groups)
    args = (spec.stride, spec.padding, spec.dilation, groups)
    y = dilconv.conv1d(x, w, b, stride, padding, dilation, groups, padding_mode=mode)
    assert y.dtype == dtype and y.shape == (n, o, spec.wo)
    gy = rng.standard_normal(y.shape).astype(dtype)
    grads = dilconv.conv1d_backward(gy, x, w, stride, padding, dilation, groups,
                                    padding_mode=mode)
    forward = conv2d_expected(x2, w2, b, *args, mode)
    assert_expected(y, forward.reshape(y.shape), dtype, what="forward")
    backward = conv2d_backward_expected(gy[:, :, None], x2, w2, *args, mode)
    for name, got, like, exp in zip(("input", "weight", "bias"), grads, (x, w, b), backward):
        assert got.shape == like.shape and got.dtype == dtype, name
        assert_expected(got, exp.reshape(like.shape), dtype, what=f"grad {name}")


@pytest.mark.parametrize("k, dilation, stride", [(2, 1, 1), (2, 8, 1), (3, 4, 2), (1, 5, 1)])
def test_causal(k, dilation, stride, rng):
    x = rng.standard_normal((2, 3, 40))
    w = rng.standard_normal((4, 3, k))
    y = dilconv.conv1d(x, w, stride=stride, dilation=dilation, causal=True)
    explicit = dilconv.conv1d(x, w, stride=stride, padding=((k - 1) * dilation, 0),
                              dilation=dilation)
    np.testing.assert_array_equal(y, explicit)
    if stride == 1:
        assert y.shape[-1] == x.shape[-1]
    # Output t never depends on inputs after t*stride.
    t0 = 17
    x2 = x.copy()
    x2[..., t0:] = rng.standard_normal(x2[..., t0:].shape)
    y2 = dilconv.conv1d(x2, w, stride=stride, dilation=dilation, causal=True)
    reached = t0 // stride + (t0 % stride > 0)          # first t with t*stride >= t0
    np.testing.assert_array_equal(y2[..., :reached], y[..., :reached])
    assert not np.array_equal(y2[..., reached:], y[..., reached:])
    gy = rng.standard_normal(y.shape)
    for a, b in zip(dilconv.conv1d_backward(gy, x, w, stride=stride, dilation=dilation,
                                            causal=True),
                    dilconv.conv1d_backward(gy, x, w, stride=stride,
                                            padding=((k - 1) * dilation, 0),
                                            dilation=dilation)):
        np.testing.assert_array_equal(a, b)


def test_unbatched_out_and_views(rng):
    x = rng.standard_normal((3, 25)).astype(np.float32)
    w = rng.standard_normal((2, 3, 3)).astype(np.float32)
    y = dilconv.conv1d(x, w, dilation=4)
    np.testing.assert_array_equal(y, dilconv.conv1d(x[None], w, dilation=4)[0])
    out = np.empty_like(y)
    assert dilconv.conv1d(x, w, dilation=4, out=out) is out
    np.testing.assert_array_equal(out, y)
    # A strided input view gives the same result as a contiguous copy.
    big = np.zeros((3, 50), np.float32)
    big[:, ::2] = x
    np.testing.assert_array_equal(dilconv.conv1d(big[:, ::2], w, dilation=4), y)
    g = dilconv.conv1d_backward(y, x, w, dilation=4)
    assert g.input.shape == x.shape and g.weight.shape == w.shape and g.bias.shape == (2,)


X = np.zeros((2, 4, 16), np.float32)
W = np.zeros((4, 2, 3), np.float32)


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(input=np.zeros((2, 4, 1, 16), np.float32)), ValueError, ["(N, C, L)", "(2, 4, 1, 16)"]),
    (dict(weight=np.zeros((4, 2, 1, 3), np.float32)), ValueError, ["weight", "(4, 2, 1, 3)"]),
    (dict(causal=True, padding=1), ValueError, ["causal", "padding=1"]),
    (dict(causal=True, padding="same"), ValueError, ["causal", "same"]),
    (dict(causal=1), TypeError, ["causal"]),
    (dict(stride=(1, 2)), ValueError, ["stride", "length 2"]),
    (dict(padding=(1, 2, 3)), ValueError, ["padding", "length 3"]),
    (dict(padding=-1), ValueError, ["padding", ">= 0"]),
    (dict(dilation=0), ValueError, ["dilation"]),
    (dict(groups=3), ValueError, ["groups=3"]),
    (dict(padding=16, padding_mode="reflect"), ValueError, ["reflect", "16"]),
])
def test_rejects(kwargs, exc, words):
    assert_rejects(dilconv.conv1d, {"input": X, "weight": W, "groups": 2, **kwargs}, exc, words)


def test_backward_rejects_grad_output_rank():
    with pytest.raises(ValueError, match="grad_output"):
        dilconv.conv1d_backward(np.zeros((2, 4, 1, 14), np.float32), X, W, groups=2)
