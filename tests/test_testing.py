"""dilconv.testing: the oracle of every public call, its bounds and its assertions."""
import numpy as np
import pytest

import dilconv
from dilconv import testing

CALLS = [
    # (op, arrays by argument shape, other arguments)
    ("conv2d", dict(input=(2, 4, 9, 8), weight=(6, 2, 3, 2), bias=(6,)),
     dict(stride=(1, 2), padding=((2, 1), (0, 3)), dilation=2, groups=2,
          padding_mode="reflect")),
    ("conv2d", dict(input=(4, 9, 8), weight=(6, 4, 3, 3), bias=None),
     dict(padding="same", dilation=(2, 1))),
    ("conv2d_backward", dict(grad_output=(2, 6, 8, 5), input=(2, 4, 9, 8),
                             weight=(6, 2, 3, 2)),
     dict(stride=(1, 2), padding=((2, 1), (0, 3)), dilation=2, groups=2,
          padding_mode="circular")),
    ("conv1d", dict(input=(2, 3, 20), weight=(4, 3, 3), bias=(4,)),
     dict(dilation=4, causal=True)),
    ("conv1d_backward", dict(grad_output=(3, 4, 16), input=(3, 3, 20), weight=(4, 3, 3)),
     dict(padding=(3, 1), dilation=4, padding_mode="replicate")),
    ("conv_transpose2d", dict(input=(2, 4, 5, 6), weight=(4, 3, 3, 2), bias=(6,)),
     dict(stride=2, padding=1, output_padding=1, groups=2, dilation=2)),
    ("conv_transpose2d_backward", dict(grad_output=(3, 13, 11), input=(4, 5, 6),
                                       weight=(4, 3, 3, 2)),
     dict(stride=2, padding=((1, 0), (2, 0)), output_padding=1, dilation=(2, 1))),
]


def _call(rng, op, shapes, kwargs, dtype):
    arrays = {k: None if s is None else rng.standard_normal(s).astype(dtype)
              for k, s in shapes.items()}
    return arrays, getattr(dilconv, op)(**arrays, **kwargs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op, shapes, kwargs", CALLS)
def test_accepts_dilconv_and_rejects_an_error_just_over_the_bound(op, shapes, kwargs, dtype,
                                                                  rng):
    arrays, result = _call(rng, op, shapes, kwargs, dtype)
    ratio = testing.assert_conv_close(result, op, **arrays, **kwargs)
    assert 0 <= ratio <= 1
    exps = testing.expected(getattr(dilconv, op), **arrays, **kwargs)
    outputs = (result,) if len(exps) == 1 else tuple(result)
    for got, exp in zip(outputs, exps):
        assert got.shape == exp.value.shape
    # One element moved by twice its bound is caught, and named.
    got, exp = outputs[-1].astype(np.float64), exps[-1]
    got.flat[-1] = exp.value.flat[-1] + 2 * exp.bound(dtype).flat[-1]
    bad = got if len(exps) == 1 else tuple(outputs[:-1]) + (got,)
    with pytest.raises(AssertionError, match=f"{op} {testing.OPS[op][-1]}: off by"):
        testing.assert_conv_close(bad, op, **arrays, **kwargs)


def test_skips_gradients_not_asked_for(rng):
    op, shapes, kwargs = CALLS[2]
    arrays = {k: rng.standard_normal(s) for k, s in shapes.items()}
    grads = dilconv.conv2d_backward(**arrays, **kwargs, needs=("weight",))
    testing.assert_conv_close(grads, op, **arrays, **kwargs)


def test_peer_bound_is_twice_the_oracle_bound(rng):
    op, shapes, kwargs = CALLS[0]
    arrays, y = _call(rng, op, shapes, kwargs, np.float32)
    exp, = testing.expected(op, **arrays, **kwargs)
    np.testing.assert_array_equal(exp.bound(np.float32, sides=2), 2 * exp.bound(np.float32))


def test_unknown_op_is_a_value_error():
    with pytest.raises(ValueError, match="op must be one of"):
        testing.expected("conv3d", np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 1, 1)))


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_fold_is_the_adjoint_of_pad(mode, rng):
    x = rng.standard_normal((2, 3, 5, 4))
    pads = ((2, 4), (3, 1))
    padded = testing.pad(x, pads, mode)
    np.testing.assert_array_equal(padded, np.pad(x, ((0, 0), (0, 0)) + pads,
                                                 mode=testing.NUMPY_PAD_MODES[mode]))
    g = rng.standard_normal(padded.shape)
    folded, copies = testing.fold(g, (5, 4), pads, mode)
    assert folded.shape == x.shape and copies >= 2
    np.testing.assert_allclose(np.vdot(padded, g), np.vdot(x, folded), rtol=1e-12)


def test_torch_reference_agrees_with_dilconv(rng):
    pytest.importorskip("torch")
    torch_ref = testing.TorchReference()
    for op, shapes, kwargs in CALLS:
        arrays, ours = _call(rng, op, shapes, kwargs, np.float64)
        theirs = getattr(torch_ref, op)(**arrays, **kwargs)
        exps = testing.expected(op, **arrays, **kwargs)
        outputs = (ours,) if len(exps) == 1 else tuple(ours)
        peers = (theirs,) if len(exps) == 1 else tuple(theirs)
        for got, peer, exp in zip(outputs, peers, exps):
            testing.assert_expected(got, exp._replace(value=peer), np.float64, sides=2,
                                    what=op)


def test_readme_example_runs_as_a_doctest():
    import doctest
    import os
    import re
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "README.md")).read()
    section = text[text.index("### Checking your own kernels"):]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    test = doctest.DocTestParser().get_doctest(block, {}, "README", "README.md", 0)
    assert len(test.examples) >= 8
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def test_reachable_from_the_package_like_numpy_testing():
    import subprocess
    import sys
    code = ("import sys, dilconv; assert 'dilconv.testing' not in sys.modules; "
            "print(dilconv.testing.assert_conv_close.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == "dilconv.testing", out.stderr
