"""Derived error bounds for comparing kernels with the float64 oracle.

A sum of K products computed in floating point with unit roundoff u = eps/2 has an error of
at most ~K*u*sum|terms| (Higham, "Accuracy and Stability of Numerical Algorithms", 3.1).
The oracle adds an error of the same kind, so both together stay under K*eps*sum|terms|;
`c` leaves headroom. The bound is per element: a large element cannot hide a small one's
error.
"""
from __future__ import annotations

import numpy as np


def forward_terms(spec, has_bias: bool) -> int:
    """Terms summed into one forward output: in channels of the group x taps (+ bias)."""
    return (spec.c // spec.groups) * spec.kh * spec.kw + int(has_bias)


def grad_input_terms(spec) -> int:
    """Upper bound on terms summed into one input-gradient element."""
    return (spec.o // spec.groups) * spec.kh * spec.kw


def grad_weight_terms(spec) -> int:
    """Terms summed into one weight-gradient (and bias-gradient) element."""
    return max(1, spec.n * spec.ho * spec.wo)


def error_bound(abs_sum, terms: int, dtype, c: float = 2.0) -> np.ndarray:
    """Per-element bound c*K*eps*sum|a||b| (plus the smallest normal, for underflow)."""
    info = np.finfo(np.dtype(dtype))
    return c * terms * float(info.eps) * np.asarray(abs_sum, dtype=np.float64) + float(
        info.tiny)


def worst_ratio(actual, expected, bound) -> float:
    """max |actual - expected| / bound; <= 1 means within the bound (NaN counts as > 1)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise ValueError(f"shapes differ: {actual.shape} vs {expected.shape}")
    if actual.size == 0:
        return 0.0
    same_nonfinite = (~np.isfinite(expected)) & (
        (actual == expected) | (np.isnan(actual) & np.isnan(expected)))
    err = np.where(same_nonfinite, 0.0, np.abs(actual - expected))
    ratio = err / bound
    return float(np.inf) if np.isnan(ratio).any() else float(ratio.max())
