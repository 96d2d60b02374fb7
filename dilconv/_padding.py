"""Padding modes other than zeros: pad in Python, fold the border gradient back.

The kernels know only zero padding (and skip its taps). For 'reflect', 'replicate' and
'circular' the input is padded here with numpy.pad and the kernels run with padding 0; in
backward the gradient of the padded input is folded back, each border pixel's gradient added
to the pixel it is a copy of (the adjoint of the padding).
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ._validate import ConvCall, make_spec

# PyTorch's mode names -> numpy.pad's (same results within PyTorch's padding limits).
NUMPY_MODES: dict[str, Any] = {"reflect": "reflect", "replicate": "edge",
                               "circular": "wrap"}


def source_index(size: int, lo: int, hi: int, mode: str) -> np.ndarray:
    """For each position of a padded axis, the index of the input pixel it copies."""
    return np.pad(np.arange(size), (lo, hi), mode=NUMPY_MODES[mode])


def pad(x: np.ndarray, pads: tuple, mode: str) -> np.ndarray:
    """Pad the last two axes of `x` by ((top, bottom), (left, right)) in `mode`."""
    widths = ((0, 0),) * (x.ndim - 2) + tuple(tuple(p) for p in pads)
    return np.ascontiguousarray(np.pad(x, widths, mode=NUMPY_MODES[mode]))


def _along(axis: int, index) -> tuple:
    key = [slice(None)] * 4
    key[axis] = index
    return tuple(key)


def fold(grad: np.ndarray, pads: tuple, mode: str) -> np.ndarray:
    """Gradient with respect to the unpadded input, from that of the padded (N, C, H, W)."""
    for axis, (lo, hi) in zip((2, 3), pads):
        if not lo and not hi:
            continue
        size = grad.shape[axis] - lo - hi
        src = source_index(size, lo, hi, mode)
        out = grad[_along(axis, slice(lo, lo + size))].copy()
        # Border lines one at a time, top/left first: a fixed order, so deterministic.
        for i in (*range(lo), *range(lo + size, lo + size + hi)):
            out[_along(axis, src[i])] += grad[_along(axis, i)]
        grad = out
    return grad


def materialise(call: ConvCall) -> tuple[ConvCall, Optional[tuple]]:
    """For a non-zero padding mode, the same call on the padded input with padding 0.

    Returns (call, pads): `pads` is what was applied (for `fold`), or None when nothing was.
    """
    (pt, pb), (pl, pr) = pads = call.spec.padding
    if call.padding_mode == "zeros" or not (pt or pb or pl or pr):
        return call, None
    x = pad(call.x, pads, call.padding_mode)
    spec = call.spec
    padded_spec = make_spec(x.shape, call.weight.shape, spec.stride, 0, spec.dilation,
                            spec.groups)
    return call._replace(x=x, spec=padded_spec), pads
