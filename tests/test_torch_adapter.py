"""dilconv.torch: autograd Function and DilatedConv2d module (skipped without PyTorch)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
dtorch = pytest.importorskip("dilconv.torch")

F = torch.nn.functional

GRADCHECK_CASES = [
    # (input shape, weight shape, bias, stride, padding, dilation, groups, padding_mode,
    #  fast_mode: a random projection of the Jacobian instead of all of it)
    ((1, 2, 5, 6), (2, 2, 3, 2), True, 1, 0, 2, 1, "zeros", False),
    ((1, 4, 7, 6), (4, 2, 2, 3), True, (2, 1), (2, 1), (1, 2), 2, "reflect", True),
    ((2, 3, 5, 5), (3, 1, 3, 3), False, 1, "same", 2, 3, "circular", True),
    ((3, 6, 6), (2, 3, 3, 3), True, 2, ((2, 0), (1, 3)), 1, 1, "replicate", True),  # unbatched
]


@pytest.mark.parametrize("case", GRADCHECK_CASES)
def test_gradcheck_float64(case):
    shape, wshape, bias, stride, padding, dilation, groups, mode, fast = case
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(wshape, dtype=torch.float64, generator=gen, requires_grad=True)
    b = (torch.randn(wshape[0], dtype=torch.float64, generator=gen, requires_grad=True)
         if bias else None)

    def f(x_, w_, b_):
        return dtorch.conv2d(x_, w_, b_, stride, padding, dilation, groups, mode)

    assert torch.autograd.gradcheck(f, (x, w, b), fast_mode=fast)


@pytest.mark.parametrize("kwargs", [
    dict(in_channels=3, out_channels=8, kernel_size=3, padding=2, dilation=2),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 1), stride=(2, 1), padding="valid",
         dilation=(3, 1), groups=2, bias=False),
    dict(in_channels=2, out_channels=2, kernel_size=3, padding="same", dilation=4,
         padding_mode="reflect"),
    dict(in_channels=2, out_channels=4, kernel_size=2, padding=3, dilation=3,
         padding_mode="circular"),
])
def test_drop_in_for_nn_conv2d(kwargs):
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(**kwargs)
    ours = dtorch.DilatedConv2d(**kwargs)
    assert isinstance(ours, torch.nn.Conv2d)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, kwargs["in_channels"], 11, 10, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y2 = ref(x), ours(x2)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    # float32 on both sides: a loose check here; the float64 gradcheck is the exact one.
    torch.testing.assert_close(y2, y)
    torch.testing.assert_close(x2.grad, x.grad)
    for p_ref, p_ours in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(p_ours.grad, p_ref.grad)


def test_non_contiguous_tensors_and_needs():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 9, 3, dtype=torch.float64, generator=gen).transpose(1, 3)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64, generator=gen)[:, :, ::1, :]
    w = w.transpose(2, 3).requires_grad_(True)          # non-contiguous leaf
    assert not x.is_contiguous() and not w.is_contiguous()
    y = dtorch.conv2d(x, w, None, 1, 1, 2)
    torch.testing.assert_close(y, F.conv2d(x, w, None, 1, 1, 2))
    y.sum().backward()                      # grad_output is an expanded (stride 0) tensor
    w_ref = w.detach().clone().requires_grad_(True)
    F.conv2d(x, w_ref, None, 1, 1, 2).sum().backward()
    torch.testing.assert_close(w.grad, w_ref.grad)
    assert x.grad is None                   # input did not require grad


def test_rejects_unsupported_tensors():
    x = torch.zeros(1, 2, 5, 5)
    w = torch.zeros(2, 2, 3, 3)
    with pytest.raises(TypeError, match="float16"):
        dtorch.conv2d(x.half(), w.half())
    with pytest.raises(TypeError, match="float32.*float64|float64.*float32"):
        dtorch.conv2d(x, w.double())
    with pytest.raises(ValueError, match="dilated kernel"):
        dtorch.conv2d(x, w, dilation=3)
