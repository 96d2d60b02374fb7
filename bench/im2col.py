"""A peer, not dilconv: conv2d forward and backward by im2col + matmul in plain numpy.

This is the textbook way to write a convolution in numpy (Caffe's im2col): gather every
(input channel, tap) window into a column matrix, then one matmul per group. It materialises
the full column matrix (C*kH*kW x Ho*Wo per image), multiplies taps that fall in the padding,
and gets its threads from BLAS only. Arguments are normalised as in a ConvSpec: stride and
dilation (h, w) pairs, padding ((top, bottom), (left, right)).
"""
from __future__ import annotations

import numpy as np


def _geometry(x_shape, w_shape, stride, padding, dilation):
    (_, _, h, w), (_, _, kh, kw) = x_shape, w_shape
    (pt, pb), (pl, pr) = padding
    ho = (h + pt + pb - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + pl + pr - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return ho, wo


def _tap_windows(xp, kh, kw, ho, wo, stride, dilation):
    """View (N, C, kH, kW, Ho, Wo) of the padded input: [..., i, j, r, c] is the pixel that
    output (r, c) reads through tap (i, j)."""
    sn, sc, sh, sw = xp.strides
    shape = xp.shape[:2] + (kh, kw, ho, wo)
    strides = (sn, sc, sh * dilation[0], sw * dilation[1], sh * stride[0], sw * stride[1])
    return np.lib.stride_tricks.as_strided(xp, shape, strides, writeable=False)


def _columns(x, kh, kw, ho, wo, stride, padding, dilation, groups):
    """The im2col matrix, (N, groups, C/groups*kH*kW, Ho*Wo)."""
    n, c = x.shape[:2]
    xp = np.pad(x, ((0, 0), (0, 0)) + tuple(tuple(p) for p in padding))
    windows = _tap_windows(xp, kh, kw, ho, wo, stride, dilation)
    return windows.reshape(n, groups, (c // groups) * kh * kw, ho * wo)


def conv2d(x, weight, bias, stride, padding, dilation, groups):
    """Forward: (N, C, H, W), (O, C/g, kH, kW), (O,) or None -> (N, O, Ho, Wo)."""
    n = x.shape[0]
    o, _, kh, kw = weight.shape
    ho, wo = _geometry(x.shape, weight.shape, stride, padding, dilation)
    cols = _columns(x, kh, kw, ho, wo, stride, padding, dilation, groups)
    w_mat = weight.reshape(groups, o // groups, -1)
    y = np.matmul(w_mat, cols).reshape(n, o, ho, wo)
    if bias is not None:
        y += bias[None, :, None, None]
    return y


def conv2d_backward(grad_output, x, weight, stride, padding, dilation, groups):
    """Gradients (input, weight, bias) of `conv2d`; the column matrix is rebuilt from x."""
    n, c, h, w = x.shape
    o, cg, kh, kw = weight.shape
    ho, wo = grad_output.shape[2:]
    gy = grad_output.reshape(n, groups, o // groups, ho * wo)
    cols = _columns(x, kh, kw, ho, wo, stride, padding, dilation, groups)
    # dL/dW = sum over images of gy @ cols^T.
    grad_w = np.matmul(gy, cols.swapaxes(-1, -2)).sum(axis=0).reshape(weight.shape)
    # dL/dcols = W^T @ gy, then col2im: add each tap's columns back onto its window.
    w_mat = weight.reshape(groups, o // groups, cg * kh * kw)
    grad_cols = np.matmul(w_mat.swapaxes(-1, -2), gy).reshape(n, c, kh, kw, ho, wo)
    (pt, pb), (pl, pr) = padding
    grad_xp = np.zeros((n, c, h + pt + pb, w + pl + pr), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            r0, c0 = i * dilation[0], j * dilation[1]
            grad_xp[:, :, r0:r0 + stride[0] * (ho - 1) + 1:stride[0],
                    c0:c0 + stride[1] * (wo - 1) + 1:stride[1]] += grad_cols[:, :, i, j]
    grad_x = grad_xp[:, :, pt:pt + h, pl:pl + w]
    grad_b = grad_output.sum(axis=(0, 2, 3))
    return grad_x, grad_w, grad_b
