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
ALL_GRADS = ("input", "weight", "bias")


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


def _conv_methods(kernel):
    """dilconv-style conv and conv_backward methods running TorchImpl.<kernel>."""
    def conv(self, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
             padding_mode="zeros", out=None):
        return self._forward(getattr(self, kernel), input, weight, bias, out, stride, padding,
                             dilation, groups, padding_mode)

    def conv_backward(self, grad_output, input, weight, stride=1, padding=0, dilation=1,
                      groups=1, *, padding_mode="zeros", needs=ALL_GRADS):
        return self._backward(getattr(self, kernel), np.shape(weight)[0], grad_output, input,
                              weight, needs, stride, padding, dilation, groups, padding_mode)
    return conv, conv_backward


class TorchImpl:
    """torch.nn.functional's conv2d, conv1d and conv_transpose2d (with F.pad for asymmetric
    padding and padding modes, as the nn layers do), gradients from autograd."""

    def __init__(self):
        import torch
        torch.set_num_threads(1)        # tiny cases; the workers are the parallelism
        # padding='same' with even kernels warns about a padded copy: true, and irrelevant.
        warnings.filterwarnings("ignore", message="Using padding='same'")
        self.torch, self.F = torch, torch.nn.functional

    def _tensor(self, a, grad=False):
        a = np.ascontiguousarray(a, dtype=np.asarray(a).dtype.newbyteorder("="))
        return self.torch.tensor(a, requires_grad=grad)

    def _conv2d(self, x, w, b, stride, padding, dilation, groups, mode):
        F = self.F
        if mode == "zeros" and (isinstance(padding, (str, int)) or isinstance(padding[0], int)):
            return F.conv2d(x, w, b, stride, padding, dilation, groups)
        (t, bt), (l, r) = _amounts(padding, w.shape[-2:], dilation)
        xp = F.pad(x, (l, r, t, bt), mode="constant" if mode == "zeros" else mode)
        return F.conv2d(xp, w, b, stride, 0, dilation, groups)

    def _conv1d(self, x, w, b, stride, padding, dilation, groups, mode):
        F = self.F
        symmetric = isinstance(padding, (str, int)) or len(padding) == 1
        if mode == "zeros" and symmetric:
            return F.conv1d(x, w, b, stride, padding, dilation, groups)
        if isinstance(padding, str):
            d = dilation if isinstance(dilation, int) else dilation[0]
            _, (lo, hi) = _amounts(padding, (1, w.shape[-1]), (1, d))
        else:
            lo, hi = (padding, padding) if isinstance(padding, int) else (padding[0],
                                                                          padding[-1])
        xp = F.pad(x, (lo, hi), mode="constant" if mode == "zeros" else mode)
        return F.conv1d(xp, w, b, stride, 0, dilation, groups)

    def _transpose(self, x, w, b, stride, padding, output_padding, groups, dilation):
        F = self.F
        if isinstance(padding, int) or isinstance(padding[0], int):
            return F.conv_transpose2d(x, w, b, stride, padding, output_padding, groups,
                                      dilation)
        # Asymmetric: the full output (no padding), cropped by the pads; output_padding
        # rows/columns beyond it only get the bias.
        full = F.conv_transpose2d(x, w, None, stride, 0, 0, groups, dilation)
        (t, bt), (l, r) = padding
        op = (output_padding,) * 2 if isinstance(output_padding, int) else output_padding
        ho, wo = (full.shape[-2] - t - bt + op[0], full.shape[-1] - l - r + op[1])
        full = F.pad(full, (0, max(0, l + wo - full.shape[-1]), 0,
                            max(0, t + ho - full.shape[-2])))
        y = full[..., t:t + ho, l:l + wo]
        return y if b is None else y + b[:, None, None]

    def _forward(self, fn, input, weight, bias, out, *args):
        b = None if bias is None else self._tensor(bias)
        with self.torch.no_grad():
            y = fn(self._tensor(input), self._tensor(weight), b, *args).numpy()
        if out is None:
            return y
        out[...] = y
        return out

    def _backward(self, fn, n_bias, grad_output, input, weight, needs, *args):
        x, w = self._tensor(input, True), self._tensor(weight, True)
        b = self.torch.zeros(n_bias, dtype=w.dtype, requires_grad=True)
        y = fn(x, w, b, *args)
        grads = self.torch.autograd.grad(y, (x, w, b), self._tensor(grad_output),
                                         allow_unused=True)
        found = dict(zip(("input", "weight", "bias"), (g.numpy() for g in grads)))
        return dilconv.Conv2dGrads(*(found[n] if n in needs else None
                                     for n in ("input", "weight", "bias")))

    conv2d, conv2d_backward = _conv_methods("_conv2d")
    conv1d, conv1d_backward = _conv_methods("_conv1d")

    def conv_transpose2d(self, input, weight, bias=None, stride=1, padding=0,
                         output_padding=0, groups=1, dilation=1):
        return self._forward(self._transpose, input, weight, bias, None, stride, padding,
                             output_padding, groups, dilation)

    def conv_transpose2d_backward(self, grad_output, input, weight, stride=1, padding=0,
                                  output_padding=0, groups=1, dilation=1, *, needs=ALL_GRADS):
        return self._backward(self._transpose, np.shape(weight)[1] * groups, grad_output,
                              input, weight, needs, stride, padding, output_padding, groups,
                              dilation)


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
