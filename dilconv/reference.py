"""Independent oracle for 2-D dilated convolution (PyTorch ``conv2d`` semantics).

The fast kernels loop over taps directly. To be a useful check on them, this module uses a
different algorithm: it turns the dilated kernel into a dense one by inserting zeros between
its taps, pads the input with ``numpy.pad`` and lets ``scipy.signal.correlate2d`` do the sums;
stride is a subsampling of the stride-1 result. The backward pass is built the same way, from
full / valid correlations with zero-inserted arrays. The only thing shared with the kernels is
the output-size formula.

Nothing here validates: arguments must already be normalised (see the function docstrings).
Everything is computed in float64 and cast to the input's dtype at the end.

The oracle is meant for finite inputs. Inserted zeros and zero padding *are* multiplied here
(0 * inf = nan), whereas PyTorch never multiplies taps that fall in the padding, so with
NaN/Inf inputs the results can differ from PyTorch's.
"""
import numpy as np
from scipy.signal import correlate2d

__all__ = ["conv2d_reference", "conv2d_backward_reference", "conv2d_reference_abs",
           "conv2d_backward_reference_abs"]


def _out_size(size, k, stride, dilation, pad_lo, pad_hi):
    """Output length along one axis: floor((in + pads - d*(k-1) - 1) / s) + 1."""
    return (size + pad_lo + pad_hi - dilation * (k - 1) - 1) // stride + 1


def _zero_insert(a, step, shape=None):
    """Spread the last two axes of `a` out by `step`, filling the gaps with zeros.

    Element (i, j) goes to (i*step[0], j*step[1]). Used to dilate kernels (step = dilation)
    and to undo striding in the backward pass (step = stride).

    Parameters
    ----------
    a : ndarray, shape (..., h, w)
    step : (int, int)
    shape : (int, int), optional
        Size of the result's last two axes; at least the default ``((h-1)*s0+1, (w-1)*s1+1)``.
        Extra trailing rows/columns stay zero.

    Returns
    -------
    ndarray of float64
    """
    h, w = a.shape[-2:]
    if shape is None:
        shape = ((h - 1) * step[0] + 1, (w - 1) * step[1] + 1)
    out = np.zeros(a.shape[:-2] + tuple(shape), dtype=np.float64)
    out[..., :(h - 1) * step[0] + 1:step[0], :(w - 1) * step[1] + 1:step[1]] = a
    return out


def _pad(x, padding):
    """Zero-pad the spatial axes of an (N, C, H, W) array."""
    return np.pad(x, ((0, 0), (0, 0)) + tuple(tuple(p) for p in padding))


def _forward(x, w, stride, padding, dilation, groups):
    """Bias-free forward pass in float64 (see `conv2d_reference`)."""
    n_batch, _, height, width = x.shape
    n_out, cg, kh, kw = w.shape
    og = n_out // groups
    (pt, pb), (pl, pr) = padding
    ho = _out_size(height, kh, stride[0], dilation[0], pt, pb)
    wo = _out_size(width, kw, stride[1], dilation[1], pl, pr)

    xp = _pad(x, padding)
    wd = _zero_insert(w, dilation)
    # The stride-1 'valid' result, which we subsample by the stride.
    full_h, full_w = xp.shape[2] - wd.shape[2] + 1, xp.shape[3] - wd.shape[3] + 1
    y = np.zeros((n_batch, n_out, ho, wo))
    for n in range(n_batch):
        for o in range(n_out):
            first = (o // og) * cg          # first input channel of o's group
            acc = np.zeros((full_h, full_w))
            for c in range(cg):
                acc += correlate2d(xp[n, first + c], wd[o, c], mode="valid")
            y[n, o] = acc[::stride[0], ::stride[1]]
    return y


def _backward(gy, x, w, stride, padding, dilation, groups):
    """Gradients (input, weight, bias) in float64 (see `conv2d_backward_reference`)."""
    n_batch, _, height, width = x.shape
    n_out, cg, _, _ = w.shape
    og = n_out // groups
    (pt, _), (pl, _) = padding

    xp = _pad(x, padding)
    wd = _zero_insert(w, dilation)
    # Undo the stride: put grad_output back on the stride-1 output grid. That grid is
    # Hp - dkH + 1 long, which can exceed (Ho-1)*s+1 when (Hp - dkH) % s != 0; the extra
    # trailing positions stay zero, so the last rows/cols of the padded input that no output
    # reads get zero gradient, and the full correlation below comes out exactly Hp x Wp.
    grid = (xp.shape[2] - wd.shape[2] + 1, xp.shape[3] - wd.shape[3] + 1)
    gz = _zero_insert(gy, stride, grid)

    gxp = np.zeros(xp.shape)
    gwd = np.zeros(wd.shape)
    rotated = wd[:, :, ::-1, ::-1]
    for n in range(n_batch):
        for o in range(n_out):
            first = (o // og) * cg
            for c in range(cg):
                # d y / d xp: scatter each output's gradient back over its window.
                gxp[n, first + c] += correlate2d(gz[n, o], rotated[o, c], mode="full")
                # d y / d w_dilated: valid correlation has exactly dkH x dkW shifts.
                gwd[o, c] += correlate2d(xp[n, first + c], gz[n, o], mode="valid")

    grad_input = gxp[:, :, pt:pt + height, pl:pl + width]
    grad_weight = gwd[:, :, ::dilation[0], ::dilation[1]]   # keep the real taps only
    grad_bias = gy.sum(axis=(0, 2, 3))
    return grad_input, grad_weight, grad_bias


def conv2d_reference(x, w, b, stride, padding, dilation, groups):
    """Forward 2-D dilated cross-correlation, computed by a path independent of the kernels.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W), float
    w : ndarray, shape (O, C // groups, kH, kW), float
    b : ndarray, shape (O,), or None
    stride, dilation : (int, int)
        Each >= 1.
    padding : ((int, int), (int, int))
        ((top, bottom), (left, right)) zero padding, each >= 0.
    groups : int

    Returns
    -------
    ndarray, shape (N, O, Ho, Wo), dtype of `x`
        With ``Ho = floor((H + top + bottom - dH*(kH-1) - 1) / sH) + 1``, likewise Wo.
    """
    y = _forward(x.astype(np.float64), w.astype(np.float64), stride, padding, dilation,
                 groups)
    if b is not None:
        y += np.asarray(b, dtype=np.float64)[None, :, None, None]
    return y.astype(x.dtype)


def conv2d_reference_abs(x, w, stride, padding, dilation, groups):
    """The bias-free forward of |x| and |w|, in float64.

    Each element is ``sum |w| |x|`` over the taps the output reads: the scale of the rounding
    error of any summation order, used by tests to build per-element error bounds. Arguments
    as in `conv2d_reference`.
    """
    return _forward(np.abs(x.astype(np.float64)), np.abs(w.astype(np.float64)), stride,
                    padding, dilation, groups)


def conv2d_backward_reference(grad_output, x, w, stride, padding, dilation, groups):
    """Gradients of `conv2d_reference` with respect to input, weight and bias.

    Parameters
    ----------
    grad_output : ndarray, shape (N, O, Ho, Wo)
    x, w, stride, padding, dilation, groups
        As in `conv2d_reference`.

    Returns
    -------
    (grad_input, grad_weight, grad_bias) : tuple of ndarray
        Shapes of `x`, `w` and (O,), all in the dtype of `x`.
    """
    grads = _backward(grad_output.astype(np.float64), x.astype(np.float64),
                      w.astype(np.float64), stride, padding, dilation, groups)
    return tuple(g.astype(x.dtype) for g in grads)


def conv2d_backward_reference_abs(grad_output, x, w, stride, padding, dilation, groups):
    """`conv2d_backward_reference` of |grad_output|, |x|, |w|, in float64.

    Gives the per-element ``sum |a| |b|`` scale of each gradient's rounding error; the bias
    entry is the sum of |grad_output| over N, H, W.
    """
    return _backward(np.abs(grad_output.astype(np.float64)), np.abs(x.astype(np.float64)),
                     np.abs(w.astype(np.float64)), stride, padding, dilation, groups)
