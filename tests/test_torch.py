"""dilconv against torch.nn.functional.conv2d and autograd (skipped without PyTorch)."""
import numpy as np
import pytest

import dilconv
from dilconv import reference, tolerance
from dilconv._validate import make_spec

from _helpers import random_case
from test_conv import GRID

torch = pytest.importorskip("torch")


def _torch_padding(pads):
    # F.conv2d takes symmetric padding only: pad asymmetric cases with F.pad first.
    (t, b), (l, r) = pads
    return (l, r, t, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", GRID)
def test_matches_torch(case, dtype, rng):
    n, c, h, w, o, kh, kw, stride, padding, dilation, groups = case
    x, wt, b = random_case(rng, n, c, h, w, o, kh, kw, groups, dtype)
    spec = make_spec(x.shape, wt.shape, stride, padding, dilation, groups)
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(wt, requires_grad=True)
    tb = torch.tensor(b, requires_grad=True)
    padded = torch.nn.functional.pad(tx, _torch_padding(spec.padding))
    ty = torch.nn.functional.conv2d(padded, tw, tb, spec.stride, 0, spec.dilation, groups)
    y = dilconv.conv2d(x, wt, b, stride, padding, dilation, groups)
    args = (spec.stride, spec.padding, spec.dilation, groups)
    abs_y = reference.conv2d_reference_abs(x, wt, *args) + np.abs(b)[None, :, None, None]
    # Both sides carry rounding error: twice the bound.
    bound = 2 * tolerance.error_bound(abs_y, tolerance.forward_terms(spec, True), dtype)
    assert tolerance.worst_ratio(y, ty.detach().numpy(), bound) <= 1
    if n == 0:
        return
    gy = rng.standard_normal(y.shape).astype(dtype)
    ty.backward(torch.tensor(gy))
    grads = dilconv.conv2d_backward(gy, x, wt, stride, padding, dilation, groups)
    abs_g = reference.conv2d_backward_reference_abs(gy, x, wt, *args)
    terms = (tolerance.grad_input_terms(spec), tolerance.grad_weight_terms(spec),
             tolerance.grad_weight_terms(spec))
    for got, want, a, k in zip(grads, (tx.grad, tw.grad, tb.grad), abs_g, terms):
        assert tolerance.worst_ratio(got, want.numpy(), 2 * tolerance.error_bound(a, k, dtype)) <= 1
