"""Padding modes, conv1d, conv_transpose2d and the layers against PyTorch modules.

Random PyTorch modules get their weights copied into the dilconv equivalent; outputs and
gradients must agree within twice the derived bound (both sides round). Configurations
PyTorch rejects must be rejected by dilconv too (ValueError). Skipped without PyTorch.
"""
import os
import runpy

import numpy as np
import pytest

import dilconv
from dilconv.testing import assert_expected, expected

torch = pytest.importorskip("torch")
F = torch.nn.functional

MODES = ("zeros", "reflect", "replicate", "circular")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ints(rng, low, high, n):
    return tuple(int(v) for v in rng.integers(low, high + 1, n))


def _random_module(rng, kind):
    """Random (PyTorch module class name, kwargs, input shape) of `kind`."""
    nd = 1 if kind == "Conv1d" else 2
    groups = int(rng.choice([1, 1, 2, 3]))
    kwargs = dict(in_channels=groups * int(rng.integers(1, 3)),
                  out_channels=groups * int(rng.integers(1, 3)),
                  kernel_size=_ints(rng, 1, 3, nd), stride=_ints(rng, 1, 3, nd),
                  dilation=_ints(rng, 1, 4, nd), groups=groups,
                  bias=bool(rng.integers(0, 2)))
    if kind == "ConvTranspose2d":
        kwargs["padding"] = _ints(rng, 0, 3, nd)
        kwargs["output_padding"] = tuple(
            int(rng.integers(0, max(s, d))) for s, d in zip(kwargs["stride"],
                                                           kwargs["dilation"]))
    else:
        kwargs["padding_mode"] = str(rng.choice(MODES))
        choice = rng.integers(0, 4)
        if choice == 2 and kwargs["stride"] == (1,) * nd:
            kwargs["padding"] = "same"
        elif choice == 3:
            kwargs["padding"] = "valid"
        else:
            kwargs["padding"] = _ints(rng, 0, 5, nd) if choice else int(rng.integers(0, 5))
    batch = (int(rng.integers(0, 3)),) if rng.integers(0, 4) else ()   # sometimes unbatched
    shape = batch + (kwargs["in_channels"],) + _ints(rng, 1, 9, nd)
    return kwargs, shape


def _expected(kind, layer, x, gy):
    """The oracle's forward and three gradients of `layer` (values and bounds)."""
    w, b = layer.weight, layer.bias
    if kind == "ConvTranspose2d":
        args = (layer.stride, layer.padding, layer.output_padding, layer.groups,
                layer.dilation)
        return (expected("conv_transpose2d", x, w, b, *args)
                + expected("conv_transpose2d_backward", gy, x, w, *args))
    op = kind.lower()
    args = (layer.stride, layer.padding, layer.dilation, layer.groups)
    mode = layer.padding_mode
    return (expected(op, x, w, b, *args, padding_mode=mode)
            + expected(op + "_backward", gy, x, w, *args, padding_mode=mode))


def _assert_matches(ours, theirs, exp, dtype, what=""):
    """ours within twice the oracle's bound of theirs (both sides round)."""
    assert_expected(ours, exp._replace(value=np.asarray(theirs, np.float64)), dtype, sides=2,
                    what=what)


def _compare(kind, seed, dtype):
    """One random module of `kind`; returns False when PyTorch rejects the configuration."""
    rng = np.random.default_rng(seed)
    kwargs, shape = _random_module(rng, kind)
    x = rng.standard_normal(shape).astype(dtype)
    try:
        module = getattr(torch.nn, kind)(**kwargs, dtype=torch.from_numpy(x).dtype)
        tx = torch.tensor(x, requires_grad=True)
        ty = module(tx)
    except (RuntimeError, ValueError):
        try:
            y = getattr(dilconv, kind)(**kwargs, dtype=dtype)(x)
        except ValueError:
            return False
        # PyTorch's transposed convolutions allow an empty output on some paths only.
        assert kind == "ConvTranspose2d" and 0 in y.shape[-2:], (kind, kwargs, shape)
        return False
    layer = getattr(dilconv, kind)(**kwargs, dtype=dtype)
    assert repr(layer) == repr(module)
    layer.load_state_dict(module.state_dict())
    y = layer(x)
    gy = rng.standard_normal(y.shape).astype(dtype)
    ty.backward(torch.from_numpy(gy))
    grad_input = layer.backward(gy)
    if not y.size:          # empty output: nothing to bound, everything is exactly zero
        for ours, theirs in ((grad_input, tx.grad), (layer.weight_grad, module.weight.grad)):
            np.testing.assert_array_equal(ours, theirs.numpy())
        return True
    exps = _expected(kind, layer, x, gy)
    got = (y, grad_input, layer.weight_grad, layer.bias_grad)
    want = (ty, tx.grad, module.weight.grad, None if module.bias is None else module.bias.grad)
    for name, ours, theirs, exp in zip(("output", "input", "weight", "bias"), got, want,
                                       exps):
        if theirs is None:
            assert ours is None
            continue
        _assert_matches(ours, theirs.detach().numpy(), exp, dtype,
                        what=f"{kind} {kwargs} {shape}: {name}")
    return True


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["Conv2d", "Conv1d", "ConvTranspose2d"])
def test_random_modules_match_pytorch(kind, dtype):
    compared = sum(_compare(kind, seed, dtype) for seed in range(16))
    assert compared >= 8, compared          # the draw must mostly give valid modules


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["Conv2d", "Conv1d", "ConvTranspose2d"])
def test_many_random_modules_match_pytorch(kind):
    for seed in range(1000, 1600):
        _compare(kind, seed, np.float32 if seed % 2 else np.float64)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("size", [1, 2, 4])
@pytest.mark.parametrize("pad", [0, 1, 3, 4, 5, 9])
def test_padding_limits_match_pytorch(mode, size, pad):
    x = np.zeros((1, 1, 3, size), np.float32)
    w = np.zeros((1, 1, 1, 1), np.float32)
    try:
        F.pad(torch.from_numpy(x), (pad, 0, 0, 0), mode=mode)
        torch_ok = True
    except RuntimeError:
        torch_ok = False
    if torch_ok:
        dilconv.conv2d(x, w, padding=((0, 0), (pad, 0)), padding_mode=mode)
    else:
        with pytest.raises(ValueError, match="padding"):
            dilconv.conv2d(x, w, padding=((0, 0), (pad, 0)), padding_mode=mode)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", [
    # (padding ((t, b), (l, r)), mode, stride, dilation)
    (((2, 0), (1, 3)), "reflect", 1, 2),
    (((0, 3), (2, 2)), "circular", (2, 1), (1, 3)),
    (((4, 1), (0, 5)), "replicate", 1, 1),
])
def test_asymmetric_padding_modes_match_pytorch(case, dtype, rng):
    # nn.Conv2d has no asymmetric padding: PyTorch's own path is F.pad then conv2d.
    pads, mode, stride, dilation = case
    x = rng.standard_normal((2, 4, 6, 7)).astype(dtype)
    w = rng.standard_normal((6, 2, 3, 2)).astype(dtype)
    tx, tw = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    ty = F.conv2d(F.pad(tx, pads[1] + pads[0], mode=mode), tw, None, stride, 0, dilation, 2)
    y = dilconv.conv2d(x, w, None, stride, pads, dilation, 2, padding_mode=mode)
    args = (stride, pads, dilation, 2)
    _assert_matches(y, ty.detach().numpy(),
                    expected("conv2d", x, w, None, *args, padding_mode=mode)[0], dtype)
    gy = rng.standard_normal(y.shape).astype(dtype)
    ty.backward(torch.from_numpy(gy))
    grads = dilconv.conv2d_backward(gy, x, w, *args, padding_mode=mode)
    for got, want, exp in zip(grads, (tx.grad, tw.grad),
                              expected("conv2d_backward", gy, x, w, *args, padding_mode=mode)):
        _assert_matches(got, want.numpy(), exp, dtype)


@pytest.mark.parametrize("k, dilation", [(2, 1), (2, 16), (3, 5)])
def test_causal_conv1d_matches_left_padded_pytorch(k, dilation, rng):
    x = rng.standard_normal((2, 3, 50))
    w = rng.standard_normal((5, 3, k))
    b = rng.standard_normal(5)
    want = F.conv1d(F.pad(torch.from_numpy(x), ((k - 1) * dilation, 0)), torch.from_numpy(w),
                    torch.from_numpy(b), dilation=dilation).numpy()
    got = dilconv.conv1d(x, w, b, dilation=dilation, causal=True)
    exp, = expected("conv1d", x, w, b, 1, ((k - 1) * dilation, 0), dilation)
    _assert_matches(got, want, exp, np.float64)


@pytest.mark.parametrize("kind, args", [
    ("Conv2d", (16, 32, 3)), ("Conv2d", (16, 32, (3, 2), 1, 0, 1, 2)), ("Conv1d", (32, 64, 5)),
    ("ConvTranspose2d", (16, 24, 3, 1, 0, 0, 2)),
])
def test_init_bounds_match_pytorch(kind, args):
    # Weights and biases uniform in +-1/sqrt(fan_in), fan_in as PyTorch computes it.
    torch.manual_seed(0)
    module = getattr(torch.nn, kind)(*args)
    layer = getattr(dilconv, kind)(*args, rng=0)
    fan_in, _ = torch.nn.init._calculate_fan_in_and_fan_out(module.weight)
    bound = 1 / np.sqrt(fan_in)
    for ours, theirs in ((layer.weight, module.weight), (layer.bias, module.bias)):
        theirs = theirs.detach().numpy()
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
        assert np.abs(theirs).max() <= bound and np.abs(ours).max() <= bound
    # Thousands of draws come within 1% of the bound: PyTorch's bound is not smaller.
    assert np.abs(module.weight.detach().numpy()).max() > 0.99 * bound
    assert np.abs(layer.weight).max() > 0.99 * bound


@pytest.mark.parametrize("kind", ["Conv2d", "Conv1d", "ConvTranspose2d"])
def test_same_keyword_arguments_as_pytorch(kind):
    # A rename: the keyword arguments of a PyTorch model, device and dtype included.
    kwargs = dict(in_channels=4, out_channels=4, kernel_size=3, stride=1, padding=2,
                  dilation=2, groups=2, bias=False, padding_mode="zeros",
                  device=torch.device("cpu"), dtype=torch.float64)
    module = getattr(torch.nn, kind)(**kwargs)
    layer = getattr(dilconv, kind)(**kwargs)
    assert repr(layer) == repr(module) and layer.weight.dtype == np.float64
    layer.load_state_dict(module.state_dict())
    x = np.random.default_rng(0).standard_normal((2, 4) + (8,) * (kind != "Conv1d") + (9,))
    y = layer(x)
    _assert_matches(y, module(torch.from_numpy(x)).detach().numpy(),
                    _expected(kind, layer, x, np.zeros_like(y))[0], np.float64)


def test_example_reproduces_pytorch(capsys):
    runpy.run_path(os.path.join(ROOT, "examples", "from_pytorch.py"), run_name="__main__")
    assert "max |dilconv - torch|" in capsys.readouterr().out
