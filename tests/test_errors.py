"""Bad-input matrix: every bad call raises exactly ValueError or TypeError naming the argument.

Rows marked TORCH are also rejected by torch.nn.functional.conv2d (checked below against
torch==2.13.0 when it is installed); they include the cases of PyTorch's own conv2d error
tests (`error_inputs_conv2d` in its OpInfo database, `test_invalid_conv2d`,
`test_conv_shapecheck`, `test_Conv2d_module_same_padding`, `test_conv3d_overflow_values`, ...).
"""
import numpy as np
import pytest

import dilconv
from dilconv._threads import MAX_THREADS
from dilconv._validate import MAX_ELEMENTS, MAX_EXTENT

f32, f64 = np.float32, np.float64
X = np.zeros((2, 4, 8, 8), f32)
W = np.zeros((6, 2, 3, 3), f32)
B = np.zeros(6, f32)
GY = np.zeros((2, 6, 6, 6), f32)                    # conv2d(X, W, groups=2) output
BASE = dict(input=X, weight=W, bias=B, groups=2)
TORCH = True                                        # PyTorch rejects the row too


def z(*shape, dtype=f32):
    return np.zeros(shape, dtype)


class RaisesOnConversion:
    """An array-like whose conversion fails with an unrelated exception."""

    def __array__(self, dtype=None, copy=None):
        raise RuntimeError("cannot convert")


def huge(shape):
    # A zero-strided view: any shape, no memory.
    return np.broadcast_to(np.zeros((), f32), shape)


def row(kwargs, exc, words, torch_rejects=False, id=None):
    return pytest.param(kwargs, exc, words, torch_rejects, id=id)


CONV2D = [
    # -- ranks
    row(dict(input=z(4, 8)), ValueError, ["input", "(4, 8)"], TORCH, "input 2-D"),
    row(dict(input=z(1, 2, 4, 8, 8)), ValueError, ["input", "(1, 2, 4, 8, 8)"], TORCH,
        "input 5-D"),
    row(dict(input=np.float32(1)), ValueError, ["input", "()"], TORCH, "input 0-D"),
    row(dict(input=z(8)), ValueError, ["input", "(8,)"], TORCH, "input 1-D"),
    row(dict(weight=z(6, 2, 3)), ValueError, ["weight", "(6, 2, 3)"], TORCH, "weight 3-D"),
    row(dict(weight=z(6, 2, 3, 3, 1)), ValueError, ["weight", "4-D"], TORCH, "weight 5-D"),
    row(dict(weight=1.0, bias=None), ValueError, ["weight", "()"], TORCH, "weight scalar"),
    # error_inputs_conv2d: 3-D weight for a 4-D input with padding='same'
    row(dict(input=z(1, 1, 4, 3), weight=z(1, 2, 2), bias=z(1), padding="same", groups=1),
        ValueError, ["weight", "(1, 2, 2)"], TORCH, "torch: 3-D weight, same"),
    # -- channel and kernel counts
    row(dict(input=z(2, 0, 8, 8), weight=z(6, 0, 3, 3)), ValueError,
        ["channels", "(2, 0, 8, 8)"], False, "input C=0"),
    row(dict(weight=z(0, 2, 3, 3), bias=None), ValueError, ["weight", "(0, 2, 3, 3)"],
        TORCH, "weight O=0"),
    row(dict(weight=z(6, 0, 3, 3)), ValueError, ["weight", "(6, 0, 3, 3)"], TORCH,
        "weight in-channels 0"),
    row(dict(weight=z(6, 2, 0, 3)), ValueError, ["weight", "(6, 2, 0, 3)"], TORCH, "kH=0"),
    row(dict(weight=z(6, 2, 3, 0)), ValueError, ["weight", "(6, 2, 3, 0)"], TORCH, "kW=0"),
    # -- groups
    row(dict(groups=3), ValueError, ["groups=3", "C=4"], TORCH, "groups !| C"),
    row(dict(groups=4, weight=z(6, 1, 3, 3)), ValueError, ["groups=4", "output channels"],
        TORCH, "groups !| O"),
    row(dict(groups=1), ValueError, ["weight.shape[1]", "groups=1", "C=4"], TORCH,
        "weight in-channels != C/groups"),
    row(dict(groups=0), ValueError, ["groups", "0"], TORCH, "groups 0"),
    row(dict(groups=-1), ValueError, ["groups", "-1"], TORCH, "groups -1"),
    row(dict(groups=2.0), TypeError, ["groups", "float"], TORCH, "groups float"),
    row(dict(groups=True), TypeError, ["groups", "bool"], False, "groups bool"),
    row(dict(groups="2"), TypeError, ["groups", "str"], TORCH, "groups str"),
    row(dict(groups=None), TypeError, ["groups", "None"], TORCH, "groups None"),
    # error_inputs_conv2d: groups larger than weight.shape[0]; groups <= 0 with 'same'
    row(dict(input=z(2, 2, 4, 3), weight=z(2, 2, 1, 3), bias=z(2), groups=3), ValueError,
        ["groups=3"], TORCH, "torch: groups 3 > O=2"),
    row(dict(input=z(2, 2, 4, 3), weight=z(2, 2, 1, 3), bias=z(2), groups=3, padding="same"),
        ValueError, ["groups=3"], TORCH, "torch: groups 3 > O=2, same"),
    row(dict(input=z(2, 2, 4, 5), weight=z(2, 2, 1, 4), bias=z(2), groups=-1, padding="same"),
        ValueError, ["groups", "-1"], TORCH, "torch: groups -1, same"),
    row(dict(input=z(2, 2, 4, 3), weight=z(2, 2, 4, 3), bias=z(2), groups=0, padding="same"),
        ValueError, ["groups", "0"], TORCH, "torch: groups 0, same"),
    # -- bias
    row(dict(bias=z(5)), ValueError, ["bias", "(6,)", "(5,)"], TORCH, "bias length"),
    row(dict(bias=z(6, 1)), ValueError, ["bias", "(6, 1)"], TORCH, "bias 2-D"),
    row(dict(bias=np.float32(0)), ValueError, ["bias", "()"], TORCH, "bias 0-D"),
    row(dict(bias=[0.0] * 7), ValueError, ["bias", "(7,)"], False, "bias list length"),
    row(dict(bias="abcdef"), TypeError, ["bias"], False, "bias str"),
    # error_inputs_conv2d: bias of another dtype (complex)
    row(dict(input=z(2, 4, 4, dtype=f64), weight=z(3, 2, 3, 3, dtype=f64),
             bias=z(3, dtype=np.complex128), groups=1), TypeError, ["bias", "complex"],
        TORCH, "torch: complex bias"),
    # -- stride
    row(dict(stride=0), ValueError, ["stride", ">= 1"], TORCH, "stride 0"),
    row(dict(stride=-1), ValueError, ["stride", "-1"], TORCH, "stride -1"),
    row(dict(stride=(1, -2)), ValueError, ["stride", "(1, -2)"], TORCH, "stride (1, -2)"),
    row(dict(stride=1.5), TypeError, ["stride", "1.5"], TORCH, "stride float"),
    row(dict(stride=np.float64(2.0)), TypeError, ["stride", "float64"], False,
        "stride np.float64"),
    row(dict(stride=True), TypeError, ["stride", "bool"], TORCH, "stride bool"),
    row(dict(stride=(True, 1)), TypeError, ["stride", "bool"], False, "stride (bool, 1)"),
    row(dict(stride=np.bool_(True)), TypeError, ["stride", "bool"], False, "stride np.bool_"),
    row(dict(stride="2"), TypeError, ["stride", "'2'"], TORCH, "stride str"),
    row(dict(stride=None), TypeError, ["stride", "None"], TORCH, "stride None"),
    row(dict(stride=()), ValueError, ["stride", "length 0"], TORCH, "stride ()"),
    row(dict(stride=(1, 2, 3)), ValueError, ["stride", "length 3"], TORCH, "stride 3 long"),
    row(dict(stride=np.array([[1, 2]])), TypeError, ["stride"], False, "stride 2-D array"),
    row(dict(stride=2 ** 63), ValueError, ["stride", str(MAX_EXTENT)], TORCH, "stride 2**63"),
    # error_inputs_conv2d / test_invalid_conv2d: non-positive stride
    row(dict(input=z(1, 1, 4, 4), weight=z(1, 2, 2, 3), bias=z(1), stride=(-1,), groups=1),
        ValueError, ["stride", "(-1,)"], TORCH, "torch: stride (-1,)"),
    # -- dilation
    row(dict(dilation=0), ValueError, ["dilation", ">= 1"], TORCH, "dilation 0"),
    row(dict(dilation=(2, -1)), ValueError, ["dilation", "(2, -1)"], TORCH, "dilation -1"),
    row(dict(dilation=1.0), TypeError, ["dilation", "float"], TORCH, "dilation float"),
    row(dict(dilation=False), TypeError, ["dilation", "bool"], TORCH, "dilation bool"),
    row(dict(dilation="2"), TypeError, ["dilation"], TORCH, "dilation str"),
    row(dict(dilation=2 ** 62), ValueError, ["dilation", str(MAX_EXTENT)], False,
        "dilation 2**62"),
    row(dict(input=z(1, 1, 4, 2), weight=z(1, 1, 2, 5), bias=z(1), dilation=(-1,), groups=1),
        ValueError, ["dilation", "(-1,)"], TORCH, "torch: dilation (-1,)"),
    # -- padding
    row(dict(padding=-1), ValueError, ["padding", ">= 0"], TORCH, "padding -1"),
    row(dict(padding=(1, -1)), ValueError, ["padding", "(1, -1)"], TORCH, "padding (1, -1)"),
    row(dict(padding=((1, -1), (0, 0))), ValueError, ["padding", ">= 0"], False,
        "padding nested negative"),
    row(dict(padding=((1, 1), (0,))), ValueError, ["padding", "(left, right)"], False,
        "padding nested short"),
    row(dict(padding=((1, 1), (0, 0), (0, 0))), ValueError, ["padding", "length 3"], False,
        "padding nested 3 pairs"),
    row(dict(padding=((1, 1), 2)), TypeError, ["padding", "(1, 1)"], False,
        "padding pair and int"),
    row(dict(padding=(1, 2, 3)), ValueError, ["padding", "length 3"], TORCH, "padding 3 long"),
    row(dict(padding=[1, 1, 1, 1]), ValueError, ["padding", "length 4"], TORCH,
        "padding 4 long"),
    row(dict(padding=1.0), TypeError, ["padding", "float"], TORCH, "padding float"),
    row(dict(padding=float("nan")), TypeError, ["padding", "nan"], TORCH, "padding nan"),
    row(dict(padding=True), TypeError, ["padding", "bool"], TORCH, "padding bool"),
    row(dict(padding=None), TypeError, ["padding", "None"], TORCH, "padding None"),
    row(dict(padding="full"), ValueError, ["padding", "'full'"], TORCH, "padding 'full'"),
    row(dict(padding=""), ValueError, ["padding", "''"], TORCH, "padding ''"),
    row(dict(padding="SAME"), ValueError, ["padding", "'SAME'"], TORCH, "padding 'SAME'"),
    row(dict(padding="same", stride=2), ValueError, ["same", "stride"], TORCH,
        "same with stride 2"),
    row(dict(padding="same", stride=(1, 3)), ValueError, ["same", "stride"], TORCH,
        "same with stride (1, 3)"),
    row(dict(padding=2 ** 62), ValueError, ["padding", str(MAX_EXTENT)], TORCH,
        "padding 2**62"),
    row(dict(padding=((2 ** 61, 0), (0, 0))), ValueError, ["padded input", "height"], False,
        "padding nested 2**61"),
    # error_inputs_conv2d: negative padding
    row(dict(input=z(1, 1, 4, 3), weight=z(1, 2, 2, 4), bias=z(1), padding=(-1,), groups=1),
        ValueError, ["padding", "(-1,)"], TORCH, "torch: padding (-1,)"),
    # -- padding_mode (only unknown names: the other modes are a separate feature)
    row(dict(padding_mode="mirror"), ValueError, ["padding_mode", "'mirror'"], False,
        "padding_mode unknown"),
    row(dict(padding_mode="ZEROS"), ValueError, ["padding_mode", "'ZEROS'"], False,
        "padding_mode case"),
    row(dict(padding_mode=""), ValueError, ["padding_mode", "''"], False, "padding_mode ''"),
    row(dict(padding_mode=0), TypeError, ["padding_mode", "0"], False, "padding_mode int"),
    row(dict(padding_mode=None), TypeError, ["padding_mode", "None"], False,
        "padding_mode None"),
    # -- dilated kernel larger than the padded input, empty planes
    row(dict(dilation=4), ValueError, ["dilated kernel", "9", "8"], TORCH, "dilated 9 > 8"),
    row(dict(dilation=(1, 5), padding=(0, 1)), ValueError, ["dilated kernel width", "11",
                                                            "10"], TORCH, "dilated 11 > 10"),
    # test_invalid_conv2d: 10x10 kernel on 1x1; 3x3 dilation 2 stride 2 on 4x4
    row(dict(input=z(1, 3, 1, 1), weight=z(33, 3, 10, 10), bias=z(33), groups=1), ValueError,
        ["dilated kernel", "10"], TORCH, "torch: kernel 10 > input 1"),
    row(dict(input=z(1, 1, 4, 4), weight=z(1, 1, 3, 3), bias=None, dilation=2, stride=2,
             groups=1), ValueError, ["dilated kernel", "5", "4"], TORCH,
        "torch: dilated 5 > input 4"),
    # test_conv_shapecheck: 3x3 kernel on a 2x2 plane
    row(dict(input=z(3, 1, 2, 2), weight=z(1, 1, 3, 3), bias=None, groups=1), ValueError,
        ["dilated kernel", "3", "2"], TORCH, "torch: shapecheck 3 > 2"),
    row(dict(input=z(2, 4, 0, 8)), ValueError, ["height", "(2, 4, 0, 8)"], TORCH, "H=0"),
    row(dict(input=z(2, 4, 8, 0)), ValueError, ["width", "(2, 4, 8, 0)"], TORCH, "W=0"),
    row(dict(input=z(4, 0, 8)), ValueError, ["height", "(4, 0, 8)"], TORCH, "unbatched H=0"),
    # -- dtypes
    row(dict(weight=z(6, 2, 3, 3, dtype=f64)), TypeError, ["input is float32",
                                                         "weight is float64"], TORCH,
        "float32 input, float64 weight"),
    row(dict(input=X.astype(f64), bias=None), TypeError, ["input is float64",
                                                          "weight is float32"], TORCH,
        "float64 input, float32 weight"),
    row(dict(bias=z(6, dtype=f64)), TypeError, ["bias is float64"], TORCH, "float64 bias"),
    row(dict(input=X.astype(np.complex64)), TypeError, ["input", "complex64"], False,
        "complex input"),
    row(dict(weight=W.astype(np.complex128)), TypeError, ["weight", "complex128"], False,
        "complex weight"),
    row(dict(input=X.astype(object)), TypeError, ["input", "object"], False, "object input"),
    row(dict(weight=W.astype(object)), TypeError, ["weight", "object"], False,
        "object weight"),
    row(dict(input=np.full(X.shape, "a")), TypeError, ["input", "<U1"], False, "str input"),
    row(dict(input=np.full(X.shape, b"a")), TypeError, ["input", "S1"], False, "bytes input"),
    row(dict(input=X.astype("datetime64[s]")), TypeError, ["input", "datetime64"], False,
        "datetime input"),
    row(dict(input=X.astype("timedelta64[s]")), TypeError, ["input", "timedelta64"], False,
        "timedelta input"),
    row(dict(input=np.zeros(X.shape, [("a", f32)])), TypeError, ["input"], False,
        "structured input"),
    row(dict(weight=W.astype(np.longdouble)), TypeError, ["weight", "float128"], False,
        "longdouble weight"),
    row(dict(input=[[1, 2], [3]]), TypeError, ["input"], False, "ragged list"),
    row(dict(input=None), TypeError, ["input", "None"], TORCH, "input None"),
    row(dict(weight=None), TypeError, ["weight", "None"], TORCH, "weight None"),
    row(dict(input={"a": 1}), TypeError, ["input", "object"], False, "dict input"),
    row(dict(input=RaisesOnConversion()), TypeError, ["input", "RaisesOnConversion"], False,
        "__array__ raises"),
    # -- absurd sizes (zero-strided views cost no memory)
    row(dict(input=huge((2 ** 20, 4, 2 ** 19, 2 ** 19))), ValueError,
        ["input would have", str(2 ** 60), str(MAX_ELEMENTS)], False, "input 2**60 elements"),
    row(dict(weight=huge((2 ** 20, 2, 2 ** 20, 2 ** 19)), bias=None,
             padding=(2 ** 19, 2 ** 18)), ValueError, ["weight would have", str(2 ** 60)],
        False, "weight 2**60 elements"),
    row(dict(padding=2 ** 30), ValueError, ["output would have", "elements"], False,
        "output 2**62 elements"),
    # test_conv3d_overflow_values: padding 2**62
    row(dict(input=z(1, 1, 5, 5), weight=z(1, 1, 1, 1), bias=None, groups=1,
             padding=2 ** 62), ValueError, ["padding", "4611686018427387904"], TORCH,
        "torch: padding 2**62"),
    # -- out=
    row(dict(out=z(2, 6, 6, 5)), ValueError, ["out", "(2, 6, 6, 6)", "(2, 6, 6, 5)"], False,
        "out shape"),
    row(dict(out=z(6, 6, 6)), ValueError, ["out", "(2, 6, 6, 6)", "(6, 6, 6)"], False,
        "out rank"),
    row(dict(out=z(2, 6, 6, 6, dtype=f64)), TypeError, ["out", "float32", "<f8"], False,
        "out dtype"),
    row(dict(out=z(2, 6, 6, 6, dtype=">f4")), TypeError, ["out", ">f4"], False,
        "out big-endian"),
    row(dict(out=[0.0]), TypeError, ["out", "list"], False, "out list"),
    row(dict(out=np.broadcast_to(z(1), (2, 6, 6, 6))), ValueError, ["out", "read-only"],
        False, "out broadcast view"),
]


def _call(fn, base, kwargs):
    call = dict(base)
    call.update(kwargs)
    return fn(**call)


def _assert_raises(fn, base, kwargs, exc, words):
    with pytest.raises((ValueError, TypeError)) as info:
        _call(fn, base, kwargs)
    assert type(info.value) is exc, f"{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize("kwargs, exc, words, torch_rejects", CONV2D)
def test_conv2d_rejects(kwargs, exc, words, torch_rejects):
    _assert_raises(dilconv.conv2d, BASE, kwargs, exc, words)


# The same argument errors through conv2d_backward (no bias or out there); grad_output is
# checked after the arguments, so any of the input's dtype will do.
BACKWARD_FROM_CONV2D = [p for p in CONV2D if "out" not in p.values[0]
                        and not any(word.startswith("bias") for word in p.values[2])]


def _grad_output_like(kwargs):
    x = kwargs.get("input", X)
    kind = getattr(x, "dtype", np.dtype(object)).kind
    return np.zeros(1, x.dtype if kind == "f" and x.dtype.itemsize in (4, 8) else f32)


@pytest.mark.parametrize("kwargs, exc, words, torch_rejects", BACKWARD_FROM_CONV2D)
def test_conv2d_backward_rejects_bad_arguments(kwargs, exc, words, torch_rejects):
    kwargs = {k: v for k, v in kwargs.items() if k != "bias"}
    base = dict(grad_output=_grad_output_like(kwargs), input=X, weight=W, groups=2)
    _assert_raises(dilconv.conv2d_backward, base, kwargs, exc, words)


BACKWARD = [
    # grad_output must be exactly the forward output's shape and of the same dtype.
    row(dict(grad_output=z(2, 6, 6, 5)), ValueError, ["grad_output", "(2, 6, 6, 6)",
                                                      "(2, 6, 6, 5)"], id="gy shape"),
    row(dict(grad_output=z(6, 6, 6)), ValueError, ["grad_output", "(2, 6, 6, 6)",
                                                   "(6, 6, 6)"], id="gy unbatched"),
    row(dict(grad_output=z(1, 2, 6, 6, 6)), ValueError, ["grad_output", "(1, 2, 6, 6, 6)"],
        id="gy 5-D"),
    row(dict(padding=1), ValueError, ["grad_output", "(2, 6, 8, 8)", "(2, 6, 6, 6)"],
        id="gy of unpadded output"),
    row(dict(grad_output=z(2, 6, 6, 6), stride=2), ValueError, ["grad_output", "(2, 6, 3, 3)"],
        id="gy of unstrided output"),
    row(dict(grad_output=GY, input=X[0]), ValueError, ["grad_output", "(6, 6, 6)",
                                                       "(2, 6, 6, 6)"], id="gy batched"),
    row(dict(grad_output=GY.astype(f64)), TypeError, ["grad_output is float64"],
        id="gy float64"),
    row(dict(grad_output=GY.astype(np.complex128)), TypeError, ["grad_output", "complex"],
        id="gy complex"),
    row(dict(grad_output=GY.astype(object)), TypeError, ["grad_output", "object"],
        id="gy object"),
    row(dict(grad_output=None), TypeError, ["grad_output", "None"], id="gy None"),
    row(dict(grad_output=np.float32(0)), ValueError, ["grad_output", "()"], id="gy scalar"),
    # needs=
    row(dict(needs=("input", "bias_grad")), ValueError, ["needs", "'bias_grad'"],
        id="needs unknown"),
    row(dict(needs="weights"), ValueError, ["needs", "'weights'"], id="needs str unknown"),
    row(dict(needs=("Input",)), ValueError, ["needs", "'Input'"], id="needs case"),
    row(dict(needs=(1,)), TypeError, ["needs", "1"], id="needs int entry"),
    row(dict(needs=(None,)), TypeError, ["needs", "None"], id="needs None entry"),
    row(dict(needs=3), TypeError, ["needs", "3"], id="needs int"),
    row(dict(needs=None), TypeError, ["needs", "None"], id="needs None"),
]


@pytest.mark.parametrize("kwargs, exc, words, torch_rejects", BACKWARD)
def test_conv2d_backward_rejects(kwargs, exc, words, torch_rejects):
    base = dict(grad_output=GY, input=X, weight=W, groups=2)
    _assert_raises(dilconv.conv2d_backward, base, kwargs, exc, words)


OUTPUT_SHAPE = [
    row(dict(input_shape=(1, 3, 8.0, 8)), TypeError, ["input_shape", "8.0"], id="float dim"),
    row(dict(input_shape=(1, 3, float("nan"), 8)), TypeError, ["input_shape", "nan"],
        id="nan dim"),
    row(dict(input_shape=(1, 3, True, 8)), TypeError, ["input_shape"], id="bool dim"),
    row(dict(input_shape="abcd"), TypeError, ["input_shape", "abcd"], id="str shape"),
    row(dict(input_shape=None), TypeError, ["input_shape", "None"], id="None shape"),
    row(dict(weight_shape=(4, 3, 3)), ValueError, ["weight", "(4, 3, 3)"], id="weight 3-D"),
    row(dict(input_shape=(3, 8)), ValueError, ["input", "(3, 8)"], id="input 2-D"),
    row(dict(input_shape=(-1, 3, 8, 8)), ValueError, ["batch", "(-1, 3, 8, 8)"],
        id="negative N"),
    row(dict(input_shape=(1, -3, 8, 8)), ValueError, ["channels", "(1, -3, 8, 8)"],
        id="negative C"),
    row(dict(weight_shape=(4, 3, -3, 3)), ValueError, ["weight", "(4, 3, -3, 3)"],
        id="negative kH"),
    row(dict(dilation=5), ValueError, ["dilated kernel", "11", "8"], id="dilated > input"),
    row(dict(input_shape=(2 ** 40, 3, 2 ** 20, 2 ** 20)), ValueError,
        ["input would have", "elements"], id="input too big"),
    row(dict(input_shape=(1, 3, 2 ** 61, 8)), ValueError, ["padded input height"],
        id="H 2**61"),
    # numpy ints must not wrap around in the size checks
    row(dict(input_shape=np.array([2 ** 40, 3, 2 ** 22, 2 ** 22])), ValueError,
        ["input would have", str(3 * 2 ** 84)], id="int64 shape overflow"),
    row(dict(input_shape=(np.int64(2 ** 40), 3, np.int64(2 ** 22), 2 ** 22)), ValueError,
        ["input would have"], id="np.int64 dims overflow"),
    row(dict(groups=2), ValueError, ["groups=2", "C=3"], id="groups"),
]


@pytest.mark.parametrize("kwargs, exc, words, torch_rejects", OUTPUT_SHAPE)
def test_output_shape_rejects(kwargs, exc, words, torch_rejects):
    base = dict(input_shape=(1, 3, 8, 8), weight_shape=(4, 3, 3, 3))
    _assert_raises(dilconv.output_shape, base, kwargs, exc, words)


@pytest.mark.parametrize("n, exc", [(0, ValueError), (-1, ValueError), (1.5, TypeError),
                                    (True, TypeError), ("2", TypeError),
                                    (MAX_THREADS + 1, ValueError), (2 ** 40, ValueError)])
def test_set_num_threads_rejects(n, exc):
    before = dilconv.get_num_threads()
    with pytest.raises(exc) as info:
        dilconv.set_num_threads(n)
    assert type(info.value) is exc and "n must be" in str(info.value)
    assert dilconv.get_num_threads() == before


@pytest.mark.parametrize("name", ["input", "weight", "bias"])
def test_out_aliasing_any_operand_is_rejected(name):
    # out shares one element with each operand in turn.
    operands = dict(input=X, weight=W, bias=B)
    size = operands[name].size
    buf = np.zeros(size + GY.size, f32)
    operands[name] = buf[:size].reshape(operands[name].shape)
    out = buf[size - 1:size - 1 + GY.size].reshape(GY.shape)
    with pytest.raises(ValueError, match=f"out overlaps {name}"):
        dilconv.conv2d(**operands, groups=2, out=out)


def test_out_is_the_input_itself():
    x = np.zeros((1, 2, 5, 5), f32)
    with pytest.raises(ValueError, match="out overlaps input"):
        dilconv.conv2d(x, np.zeros((2, 2, 3, 3), f32), padding=1, out=x)


def test_rejected_call_leaves_out_untouched():
    out = np.full(GY.shape, 7, f32)
    with pytest.raises(ValueError):
        dilconv.conv2d(X, W, z(5), groups=2, out=out)
    assert (out == 7).all()


def test_int_input_with_float_bias_is_accepted():
    # PyTorch's error_inputs_conv2d rejects int64 input with a float64 bias; dilconv converts
    # ints to the float dtype of the other arrays by design, so this one is valid here.
    y = dilconv.conv2d(np.ones((2, 4, 4), np.int64), np.ones((3, 2, 3, 3), np.int64),
                       np.ones(3, f64))
    assert y.dtype == f64 and y.shape == (3, 2, 2)
    np.testing.assert_array_equal(y, 19.0)


def _to_torch(torch, value):
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    return value


@pytest.mark.parametrize("kwargs, exc, words, torch_rejects",
                         [p for p in CONV2D if p.values[3]])
def test_torch_rejects_the_same_rows(kwargs, exc, words, torch_rejects):
    """Keeps the TORCH marks honest: torch==2.13.0 refuses these calls as well."""
    torch = pytest.importorskip("torch")
    call = dict(BASE)
    call.update(kwargs)
    call.pop("out", None)
    args = {k: _to_torch(torch, v) for k, v in call.items()}
    with pytest.raises(Exception):
        torch.nn.functional.conv2d(**args)


def test_float_lists_follow_the_arrays_dtype():
    # Lists and Python numbers have no dtype of their own: they take the arrays' float dtype
    # instead of clashing as float64 (DESIGN: "converted to the float dtype of the others").
    y = dilconv.conv2d(X, W, [0.5] * 6, groups=2)
    assert y.dtype == f32
    np.testing.assert_array_equal(y, 0.5)
    g = dilconv.conv2d_backward(GY.tolist(), X, W.tolist(), groups=2)
    assert g.input.dtype == g.weight.dtype == f32


def test_output_shape_returns_python_ints():
    shape = dilconv.output_shape(np.array([1, 3, 8, 8]), (np.int64(4), 3, 3, 3), dilation=2)
    assert shape == (1, 4, 4, 4) and all(type(s) is int for s in shape)
