"""Conv2d / Conv1d / ConvTranspose2d layers: init, forward/backward, state_dict, repr."""
import numpy as np
import pytest

import dilconv

from _helpers import assert_rejects


def test_default_init_is_pytorchs_kaiming_uniform():
    # kaiming_uniform_(a=sqrt(5)) and the bias are uniform in +-1/sqrt(fan_in).
    layer = dilconv.Conv2d(64, 128, 3, groups=2, rng=0)
    fan_in = 32 * 9
    bound = 1 / np.sqrt(fan_in)
    assert layer.weight.shape == (128, 32, 3, 3) and layer.weight.dtype == np.float32
    for values in (layer.weight, layer.bias):
        assert np.abs(values).max() <= bound
    # U(-b, b) has variance b^2/3: 36864 draws estimate it within a few percent.
    assert abs(layer.weight.var() / (bound ** 2 / 3) - 1) < 0.05
    assert abs(layer.weight.mean()) < 0.01 * bound
    assert np.abs(layer.weight).max() > 0.99 * bound
    t = dilconv.ConvTranspose2d(8, 6, (3, 2), groups=2, rng=0)
    assert t.weight.shape == (8, 3, 3, 2)
    assert np.abs(t.weight).max() <= 1 / np.sqrt(3 * 6)


def test_rng_makes_init_reproducible():
    a, b, c = (dilconv.Conv1d(4, 4, 3, rng=seed) for seed in (7, 7, 8))
    np.testing.assert_array_equal(a.weight, b.weight)
    np.testing.assert_array_equal(a.bias, b.bias)
    assert not np.array_equal(a.weight, c.weight)
    gen = np.random.default_rng(7)
    np.testing.assert_array_equal(dilconv.Conv1d(4, 4, 3, rng=gen).weight, a.weight)
    layer = dilconv.Conv2d(2, 2, 1, bias=False, dtype=np.float64)
    assert layer.bias is None and layer.weight.dtype == np.float64


LAYERS = [
    (dilconv.Conv2d, dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=(1, 2),
                          padding=2, dilation=(2, 1), groups=2), (2, 4, 9, 10),
     dilconv.conv2d, dilconv.conv2d_backward),
    (dilconv.Conv2d, dict(in_channels=2, out_channels=3, kernel_size=3, padding="same",
                          dilation=3, padding_mode="reflect"), (2, 9, 9),
     dilconv.conv2d, dilconv.conv2d_backward),
    (dilconv.Conv1d, dict(in_channels=4, out_channels=4, kernel_size=2, padding=(4, 0),
                          dilation=4, groups=4), (3, 4, 30),
     dilconv.conv1d, dilconv.conv1d_backward),
    (dilconv.ConvTranspose2d, dict(in_channels=4, out_channels=2, kernel_size=3, stride=2,
                                   padding=1, output_padding=1, dilation=1), (1, 4, 5, 5),
     dilconv.conv_transpose2d, dilconv.conv_transpose2d_backward),
]


@pytest.mark.parametrize("cls, kwargs, shape, fn, fn_backward", LAYERS)
def test_forward_backward_match_the_functions(cls, kwargs, shape, fn, fn_backward, rng):
    layer = cls(**kwargs, rng=1)
    x = rng.standard_normal(shape).astype(np.float32)
    y = layer(x)
    names = ("stride", "padding", "dilation", "groups")
    if cls is dilconv.ConvTranspose2d:
        names = ("stride", "padding", "output_padding", "groups", "dilation")
    args = [getattr(layer, name) for name in names]
    extra = {} if cls is dilconv.ConvTranspose2d else {"padding_mode": layer.padding_mode}
    np.testing.assert_array_equal(y, fn(x, layer.weight, layer.bias, *args, **extra))
    gy = rng.standard_normal(y.shape).astype(np.float32)
    grad_input = layer.backward(gy)
    want = fn_backward(gy, x, layer.weight, *args, **extra)
    np.testing.assert_array_equal(grad_input, want.input)
    np.testing.assert_array_equal(layer.weight_grad, want.weight)
    np.testing.assert_array_equal(layer.bias_grad, want.bias)


def test_backward_needs_forward_and_skips_absent_bias(rng):
    layer = dilconv.Conv2d(2, 2, 3, bias=False)
    with pytest.raises(RuntimeError, match="forward"):
        layer.backward(np.zeros((1, 2, 3, 3), np.float32))
    y = layer(np.ones((1, 2, 5, 5), np.float32))
    layer.backward(np.ones_like(y))
    assert layer.bias_grad is None and layer.weight_grad.shape == layer.weight.shape


def test_state_dict_round_trip():
    a = dilconv.Conv2d(3, 4, 3, dilation=2, rng=0)
    b = dilconv.Conv2d(3, 4, 3, dilation=2, rng=1)
    state = a.state_dict()
    assert list(state) == ["weight", "bias"] and state["weight"] is a.weight
    assert b.load_state_dict({k: v.astype(np.float64) for k, v in state.items()}) == ([], [])
    np.testing.assert_array_equal(b.weight, a.weight)
    assert b.weight.dtype == np.float32                 # cast into the layer's dtype
    x = np.ones((1, 3, 8, 8), np.float32)
    np.testing.assert_array_equal(a(x), b(x))


def test_load_state_dict_checks_keys_and_shapes():
    layer = dilconv.Conv2d(3, 4, 3, rng=0)
    before = layer.weight.copy()
    with pytest.raises(ValueError, match=r"missing keys \['bias'\]"):
        layer.load_state_dict({"weight": np.zeros((4, 3, 3, 3))})
    with pytest.raises(ValueError, match=r"unexpected keys \['extra'\]"):
        layer.load_state_dict({**layer.state_dict(), "extra": 1})
    with pytest.raises(ValueError, match=r"state_dict\['bias'\].*\(5,\).*\(4,\)"):
        layer.load_state_dict({"weight": np.zeros((4, 3, 3, 3)), "bias": np.zeros(5)})
    np.testing.assert_array_equal(layer.weight, before)         # nothing half-loaded
    keys = layer.load_state_dict({"weight": np.zeros((4, 3, 3, 3))}, strict=False)
    assert keys.missing_keys == ["bias"] and not layer.weight.any()
    with pytest.raises(TypeError, match="state_dict"):
        layer.load_state_dict({"weight": np.zeros((4, 3, 3, 3), complex), "bias": np.zeros(4)})


def test_repr_by_hand():
    assert repr(dilconv.Conv2d(16, 33, (3, 5), stride=(2, 1), padding=(4, 2),
                               dilation=(3, 1))) == (
        "Conv2d(16, 33, kernel_size=(3, 5), stride=(2, 1), padding=(4, 2), dilation=(3, 1))")
    assert repr(dilconv.Conv1d(2, 2, 2, padding="same", dilation=8, bias=False,
                               padding_mode="circular")) == (
        "Conv1d(2, 2, kernel_size=(2,), stride=(1,), padding=same, dilation=(8,), "
        "bias=False, padding_mode=circular)")
    assert repr(dilconv.Conv2d(1, 1, 3, padding=((1, 0), (2, 2)))) == (
        "Conv2d(1, 1, kernel_size=(3, 3), stride=(1, 1), padding=((1, 0), (2, 2)))")


@pytest.mark.parametrize("cls, kwargs, exc, words", [
    (dilconv.Conv2d, dict(in_channels=3, out_channels=4, kernel_size=3, groups=2), ValueError,
     ["in_channels=3", "groups=2"]),
    (dilconv.Conv2d, dict(in_channels=4, out_channels=3, kernel_size=3, groups=2), ValueError,
     ["out_channels=3"]),
    (dilconv.Conv2d, dict(in_channels=0, out_channels=3, kernel_size=3), ValueError,
     ["in_channels", ">= 1"]),
    (dilconv.Conv2d, dict(in_channels=2.0, out_channels=3, kernel_size=3), TypeError,
     ["in_channels"]),
    (dilconv.Conv2d, dict(in_channels=2, out_channels=3, kernel_size=0), ValueError,
     ["kernel_size"]),
    (dilconv.Conv2d, dict(in_channels=2, out_channels=3, kernel_size=3, stride=2,
                          padding="same"), ValueError, ["same", "stride"]),
    (dilconv.Conv2d, dict(in_channels=2, out_channels=3, kernel_size=3, padding="full"),
     ValueError, ["padding", "full"]),
    (dilconv.Conv2d, dict(in_channels=2, out_channels=3, kernel_size=3, padding_mode="zero"),
     ValueError, ["padding_mode", "zero"]),
    (dilconv.Conv2d, dict(in_channels=2, out_channels=3, kernel_size=3, dtype=np.float16),
     TypeError, ["dtype", "float16"]),
    (dilconv.Conv2d, dict(in_channels=2, out_channels=3, kernel_size=3, device="cuda"),
     ValueError, ["device", "cuda"]),
    (dilconv.Conv1d, dict(in_channels=2, out_channels=3, kernel_size=(3, 3)), ValueError,
     ["kernel_size", "1-tuple"]),
    (dilconv.ConvTranspose2d, dict(in_channels=2, out_channels=3, kernel_size=3,
                                   padding_mode="reflect"), ValueError, ["zeros"]),
])
def test_constructor_rejects(cls, kwargs, exc, words):
    assert_rejects(cls, kwargs, exc, words)
