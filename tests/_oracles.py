"""Oracles for the features built on conv2d, made from the correlate2d oracle.

- padding modes: numpy.pad, then the zero-padding oracle with padding 0; backward through
  the padding's own matrix (numpy.pad applied to an identity), not through an index fold;
- conv_transpose2d: the oracle's conv2d input gradient (the adjoint), and for its backward
  the oracle's forward and weight gradient;
- bounds: `dilconv.tolerance.error_bound` on the oracle's sum of |terms|.
"""
import numpy as np

from dilconv import reference, tolerance
from dilconv._validate import make_spec

# PyTorch's padding modes as numpy.pad modes (the same within PyTorch's size limits).
NUMPY_MODE = {"zeros": "constant", "reflect": "reflect", "replicate": "edge",
              "circular": "wrap"}


def assert_within(got, want, abs_sum, terms, dtype, sides=1, what=""):
    """|got - want| <= bound per element; `sides` = 2 when both carry rounding error."""
    assert got.shape == want.shape, (what, got.shape, want.shape)
    bound = sides * tolerance.error_bound(abs_sum, terms, dtype)
    ratio = tolerance.worst_ratio(got, want, bound)
    assert ratio <= 1.0, f"{what} off by {ratio:.3g} x bound"


def assert_adjoint(lhs, rhs, scale, terms):
    """Two float64 sums of the same `scale` = sum|terms|, each of up to `terms` rounded
    additions, agree within the derived bound."""
    bound = tolerance.error_bound(scale, terms, np.float64)
    assert abs(lhs - rhs) <= bound, (lhs, rhs, float(bound))


def pad_matrix(size, lo, hi, mode):
    """(lo + size + hi, size) 0/1 matrix P with pad(v) = P @ v along one axis."""
    return np.pad(np.eye(size), ((lo, hi), (0, 0)), mode=NUMPY_MODE[mode])


def padded_forward(x, w, b, stride, pads, dilation, groups, mode):
    """(expected, abs_sum, terms) of conv2d with padding `pads` in `mode`."""
    xp = np.pad(x, ((0, 0), (0, 0)) + tuple(pads), mode=NUMPY_MODE[mode])
    zero = ((0, 0), (0, 0))
    spec = make_spec(xp.shape, w.shape, stride, zero, dilation, groups)
    want = reference.conv2d_reference(xp, w, b, stride, zero, dilation, groups)
    abs_sum = reference.conv2d_reference_abs(xp, w, stride, zero, dilation, groups)
    if b is not None:
        abs_sum = abs_sum + np.abs(b.astype(np.float64))[None, :, None, None]
    return want, abs_sum, tolerance.forward_terms(spec, b is not None)


def padded_backward(gy, x, w, stride, pads, dilation, groups, mode):
    """[(expected, abs_sum, terms)] for the input, weight and bias gradients."""
    xp = np.pad(x, ((0, 0), (0, 0)) + tuple(pads), mode=NUMPY_MODE[mode])
    zero = ((0, 0), (0, 0))
    spec = make_spec(xp.shape, w.shape, stride, zero, dilation, groups)
    args = (stride, zero, dilation, groups)
    grads = reference.conv2d_backward_reference(gy, xp, w, *args)
    abs_grads = reference.conv2d_backward_reference_abs(gy, xp, w, *args)
    ph = pad_matrix(x.shape[2], *pads[0], mode)
    pw = pad_matrix(x.shape[3], *pads[1], mode)

    def fold(g):
        return np.einsum("hi,nchw,wj->ncij", ph, g.astype(np.float64), pw)

    # Each input pixel gathers up to (copies along H) x (copies along W) padded pixels.
    copies = int(ph.sum(axis=0).max() * pw.sum(axis=0).max())
    weight_terms = tolerance.grad_weight_terms(spec)
    return [(fold(grads[0]).astype(x.dtype), fold(abs_grads[0]),
             tolerance.grad_input_terms(spec) * copies),
            (grads[1], abs_grads[1], weight_terms),
            (grads[2], abs_grads[2], weight_terms)]


def transpose_spec(x_shape, w_shape, stride, pads, output_padding, dilation, groups):
    """The conv2d whose adjoint the transposed convolution is (pads as ((t, b), (l, r)))."""
    n, c_in, h, w = x_shape
    out_hw = [(size - 1) * s - lo - hi + d * (k - 1) + op + 1 for size, k, s, d, op, (lo, hi)
              in zip((h, w), w_shape[2:], stride, dilation, output_padding, pads)]
    return make_spec((n, w_shape[1] * groups) + tuple(out_hw), w_shape, stride, pads,
                     dilation, groups)


def _extend(x, spec):
    """x with zero rows/columns so it has the adjoint conv2d's output shape."""
    return np.pad(x, ((0, 0), (0, 0), (0, spec.ho - x.shape[2]), (0, spec.wo - x.shape[3])))


def transpose_forward(x, w, b, stride, pads, output_padding, dilation, groups):
    """(expected, abs_sum, terms) of conv_transpose2d: the oracle's conv2d input gradient."""
    spec = transpose_spec(x.shape, w.shape, stride, pads, output_padding, dilation, groups)
    blank = np.zeros((spec.n, spec.c, spec.h, spec.w), x.dtype)
    args = (spec.stride, spec.padding, spec.dilation, groups)
    xe = _extend(x, spec)
    want = reference.conv2d_backward_reference(xe, blank, w, *args)[0].astype(np.float64)
    abs_sum = reference.conv2d_backward_reference_abs(xe, blank, w, *args)[0]
    if b is not None:
        want = want + b.astype(np.float64)[None, :, None, None]
        abs_sum = abs_sum + np.abs(b.astype(np.float64))[None, :, None, None]
    return want.astype(x.dtype), abs_sum, tolerance.grad_input_terms(spec) + int(b is not None)


def transpose_backward(gy, x, w, stride, pads, output_padding, dilation, groups):
    """[(expected, abs_sum, terms)] for conv_transpose2d's input, weight, bias gradients."""
    spec = transpose_spec(x.shape, w.shape, stride, pads, output_padding, dilation, groups)
    args = (spec.stride, spec.padding, spec.dilation, groups)
    h, wd = x.shape[2:]
    gx = reference.conv2d_reference(gy, w, None, *args)[:, :, :h, :wd]
    abs_gx = reference.conv2d_reference_abs(gy, w, *args)[:, :, :h, :wd]
    xe = _extend(x, spec)
    gw = reference.conv2d_backward_reference(xe, gy, w, *args)[1]
    abs_gw = reference.conv2d_backward_reference_abs(xe, gy, w, *args)[1]
    sum_terms = max(1, gy.shape[0] * gy.shape[2] * gy.shape[3])
    return [(gx, abs_gx, tolerance.forward_terms(spec, False)),
            (gw, abs_gw, tolerance.grad_weight_terms(spec)),
            (gy.astype(np.float64).sum(axis=(0, 2, 3)).astype(x.dtype),
             np.abs(gy.astype(np.float64)).sum(axis=(0, 2, 3)), sum_terms)]
