"""PyTorch adapter: dilconv's kernels inside autograd (needs PyTorch; CPU tensors only).

``import dilconv`` never imports this module (nor PyTorch); ``import dilconv.torch`` does.

- :class:`DilatedConv2dFunction`: a ``torch.autograd.Function`` running dilconv.conv2d
  forward and dilconv.conv2d_backward backward.
- :func:`conv2d`: ``torch.nn.functional.conv2d``'s signature (plus ``padding_mode``).
- :class:`DilatedConv2d`: a drop-in ``torch.nn.Conv2d`` (same constructor, parameters,
  initialisation and state_dict) that computes with dilconv.

Examples
--------
>>> import torch, dilconv.torch
>>> layer = dilconv.torch.DilatedConv2d(3, 8, 3, padding=2, dilation=2)
>>> layer(torch.randn(1, 3, 16, 16)).shape
torch.Size([1, 8, 16, 16])
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from . import _api

__all__ = ["DilatedConv2dFunction", "DilatedConv2d", "conv2d"]

_DTYPES = (torch.float32, torch.float64)


def _to_numpy(name: str, tensor: Optional[torch.Tensor]) -> Optional[np.ndarray]:
    """A numpy view of a CPU float tensor (any strides; dilconv copies when it must)."""
    if tensor is None:
        return None
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise ValueError(f"{name} is on device {tensor.device}; dilconv runs on CPU tensors "
                         f"only (move it with .cpu())")
    if tensor.dtype not in _DTYPES:
        raise TypeError(f"{name} has dtype {tensor.dtype}; dilconv computes torch.float32 "
                        f"and torch.float64")
    return tensor.detach().resolve_neg().numpy()


def _to_tensor(array: Optional[np.ndarray]) -> Optional[torch.Tensor]:
    return None if array is None else torch.from_numpy(array)


class DilatedConv2dFunction(torch.autograd.Function):
    """conv2d forward and backward on dilconv's kernels.

    ``DilatedConv2dFunction.apply(input, weight, bias, stride, padding, dilation, groups,
    padding_mode)``; gradients flow to input, weight and bias.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, stride, padding, dilation, groups, padding_mode):
        ctx.args = (stride, padding, dilation, groups)
        ctx.padding_mode = padding_mode
        ctx.save_for_backward(input, weight)
        y = _api.conv2d(_to_numpy("input", input), _to_numpy("weight", weight),
                        _to_numpy("bias", bias), stride, padding, dilation, groups,
                        padding_mode=padding_mode)
        return torch.from_numpy(y)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        needs = [name for name, need in zip(("input", "weight", "bias"),
                                            ctx.needs_input_grad[:3]) if need]
        if not needs:
            return (None,) * 8
        grads = _api.conv2d_backward(
            _to_numpy("grad_output", grad_output), _to_numpy("input", input),
            _to_numpy("weight", weight), *ctx.args, padding_mode=ctx.padding_mode,
            needs=needs)
        return tuple(_to_tensor(g) for g in grads) + (None,) * 5


def conv2d(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           stride=1, padding=0, dilation=1, groups: int = 1,
           padding_mode: str = "zeros") -> torch.Tensor:
    """torch.nn.functional.conv2d computed by dilconv (differentiable, CPU tensors).

    Arguments as :func:`dilconv.conv2d`, in torch.nn.functional.conv2d's order.

    Examples
    --------
    >>> import torch, dilconv.torch
    >>> x = torch.randn(1, 2, 9, 9, dtype=torch.float64, requires_grad=True)
    >>> w = torch.randn(4, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    >>> y = dilconv.torch.conv2d(x, w, dilation=2)
    >>> torch.allclose(y, torch.nn.functional.conv2d(x, w, dilation=2))
    True
    >>> y.sum().backward(); x.grad.shape
    torch.Size([1, 2, 9, 9])
    """
    return DilatedConv2dFunction.apply(input, weight, bias, stride, padding, dilation, groups,
                                       padding_mode)


class DilatedConv2d(torch.nn.Conv2d):
    """``torch.nn.Conv2d`` (same constructor, parameters, init, state_dict) computed by
    dilconv on CPU.

    Examples
    --------
    >>> import torch, dilconv.torch
    >>> ref = torch.nn.Conv2d(3, 8, 3, padding=4, dilation=4, padding_mode="reflect")
    >>> ours = dilconv.torch.DilatedConv2d(3, 8, 3, padding=4, dilation=4,
    ...                                    padding_mode="reflect")
    >>> _ = ours.load_state_dict(ref.state_dict())
    >>> x = torch.randn(2, 3, 20, 20)
    >>> torch.allclose(ours(x), ref(x), atol=1e-5)
    True
    """

    def _conv_forward(self, input, weight, bias):
        return DilatedConv2dFunction.apply(input, weight, bias, self.stride, self.padding,
                                           self.dilation, self.groups, self.padding_mode)
