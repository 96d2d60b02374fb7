"""README's "Coming from TensorFlow / Keras": its code runs and means what it says, checked
against a direct channels-last (NHWC input, HWIO kernel) sum written from TensorFlow's
definition; the channel-mismatch error suggests the transposes that fit the shapes."""
import os
import re

import numpy as np
import pytest

import dilconv
from dilconv import tolerance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_block(heading):
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def tf_conv_nhwc(x, w, b, stride, pads, dilation):
    """TensorFlow's conv2d on NHWC / HWIO, zero padding ((top, bottom), (left, right)):
    y[n, i, j, o] = b[o] + sum over a, c, e of x[n, i*s - top + a*d, j*s - left + c*d, e]
    * w[a, c, e, o]."""
    (pt, pb), (pl, pr) = pads
    xp = np.pad(x.astype(np.float64), ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    kh, kw = w.shape[:2]
    ho = (xp.shape[1] - dilation * (kh - 1) - 1) // stride + 1
    wo = (xp.shape[2] - dilation * (kw - 1) - 1) // stride + 1
    y = np.zeros((x.shape[0], ho, wo, w.shape[3])) + b
    abs_sum = np.zeros_like(y)
    for a in range(kh):
        for c in range(kw):
            patch = xp[:, a * dilation:a * dilation + (ho - 1) * stride + 1:stride,
                       c * dilation:c * dilation + (wo - 1) * stride + 1:stride]
            y += patch @ w[a, c].astype(np.float64)
            abs_sum += np.abs(patch) @ np.abs(w[a, c].astype(np.float64))
    return y, abs_sum + np.abs(b)


def test_readme_tensorflow_example_matches_tensorflows_definition():
    ns = {}
    exec(_readme_block("### Coming from TensorFlow / Keras"), ns)
    x_nhwc, w_hwio, b = ns["x_nhwc"], ns["w_hwio"], ns["b"]
    terms = 3 * 3 * 3 + 1
    for got, stride, pads in ((ns["y_nhwc"], 1, ((2, 2), (2, 2))),
                              (ns["y2"].transpose(0, 2, 3, 1), 2, ns["pads"])):
        want, abs_sum = tf_conv_nhwc(x_nhwc, w_hwio, b, stride, pads, 2)
        assert got.shape == want.shape
        bound = tolerance.error_bound(abs_sum, terms, np.float32)
        assert tolerance.worst_ratio(got, want, bound) <= 1
    # TensorFlow's 'same' keeps ceil(H / stride) outputs whatever the stride.
    assert ns["y2"].shape == (2, 16, 16, 16) and ns["pads"] == ((1, 2), (1, 2))


@pytest.mark.parametrize("size, k, stride, dilation", [
    (32, 3, 2, 2), (33, 3, 2, 2), (7, 5, 3, 1), (10, 2, 4, 3), (5, 3, 1, 4), (4, 1, 3, 1)])
def test_tf_same_gives_tensorflows_output_size(size, k, stride, dilation):
    ns = {}
    exec(_readme_block("### Coming from TensorFlow / Keras"), ns)
    pads = ns["tf_same"](size, k, stride, dilation)
    shape = dilconv.output_shape((1, 1, size, size), (1, 1, k, k), stride, (pads, pads),
                                 dilation)
    assert shape[2:] == (-(-size // stride),) * 2


def test_readme_depthwise_kernel_conversion():
    rng = np.random.default_rng(0)
    kh, kw, c, m = 3, 2, 4, 3
    x = rng.standard_normal((1, 9, 8, c))
    w = rng.standard_normal((kh, kw, c, m))           # DepthwiseConv2D's kernel
    y = dilconv.conv2d(x.transpose(0, 3, 1, 2),
                       w.reshape(kh, kw, c * m).transpose(2, 0, 1)[:, None], groups=c,
                       dilation=2)
    # TensorFlow: output channel c*M + m is input channel c through its kernel (.., c, m).
    for ch in range(c):
        for mm in range(m):
            want, _ = tf_conv_nhwc(x[..., ch:ch + 1], w[:, :, ch:ch + 1, mm:mm + 1],
                                   np.zeros(1), 1, ((0, 0), (0, 0)), 2)
            np.testing.assert_allclose(y[:, ch * m + mm], want[..., 0], atol=1e-12)


TRANSPOSE_X = "input.transpose(0, 3, 1, 2)"
TRANSPOSE_X3 = "input.transpose(2, 0, 1)"
TRANSPOSE_W = "weight.transpose(3, 2, 0, 1)"


@pytest.mark.parametrize("fn", [dilconv.conv2d, dilconv.Conv2d])
@pytest.mark.parametrize("x_shape, w_shape, hints", [
    ((2, 32, 32, 3), (16, 3, 3, 3), [TRANSPOSE_X]),           # NHWC input, OIHW weight
    ((32, 32, 3), (16, 3, 3, 3), [TRANSPOSE_X3]),             # HWC image
    ((2, 16, 9, 9), (3, 3, 16, 32), [TRANSPOSE_W]),           # NCHW input, HWIO weight
    ((2, 9, 9, 16), (3, 3, 16, 32), [TRANSPOSE_X, TRANSPOSE_W]),   # both channels-last
    ((2, 3, 9, 9), (8, 4, 3, 3), []),                         # plain mismatch: no advice
    ((2, 4, 9, 9), (8, 3, 3, 3), []),
])
def test_channel_mismatch_suggests_the_transpose_that_fits(fn, x_shape, w_shape, hints):
    x, w = np.zeros(x_shape, np.float32), np.zeros(w_shape, np.float32)
    with pytest.raises(ValueError, match="input channels") as info:
        if fn is dilconv.conv2d:
            fn(x, w)
        else:      # a layer built for the OIHW reading of the weight, fed the input
            layer = fn(w_shape[1], w_shape[0], w_shape[2:])
            layer.weight = w
            layer(x)
    message = str(info.value)
    for hint in (TRANSPOSE_X, TRANSPOSE_X3, TRANSPOSE_W):
        assert (hint in message) == (hint in hints), message
    # The advice is right: following it makes the call work.
    if hints:
        fixed_x = x.transpose(0, 3, 1, 2) if TRANSPOSE_X in hints else (
            x.transpose(2, 0, 1) if TRANSPOSE_X3 in hints else x)
        fixed_w = w.transpose(3, 2, 0, 1) if TRANSPOSE_W in hints else w
        dilconv.conv2d(fixed_x, fixed_w)


def test_conv1d_mismatch_gives_no_2d_advice():
    with pytest.raises(ValueError, match="input channels") as info:
        dilconv.conv1d(np.zeros((2, 50, 4)), np.zeros((8, 4, 3)))
    assert "transpose" not in str(info.value)
