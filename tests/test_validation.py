"""Every bad argument gives a ValueError or TypeError that names it."""
import numpy as np
import pytest

import dilconv
from dilconv import _validate

X = np.zeros((2, 4, 8, 8), np.float32)
W = np.zeros((6, 2, 3, 3), np.float32)
B = np.zeros(6, np.float32)
GY = np.zeros((2, 6, 6, 6), np.float32)          # conv2d(X, W, groups=2) output

BAD_CONV2D = [
    # (kwargs overriding the good call, exception, words the message must contain)
    (dict(input=np.zeros((4, 8), np.float32)), ValueError, ["input", "(4, 8)"]),
    (dict(input=np.zeros((1, 2, 4, 8, 8), np.float32)), ValueError, ["input", "4-D"]),
    (dict(weight=np.zeros((6, 2, 3), np.float32)), ValueError, ["weight", "(6, 2, 3)"]),
    (dict(input=np.zeros((2, 0, 8, 8), np.float32), weight=np.zeros((6, 0, 3, 3), np.float32)),
     ValueError, ["channels", "(2, 0, 8, 8)"]),
    (dict(input=np.zeros((2, 4, 0, 8), np.float32)), ValueError, ["height", "(2, 4, 0, 8)"]),
    (dict(weight=np.zeros((0, 2, 3, 3), np.float32), bias=None), ValueError, ["weight"]),
    (dict(groups=3), ValueError, ["groups=3", "C=4"]),
    (dict(groups=4, weight=np.zeros((6, 1, 3, 3), np.float32)), ValueError,
     ["groups=4", "output channels"]),
    (dict(groups=1), ValueError, ["weight.shape[1]", "C=4"]),
    (dict(groups=0), ValueError, ["groups", "0"]),
    (dict(groups=2.0), TypeError, ["groups", "float"]),
    (dict(groups=True), TypeError, ["groups"]),
    (dict(bias=np.zeros(5, np.float32)), ValueError, ["bias", "(6,)", "(5,)"]),
    (dict(bias=np.zeros((6, 1), np.float32)), ValueError, ["bias", "(6, 1)"]),
    (dict(stride=0), ValueError, ["stride", ">= 1"]),
    (dict(stride=(1, -2)), ValueError, ["stride", "(1, -2)"]),
    (dict(stride=1.5), TypeError, ["stride", "1.5"]),
    (dict(stride=True), TypeError, ["stride"]),
    (dict(stride=(1, 2, 3)), ValueError, ["stride", "length 3"]),
    (dict(dilation=0), ValueError, ["dilation", ">= 1"]),
    (dict(dilation="2"), TypeError, ["dilation"]),
    (dict(padding=-1), ValueError, ["padding", ">= 0"]),
    (dict(padding=((1, -1), (0, 0))), ValueError, ["padding", ">= 0"]),
    (dict(padding=((1, 1), (0,))), ValueError, ["padding", "(left, right)"]),
    (dict(padding=(1, 2, 3)), ValueError, ["padding", "length 3"]),
    (dict(padding="full"), ValueError, ["padding", "'full'"]),
    (dict(padding=1.0), TypeError, ["padding"]),
    (dict(padding="same", stride=2), ValueError, ["same", "stride"]),
    (dict(dilation=4), ValueError, ["dilated kernel", "9", "8"]),
    (dict(padding_mode="mirror"), ValueError, ["padding_mode", "mirror"]),
    (dict(padding_mode=0), TypeError, ["padding_mode"]),
    (dict(weight=np.zeros((6, 2, 3, 3), np.float64)), TypeError, ["float32", "float64"]),
    (dict(bias=np.zeros(6, np.float64)), TypeError, ["bias", "float64"]),
    (dict(input=X.astype(np.complex64)), TypeError, ["input", "complex"]),
    (dict(input=X.astype(object)), TypeError, ["input", "object"]),
    (dict(input=np.full(X.shape, "a")), TypeError, ["input"]),
    (dict(input=[[1, 2], [3]]), TypeError, ["input"]),
    (dict(input=None), TypeError, ["input", "None"]),
    (dict(weight=np.zeros(W.shape, np.longdouble)), TypeError, ["weight"]),
    (dict(out=np.zeros((2, 6, 6, 5), np.float32)), ValueError, ["out", "(2, 6, 6, 6)"]),
    (dict(out=np.zeros((2, 6, 6, 6), np.float64)), TypeError, ["out", "float32"]),
    (dict(out=[0.0]), TypeError, ["out", "list"]),
]


@pytest.mark.parametrize("kwargs, exc, words", BAD_CONV2D, ids=lambda v: repr(v)[:40])
def test_conv2d_rejects(kwargs, exc, words):
    call = dict(input=X, weight=W, bias=B, groups=2)
    call.update(kwargs)
    with pytest.raises(exc) as info:
        dilconv.conv2d(**call)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_out_overlapping_input_is_rejected():
    buf = np.zeros((2, 6, 8, 8), np.float32)
    x = buf[:, :4]
    with pytest.raises(ValueError, match="out overlaps input"):
        dilconv.conv2d(x, W, B, groups=2, padding=1, out=buf[:, :6, :, :])


def test_readonly_out_is_rejected():
    out = np.zeros((2, 6, 6, 6), np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        dilconv.conv2d(X, W, B, groups=2, out=out)


BAD_BACKWARD = [
    (dict(grad_output=np.zeros((2, 6, 6, 5), np.float32)), ValueError,
     ["grad_output", "(2, 6, 6, 6)", "(2, 6, 6, 5)"]),
    (dict(grad_output=np.zeros((6, 6, 6), np.float32)), ValueError, ["grad_output"]),
    (dict(grad_output=GY.astype(np.float64)), TypeError, ["grad_output", "float64"]),
    (dict(grad_output=GY.astype(np.complex128)), TypeError, ["grad_output", "complex"]),
    (dict(needs=("input", "bias_grad")), ValueError, ["needs", "bias_grad"]),
    (dict(needs=(1,)), TypeError, ["needs"]),
    (dict(needs=3), TypeError, ["needs"]),
    (dict(groups=3), ValueError, ["groups=3"]),
    (dict(stride=0), ValueError, ["stride"]),
]


@pytest.mark.parametrize("kwargs, exc, words", BAD_BACKWARD, ids=lambda v: repr(v)[:40])
def test_conv2d_backward_rejects(kwargs, exc, words):
    call = dict(grad_output=GY, input=X, weight=W, groups=2)
    call.update(kwargs)
    with pytest.raises(exc) as info:
        dilconv.conv2d_backward(**call)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize("args, exc", [
    (((1, 3, 8, 8), (4, 3, 3, 3), 1, 0, 5), ValueError),
    (((1, 3, 8.0, 8), (4, 3, 3, 3)), TypeError),
    (((1, 3, 8, 8), (4, 3, 3)), ValueError),
    (("abc", (4, 3, 3, 3)), TypeError),
    (((2 ** 40, 3, 2 ** 20, 2 ** 20), (4, 3, 1, 1)), ValueError),
])
def test_output_shape_rejects(args, exc):
    with pytest.raises(exc):
        dilconv.output_shape(*args)


def test_set_num_threads_rejects():
    with pytest.raises(ValueError, match=">= 1"):
        dilconv.set_num_threads(0)
    with pytest.raises(TypeError):
        dilconv.set_num_threads(1.5)


def test_remembered_specs_never_skip_a_check():
    # Valid geometries of plain ints are remembered; a bad argument equal to a good one
    # (True == 1, (1, True) == (1, 1)) must still be rejected after the good one.
    x, w = np.ones((1, 1, 5, 5)), np.ones((1, 1, 2, 2))
    spec = _validate.make_spec((1, 1, 5, 5), (1, 1, 2, 2), 1, 0, 1, 1)
    assert _validate.make_spec((1, 1, 5, 5), (1, 1, 2, 2), 1, 0, 1, 1) is spec
    for bad in (True, (1, True)):
        dilconv.conv2d(x, w, stride=1)
        with pytest.raises(TypeError, match="stride"):
            dilconv.conv2d(x, w, stride=bad)
    with pytest.raises(TypeError, match="groups"):
        dilconv.conv2d(x, w, groups=True)
