"""Expected results of a case and their per-element error bounds.

Values come from `dilconv.reference` (scipy correlate2d on zero-inserted kernels), computed in
float64. Non-zero padding modes are the zero-padding oracle on an input padded with
`numpy.pad` (reflect / edge / wrap) and padding 0; their input gradient is the padded input's
gradient folded back onto the pixels each padded pixel copies.

Each bound is `tolerance.error_bound(sum|a||b|, K, dtype)`: c*K*eps*sum|a||b| per element,
the float error of a K-term sum in the case's dtype.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import NamedTuple

import numpy as np

from dilconv import reference, tolerance

from . import cases


class Expected(NamedTuple):
    value: np.ndarray        # float64, batched
    abs_sum: np.ndarray      # sum |a||b| over the terms of each element
    terms: int               # K: terms summed into one element (upper bound)

    def bound(self, dtype) -> np.ndarray:
        return tolerance.error_bound(self.abs_sum, self.terms, dtype)


def _spec(case) -> SimpleNamespace:
    """The fields `dilconv.tolerance` reads, from the case's own geometry."""
    n, o, ho, wo = cases.shapes(case)["grad_output"]
    return SimpleNamespace(n=n, c=case["groups"] * case["cg"], o=o, groups=case["groups"],
                           kh=case["kh"], kw=case["kw"], ho=ho, wo=wo)


def fold(grad_padded, size, pads, mode):
    """Gradient of numpy.pad(x, pads, mode) w.r.t. x: add each padded pixel's gradient to
    the pixel it copies. Returns (gradient, most copies of one pixel)."""
    h, w = size
    index = np.pad(np.arange(h * w).reshape(h, w), pads, mode=cases.NUMPY_PAD_MODE[mode])
    lead = grad_padded.shape[:-2]
    rows = int(np.prod(lead))
    flat = grad_padded.reshape(rows, index.size)
    targets = (index.ravel()[None, :] + (np.arange(rows) * h * w)[:, None]).ravel()
    folded = np.bincount(targets, weights=flat.ravel(), minlength=rows * h * w)
    copies = int(np.bincount(index.ravel(), minlength=h * w).max())
    return folded.reshape(lead + (h, w)), copies


def expected(case, arrays, ops) -> dict:
    """{op: Expected} for the case's API, for the ops that need the oracle (`adjoint` needs
    forward and the gradients)."""
    f64 = {k: None if v is None else v.astype(np.float64) for k, v in arrays.items()}
    x, w, b, gy = f64["input"], f64["weight"], f64["bias"], f64["grad_output"]
    pads = cases.padding_amounts(case)
    mode = case["padding_mode"]
    if mode != "zeros":
        x = np.pad(x, ((0, 0), (0, 0)) + pads, mode=cases.NUMPY_PAD_MODE[mode])
        pads = ((0, 0), (0, 0))
    args = (cases.geom(case, "stride"), pads, cases.geom(case, "dilation"), case["groups"])
    spec = _spec(case)
    k_w = tolerance.grad_weight_terms(spec)
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
        y = reference.conv2d_reference(x, w, None, *args)
        abs_y = reference.conv2d_reference_abs(x, w, *args)
        if transpose:
            result["grad_input"] = Expected(y, abs_y, tolerance.forward_terms(spec, False))
        else:
            result["forward"] = _plus_bias(y, abs_y, b, tolerance.forward_terms(spec, False))
    if want_backward:
        gx, gw, _ = reference.conv2d_backward_reference(gy, x, w, *args)
        ax, aw, _ = reference.conv2d_backward_reference_abs(gy, x, w, *args)
        copies = 1
        if mode != "zeros":
            size = (case["h"], case["w"])
            pads = cases.padding_amounts(case)
            gx, copies = fold(gx, size, pads, mode)
            ax, _ = fold(ax, size, pads, mode)
        k_in = tolerance.grad_input_terms(spec) * copies
        if transpose:
            result["forward"] = _plus_bias(gx, ax, b, k_in)
        else:
            result["grad_input"] = Expected(gx, ax, k_in)
        result["grad_weight"] = Expected(gw, aw, k_w)
    if "grad_bias" in ops:
        source, terms = (x, max(1, x.size // max(1, x.shape[1]))) if transpose else (gy, k_w)
        result["grad_bias"] = Expected(source.sum(axis=(0, 2, 3)),
                                       np.abs(source).sum(axis=(0, 2, 3)), terms)
    return result


def _plus_bias(value, abs_sum, b, terms) -> Expected:
    """An output plus a per-channel bias, which is one more term of each sum."""
    if b is None:
        return Expected(value, abs_sum, terms)
    per_channel = b[None, :, None, None]
    return Expected(value + per_channel, abs_sum + np.abs(per_channel), terms + 1)


def compare(got, exp: Expected, dtype) -> dict:
    """Worst element of |got - expected| / bound: its ratio (> 1 fails), error, bound, index,
    values; and the largest error anywhere (max_err)."""
    bound = exp.bound(dtype)
    ratio = tolerance.worst_ratio(got, exp.value, bound)
    info = {"ratio": ratio, "max_err": 0.0, "bound": 0.0, "index": None}
    if got.size:
        err = np.abs(got.astype(np.float64) - exp.value)
        err = np.where(np.isnan(err), np.inf, err)
        where = np.unravel_index(int(np.argmax(err / bound)), err.shape)
        info.update(max_err=float(err.max()), err=float(err[where]),
                    bound=float(bound[where]), index=[int(i) for i in where],
                    got=float(got[where]), expected=float(exp.value[where]))
    return info
