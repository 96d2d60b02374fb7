"""Expected results of a case and their per-element error bounds, from `dilconv.testing`.

Values come from `dilconv.reference` (scipy correlate2d on zero-inserted kernels), computed in
float64; non-zero padding modes pad with `numpy.pad` and fold the input gradient back
(`dilconv.testing.pad` / `fold`). The geometry is the case's own (normalised by
`cases`, not by dilconv's validator), so the lab also checks how dilconv reads its
arguments. Each bound is c*K*eps*sum|a||b| per element (`dilconv.tolerance`).
"""
from __future__ import annotations

import numpy as np

from dilconv.testing import (Expected, compare, conv2d_backward_expected,  # noqa: F401
                             conv2d_expected)

from . import cases


def expected(case, arrays, ops) -> dict:
    """{op: Expected} for the case's API, for the ops that need the oracle (`adjoint` needs
    forward and the gradients)."""
    x, w, b, gy = (arrays[k] for k in ("input", "weight", "bias", "grad_output"))
    args = (cases.geom(case, "stride"), cases.padding_amounts(case),
            cases.geom(case, "dilation"), case["groups"], case["padding_mode"])
    ops = set(ops) | ({"forward", "grad_input", "grad_weight"} if "adjoint" in ops else set())
    # conv_transpose2d is conv2d's adjoint: its forward is conv2d's input gradient (x only
    # gives the shape), its input gradient conv2d's forward (of its grad_output, x here).
    transpose = case.get("api") == "conv_transpose2d"
    if transpose:
        want_forward, want_backward = "grad_input" in ops, bool(ops & {"forward",
                                                                        "grad_weight"})
    else:
        want_forward, want_backward = "forward" in ops, bool(ops & {"grad_input",
                                                                     "grad_weight"})
    result = {}
    if want_forward:
        y = conv2d_expected(x, w, None, *args)
        result["grad_input" if transpose else "forward"] = y if transpose else y.plus_bias(b)
    if want_backward:
        gx, gw, _ = conv2d_backward_expected(gy, x, w, *args)
        result["forward" if transpose else "grad_input"] = gx.plus_bias(b) if transpose \
            else gx
        result["grad_weight"] = gw
    if "grad_bias" in ops:
        source = (x if transpose else gy).astype(np.float64)
        terms = max(1, source.size // max(1, source.shape[1]))
        result["grad_bias"] = Expected(source.sum(axis=(0, 2, 3)),
                                       np.abs(source).sum(axis=(0, 2, 3)), terms)
    return result
