"""dilconv against torch.nn.functional.conv2d and autograd (skipped without PyTorch)."""
import numpy as np
import pytest

import dilconv
from dilconv.testing import TorchReference, assert_expected, expected

from _helpers import random_case
from test_conv import GRID

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", GRID)
def test_matches_torch(case, dtype, rng):
    n, c, h, w, o, kh, kw, stride, padding, dilation, groups = case
    x, wt, b = random_case(rng, n, c, h, w, o, kh, kw, groups, dtype)
    args = (stride, padding, dilation, groups)
    peer = TorchReference()
    y = dilconv.conv2d(x, wt, b, *args)
    # Both sides carry rounding error: twice the oracle's bound, around PyTorch's values.
    exp, = expected("conv2d", x, wt, b, *args)
    assert_expected(y, exp._replace(value=peer.conv2d(x, wt, b, *args)), dtype, sides=2,
                    what="forward")
    if n == 0:
        return
    gy = rng.standard_normal(y.shape).astype(dtype)
    grads = dilconv.conv2d_backward(gy, x, wt, *args)
    for name, got, want, exp in zip(("input", "weight", "bias"), grads,
                                    peer.conv2d_backward(gy, x, wt, *args),
                                    expected("conv2d_backward", gy, x, wt, *args)):
        assert_expected(got, exp._replace(value=want), dtype, sides=2, what=f"grad {name}")
