"""Tests of the oracle itself: a hand-checked value, a naive direct loop, adjoint identities,
finite differences, and PyTorch when it is installed."""
import ast
import pathlib

import numpy as np
import pytest

from dilconv import reference
from dilconv.reference import (conv2d_backward_reference, conv2d_backward_reference_abs,
                               conv2d_reference, conv2d_reference_abs)


def out_size(size, k, s, d, lo, hi):
    return (size + lo + hi - d * (k - 1) - 1) // s + 1


def naive_conv2d(x, w, b, stride, padding, dilation, groups):
    """The textbook 7-loop definition, skipping taps that land in the padding."""
    n_batch, _, height, width = x.shape
    n_out, cg, kh, kw = w.shape
    (pt, pb), (pl, pr) = padding
    ho = out_size(height, kh, stride[0], dilation[0], pt, pb)
    wo = out_size(width, kw, stride[1], dilation[1], pl, pr)
    og = n_out // groups
    y = np.zeros((n_batch, n_out, ho, wo))
    for n in range(n_batch):
        for o in range(n_out):
            for i in range(ho):
                for j in range(wo):
                    s = 0.0 if b is None else b[o]
                    for c in range(cg):
                        for p in range(kh):
                            for q in range(kw):
                                r = i * stride[0] + p * dilation[0] - pt
                                t = j * stride[1] + q * dilation[1] - pl
                                if 0 <= r < height and 0 <= t < width:
                                    s += x[n, (o // og) * cg + c, r, t] * w[o, c, p, q]
                    y[n, o, i, j] = s
    return y


def random_geometry(rng, max_hw=9):
    """A small random valid case; output size may be 1, pads are asymmetric."""
    groups = int(rng.integers(1, 3))
    cg, og = int(rng.integers(1, 3)), int(rng.integers(1, 3))
    kh, kw = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    stride = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
    dilation = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
    padding = tuple((int(rng.integers(0, 4)), int(rng.integers(0, 4))) for _ in range(2))
    dims = []
    for k, d, (lo, hi) in zip((kh, kw), dilation, padding):
        smallest = max(1, d * (k - 1) + 1 - lo - hi)   # at least one output
        dims.append(int(rng.integers(smallest, smallest + max_hw)))
    n = int(rng.integers(1, 3))
    x = rng.standard_normal((n, cg * groups, *dims))
    w = rng.standard_normal((og * groups, cg, kh, kw))
    return x, w, stride, padding, dilation, groups


def assert_within(got, expected, abs_sum, rel=1e-12):
    """|got - expected| <= rel * sum|a||b| elementwise (plus a hair for exact zeros)."""
    assert got.shape == expected.shape
    err = np.abs(got - expected)
    assert np.all(err <= rel * abs_sum + 1e-300), f"max err {err.max():.3g}"


# (a) the seed fact, worked by hand.
def test_seed_toy_exact():
    x = np.array([[1, 2, 3, 0], [0, 1, 2, 3], [3, 0, 1, 2], [2, 3, 0, 1]],
                 dtype=np.float64).reshape(1, 1, 4, 4)
    w = np.array([[2, 0], [1, 3]], dtype=np.float64).reshape(1, 1, 2, 2)
    y = conv2d_reference(x, w, None, (1, 1), ((0, 0), (0, 0)), (2, 2), 1)
    np.testing.assert_array_equal(y, np.array([[[[8, 10], [2, 8]]]]))


# (b) the seed layer's shape.
def test_seed_3to16_shape(rng):
    x = rng.uniform(-1, 1, (1, 3, 256, 256)).astype(np.float32)
    w = rng.uniform(-1, 1, (16, 3, 3, 3)).astype(np.float32)
    y = conv2d_reference(x, w, None, (1, 1), ((0, 0), (0, 0)), (2, 2), 1)
    assert y.shape == (1, 16, 252, 252) and y.dtype == np.float32
    # Spot-check one output against the definition.
    expected = sum(x[0, c, 10 + 2 * p, 20 + 2 * q].astype(np.float64) * w[5, c, p, q]
                   for c in range(3) for p in range(3) for q in range(3))
    np.testing.assert_allclose(y[0, 5, 10, 20], expected, rtol=1e-5, atol=1e-5)


# (c) forward against the naive loop.
def test_forward_matches_naive_loop(rng):
    for _ in range(60):
        x, w, stride, padding, dilation, groups = random_geometry(rng)
        b = rng.standard_normal(w.shape[0]) if rng.integers(2) else None
        args = (stride, padding, dilation, groups)
        got = conv2d_reference(x, w, b, *args)
        expected = naive_conv2d(x, w, b, *args)
        abs_sum = naive_conv2d(np.abs(x), np.abs(w), None if b is None else np.abs(b), *args)
        assert_within(got, expected, abs_sum)
        # The abs helper is the same forward on |x|, |w|, without bias.
        assert_within(conv2d_reference_abs(x, w, *args),
                      naive_conv2d(np.abs(x), np.abs(w), None, *args), abs_sum)


def test_dtype_kept_and_empty_batch(rng):
    x = rng.standard_normal((0, 4, 5, 6)).astype(np.float32)
    w = rng.standard_normal((6, 2, 3, 2)).astype(np.float32)
    args = ((2, 1), ((1, 0), (0, 2)), (1, 2), 2)
    y = conv2d_reference(x, w, np.ones(6, np.float32), *args)
    assert y.shape == (0, 6, 2, 6) and y.dtype == np.float32
    gx, gw, gb = conv2d_backward_reference(y, x, w, *args)
    assert (gx.shape, gw.shape, gb.shape) == (x.shape, w.shape, (6,))
    assert gx.dtype == gw.dtype == gb.dtype == np.float32
    assert not gw.any() and not gb.any()


def test_output_size_one():
    # The dilated kernel exactly covers the padded input: one output, the full dot product.
    x = np.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    w = np.array([[1.0, -2.0], [3.0, 0.5]]).reshape(1, 1, 2, 2)
    y = conv2d_reference(x, w, np.array([0.25]), (2, 5), ((1, 0), (0, 0)), (3, 2), 1)
    # Rows: padded height 4 = dilated kernel height 4, taps at padded rows 0 (padding) and 3
    # (x row 2). Cols: dilated width 3 = W, taps at cols 0 and 2. Stride is irrelevant.
    assert y.shape == (1, 1, 1, 1)
    expected = 0.25 + 1 * 0 + (-2) * 0 + 3 * x[0, 0, 2, 0] + 0.5 * x[0, 0, 2, 2]
    assert y[0, 0, 0, 0] == expected


# (d) adjoint identities: backward is the transpose of the (bilinear) forward.
@pytest.mark.parametrize("force_ragged", [False, True])
def test_adjoint_identities(rng, force_ragged):
    checked = 0
    while checked < 40:
        x, w, stride, padding, dilation, groups = random_geometry(rng)
        spans = [x.shape[2 + a] + sum(padding[a]) - dilation[a] * (w.shape[2 + a] - 1) - 1
                 for a in range(2)]
        ragged = any(span % s for span, s in zip(spans, stride))
        if ragged != force_ragged:
            continue
        checked += 1
        args = (stride, padding, dilation, groups)
        y = conv2d_reference(x, w, None, *args)
        g = rng.standard_normal(y.shape)
        gx, gw, gb = conv2d_backward_reference(g, x, w, *args)
        assert (gx.shape, gw.shape, gb.shape) == (x.shape, w.shape, (w.shape[0],))
        lhs = np.vdot(y, g)
        # Scale of rounding in either side: sum |g| * (|w| * |x|).
        scale = np.vdot(np.abs(g), conv2d_reference_abs(x, w, *args))
        assert abs(lhs - np.vdot(x, gx)) <= 1e-12 * scale
        assert abs(lhs - np.vdot(w, gw)) <= 1e-12 * scale
        np.testing.assert_array_equal(gb, g.sum(axis=(0, 2, 3)))
        # The abs gradients bound the gradients elementwise.
        ax, aw, ab = conv2d_backward_reference_abs(g, x, w, *args)
        assert np.all(np.abs(gx) <= ax * (1 + 1e-12)) and np.all(np.abs(gw) <= aw * (1 + 1e-12))
        np.testing.assert_allclose(ab, np.abs(g).sum(axis=(0, 2, 3)))


def test_ragged_tail_gets_zero_gradient():
    # H=7, k=2, d=2 (dilated 3), s=3: (7 - 3) % 3 = 1, two outputs reading rows {0, 2} and
    # {3, 5}; row 6 is never read and must get zero gradient (as must the gaps 1 and 4).
    x = np.ones((1, 1, 7, 7))
    w = np.ones((1, 1, 2, 2))
    args = ((3, 3), ((0, 0), (0, 0)), (2, 2), 1)
    g = np.ones((1, 1, 2, 2))
    gx = conv2d_backward_reference(g, x, w, *args)[0]
    assert not gx[0, 0, 6].any() and not gx[0, 0, :, 6].any()
    assert gx[0, 0, 5, 5] == 1 and gx[0, 0, 0, 0] == 1 and gx[0, 0, 1, 1] == 0


# (e) finite differences of a non-linear loss.
def test_finite_differences(rng):
    x = rng.standard_normal((2, 4, 6, 5))
    w = rng.standard_normal((4, 2, 2, 3))
    b = rng.standard_normal(4)
    args = ((2, 1), ((1, 2), (0, 1)), (2, 1), 2)

    def loss(x, w, b):
        return np.tanh(conv2d_reference(x, w, b, *args)).sum()

    g = 1 - np.tanh(conv2d_reference(x, w, b, *args)) ** 2
    grads = conv2d_backward_reference(g, x, w, *args)
    eps = 1e-6
    for which, arr in enumerate((x, w, b)):
        fd = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            hi, lo = [a.copy() for a in (x, w, b)], [a.copy() for a in (x, w, b)]
            hi[which][idx] += eps
            lo[which][idx] -= eps
            fd[idx] = (loss(*hi) - loss(*lo)) / (2 * eps)
        np.testing.assert_allclose(grads[which], fd, rtol=1e-6, atol=1e-7)


def test_oracle_imports_no_other_dilconv_module():
    tree = ast.parse(pathlib.Path(reference.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("dilconv")
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("dilconv") for a in node.names)


def test_against_torch(rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    for _ in range(30):
        x, w, stride, padding, dilation, groups = random_geometry(rng)
        b = rng.standard_normal(w.shape[0])
        args = (stride, padding, dilation, groups)
        tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
        (pt, pb), (pl, pr) = padding
        ty = F.conv2d(F.pad(tx, (pl, pr, pt, pb)), tw, tb, stride=stride, dilation=dilation,
                      groups=groups)
        y = conv2d_reference(x, w, b, *args)
        abs_y = conv2d_reference_abs(x, w, *args) + np.abs(b)[None, :, None, None]
        assert_within(ty.detach().numpy(), y, abs_y, rel=1e-13)
        g = rng.standard_normal(y.shape)
        ty.backward(torch.tensor(g))
        ours = conv2d_backward_reference(g, x, w, *args)
        bounds = conv2d_backward_reference_abs(g, x, w, *args)
        for t, mine, bound in zip((tx, tw, tb), ours, bounds):
            assert_within(t.grad.numpy(), mine, bound, rel=1e-13)
