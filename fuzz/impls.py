"""The implementation table: what a campaign runs its cases on, by name.

- "dilconv": the real library;
- "torch": PyTorch (torch==2.13.0, when installed) behind dilconv's signatures, which checks
  the lab itself (generator, oracle, padding modes, bounds) against PyTorch; its errors are
  not dilconv's, so run it without the "invalid" op;
- every other name is a self-test mutant (see `mutants`).
"""
from __future__ import annotations

import warnings

import numpy as np

import dilconv

REAL = "dilconv"
TORCH = "torch"


def names() -> list:
    from .mutants import MUTANTS
    return [REAL, TORCH] + list(MUTANTS)


def get(name: str):
    if name == REAL:
        return dilconv
    if name == TORCH:
        return TorchImpl()
    from .mutants import MUTANTS
    try:
        return MUTANTS[name]
    except KeyError:
        raise ValueError(f"unknown implementation {name!r}; choose from {names()}") from None


class TorchImpl:
    """torch.nn.functional.conv2d (and F.pad for asymmetric padding and padding modes, as
    nn.Conv2d does), with gradients from autograd."""

    def __init__(self):
        import torch
        torch.set_num_threads(1)        # tiny cases; the workers are the parallelism
        # padding='same' with even kernels warns about a padded copy: true, and irrelevant.
        warnings.filterwarnings("ignore", message="Using padding='same'")
        self.torch, self.F = torch, torch.nn.functional

    def _tensor(self, a, grad=False):
        a = np.ascontiguousarray(a, dtype=np.asarray(a).dtype.newbyteorder("="))
        return self.torch.tensor(a, requires_grad=grad)

    def _forward(self, x, w, b, stride, padding, dilation, groups, mode):
        F = self.F
        if mode == "zeros" and (isinstance(padding, (str, int)) or isinstance(padding[0], int)):
            return F.conv2d(x, w, b, stride, padding, dilation, groups)
        (t, bt), (l, r) = _amounts(padding, w.shape[-2:], dilation)
        xp = F.pad(x, (l, r, t, bt), mode="constant" if mode == "zeros" else mode)
        return F.conv2d(xp, w, b, stride, 0, dilation, groups)

    def conv2d(self, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
               padding_mode="zeros", out=None):
        b = None if bias is None else self._tensor(bias)
        with self.torch.no_grad():
            y = self._forward(self._tensor(input), self._tensor(weight), b, stride, padding,
                              dilation, groups, padding_mode).numpy()
        if out is None:
            return y
        out[...] = y
        return out

    def conv2d_backward(self, grad_output, input, weight, stride=1, padding=0, dilation=1,
                        groups=1, *, padding_mode="zeros", needs=("input", "weight", "bias")):
        x, w = self._tensor(input, True), self._tensor(weight, True)
        b = self.torch.zeros(w.shape[0], dtype=w.dtype, requires_grad=True)
        y = self._forward(x, w, b, stride, padding, dilation, groups, padding_mode)
        grads = self.torch.autograd.grad(y, (x, w, b), self._tensor(grad_output),
                                         allow_unused=True)
        found = {name: g.numpy() for name, g in zip(("input", "weight", "bias"), grads)}
        return dilconv.Conv2dGrads(*(found[n] if n in needs else None
                                     for n in ("input", "weight", "bias")))


def _amounts(padding, kernel, dilation):
    """((top, bottom), (left, right)) of a padding argument, as nn.Conv2d reads it."""
    dilation = (dilation, dilation) if isinstance(dilation, int) else dilation
    if padding == "valid":
        return ((0, 0), (0, 0))
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return tuple((t // 2, t - t // 2) for t in totals)
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    if isinstance(padding[0], int):
        return ((padding[0], padding[0]), (padding[1], padding[1]))
    return tuple(tuple(p) for p in padding)
