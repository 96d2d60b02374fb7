"""The implementations we time: dilconv and its peers, behind one small interface.

Each implementation gives, for a case (layer + dtype + fixed random arrays) and an op, a
`call` to time and an optional untimed `before` hook run before every call; `outputs`
turns what `call` returned into numpy arrays for the correctness check.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

import dilconv
from dilconv import reference, testing, tolerance
from dilconv._dispatch import select

from . import im2col

# The scipy oracle multiplies every tap of the zero-inserted kernel, single-threaded, plus
# a Python loop per (image, out channel, in channel) pair. Measured rate of
# scipy.signal.correlate2d on a 2-core AVX2 server: 0.25-0.4 GMAC/s and ~11 us per call.
ORACLE_MACS_PER_S = 0.25e9
ORACLE_S_PER_PAIR = 20e-6
TORCH_PIN = "torch==2.13.0"


@dataclass
class Case:
    """One layer at one dtype: the same random inputs for every implementation."""

    layer: object
    dtype: str
    spec: object
    x: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    grad_output: np.ndarray
    _bounds: dict = field(default_factory=dict, repr=False)

    @classmethod
    def make(cls, layer, dtype: str) -> "Case":
        rng = np.random.default_rng(zlib.crc32(layer.name.encode()))
        spec = layer.spec()
        draw = lambda shape: rng.standard_normal(shape).astype(dtype)  # noqa: E731
        return cls(layer, dtype, spec, draw(layer.input), draw(layer.weight),
                   draw(layer.weight[0]), draw(spec.output_shape))

    @property
    def norm_args(self) -> tuple:
        """(stride, padding, dilation, groups) normalised as the oracle and im2col take them."""
        s = self.spec
        return s.stride, s.padding, s.dilation, s.groups

    def bounds(self, op: str) -> tuple:
        """Per-element error bounds of a peer's outputs against ours.

        Derived as in the tests (dilconv.tolerance) and doubled, since both sides round.
        The scale sum|a||b| is computed by dilconv in float64 on absolute values: fast on
        every layer, and checked against the oracle by the test suite.
        """
        if op not in self._bounds:
            f64 = lambda a: np.abs(a.astype(np.float64))  # noqa: E731
            args = self.layer.args()
            spec = self.spec
            if op == "forward":
                scale = dilconv.conv2d(f64(self.x), f64(self.weight), None, *args)
                scales = (scale + f64(self.bias)[None, :, None, None],)
            else:
                scales = dilconv.conv2d_backward(f64(self.grad_output), f64(self.x),
                                                 f64(self.weight), *args)
            terms = testing.terms(spec, backward=op != "forward", bias=True)
            self._bounds[op] = tuple(testing.Expected(None, a, k).bound(self.dtype, sides=2)
                                     for a, k in zip(scales, terms))
        return self._bounds[op]


def check(case: Case, op: str, got: tuple, ours: tuple) -> float:
    """Worst error of `got` against our outputs, in units of the derived bound (<= 1 ok)."""
    worst = 0.0
    for g, o, bound in zip(got, ours, case.bounds(op)):
        if g.shape != o.shape:
            return float("inf")
        worst = max(worst, tolerance.worst_ratio(g, o, bound))
    return worst


def _as_tuple(result) -> tuple:
    return tuple(result) if isinstance(result, tuple) else (result,)


class Impl:
    """Base: a numpy implementation with nothing to import."""

    name = ""
    title = ""
    timed = {"forward": "", "backward": ""}
    measures_memory = False

    def missing(self) -> Optional[str]:
        """Why this implementation cannot run at all here (None: it can)."""
        return None

    def skip(self, case: Case, op: str) -> Optional[str]:
        """Why this case is skipped (None: run it)."""
        return None

    def runner(self, case: Case, op: str, threads: int = 1) -> tuple:
        """(call, before) for `op` on `case`; `threads` is the count the run is at (most
        implementations follow the thread scope instead)."""
        raise NotImplementedError

    def outputs(self, result) -> tuple:
        return _as_tuple(result)

    def info(self, case: Case, op: str) -> dict:
        """Extra facts recorded with each measurement."""
        return {}

    def measured(self, case: Case, op: str, threads: int) -> dict:
        """Facts known once the measurement is done (a "warning" entry becomes a note)."""
        return {}

    def close(self) -> None:
        """Release what the implementation holds (child processes)."""


class Dilconv(Impl):
    name = "dilconv"
    title = "dilconv (ours)"
    timed = {"forward": "dilconv.conv2d(x, w, b, ...): validation, dispatch and kernel",
             "backward": "dilconv.conv2d_backward(grad_out, x, w, ...): grad input, weight "
                         "and bias, from scratch (no saved forward state)"}
    measures_memory = True

    def runner(self, case, op, threads=1):
        args = case.layer.args()
        if op == "forward":
            return (lambda: dilconv.conv2d(case.x, case.weight, case.bias, *args)), None
        return (lambda: dilconv.conv2d_backward(case.grad_output, case.x, case.weight,
                                                *args)), None

    def info(self, case, op):
        if op == "forward":
            return {"path": select(case.spec, "forward", case.weight)}
        # The input and the weight gradient may take different kernel families.
        paths = [select(case.spec, "grad_input", case.weight),
                 select(case.spec, "grad_weight", dtype=case.weight.dtype)]
        return {"path": paths[0] if paths[0] == paths[1] else "+".join(paths)}


class NumpyIm2col(Impl):
    name = "numpy"
    title = "numpy im2col+matmul (peer)"
    timed = {"forward": "bench.im2col.conv2d: pad, full im2col matrix, one matmul per group",
             "backward": "bench.im2col.conv2d_backward: im2col again, two matmuls, col2im"}
    measures_memory = True

    def runner(self, case, op, threads=1):
        args = case.norm_args
        if op == "forward":
            return (lambda: im2col.conv2d(case.x, case.weight, case.bias, *args)), None
        return (lambda: im2col.conv2d_backward(case.grad_output, case.x, case.weight,
                                               *args)), None


def oracle_seconds(spec, op: str) -> float:
    """Rough run time of the scipy oracle: it correlates with the zero-inserted kernel."""
    dkh = spec.dilation[0] * (spec.kh - 1) + 1
    dkw = spec.dilation[1] * (spec.kw - 1) + 1
    (pt, pb), (pl, pr) = spec.padding
    full = (spec.h + pt + pb - dkh + 1) * (spec.w + pl + pr - dkw + 1)
    pairs = spec.n * spec.o * (spec.c // spec.groups)
    seconds = pairs * ORACLE_S_PER_PAIR + pairs * full * dkh * dkw / ORACLE_MACS_PER_S
    return seconds if op == "forward" else 2 * seconds


class ScipyOracle(Impl):
    name = "scipy"
    title = "scipy correlate2d oracle (peer)"
    timed = {"forward": "dilconv.reference.conv2d_reference: float64 correlate2d per "
                        "(image, out, in) channel pair on the zero-inserted kernel",
             "backward": "dilconv.reference.conv2d_backward_reference: two correlate2d per "
                         "channel pair"}

    def __init__(self, limit_s: float = 1.0):
        self.limit_s = limit_s

    def skip(self, case, op):
        estimate = oracle_seconds(case.spec, op)
        if estimate > self.limit_s:
            return f"would take ~{estimate:.3g} s per call (limit {self.limit_s:g} s)"
        return None

    def runner(self, case, op, threads=1):
        args = case.norm_args
        if op == "forward":
            return (lambda: reference.conv2d_reference(case.x, case.weight, case.bias,
                                                       *args)), None
        return (lambda: reference.conv2d_backward_reference(case.grad_output, case.x,
                                                            case.weight, *args)), None


class Torch(Impl):
    name = "torch"
    title = "PyTorch F.conv2d (peer)"
    timed = {"forward": "torch.nn.functional.conv2d on tensors that do not require grad "
                        "(no autograd graph)",
             "backward": "y.backward(grad_out, retain_graph=True) of a forward computed "
                         "before timing; grads reset to None (untimed) before each call"}

    def __init__(self):
        self.torch = None

    def missing(self):
        try:
            import torch
        except ImportError:
            return f"PyTorch is not installed (pip install {TORCH_PIN})"
        self.torch = torch
        return None

    def runner(self, case, op, threads=1):
        torch = self.torch
        conv = torch.nn.functional.conv2d
        args = case.layer.args()
        x, w, b = (torch.from_numpy(a) for a in (case.x, case.weight, case.bias))
        if op == "forward":
            return (lambda: conv(x, w, b, *args)), None
        for t in (x, w, b):
            t.requires_grad_(True)
        y = conv(x, w, b, *args)
        gy = torch.from_numpy(case.grad_output)

        def before():
            x.grad = w.grad = b.grad = None

        def call():
            y.backward(gy, retain_graph=True)
            return x.grad, w.grad, b.grad
        return call, before

    def outputs(self, result):
        return tuple(t.detach().numpy() for t in _as_tuple(result))

