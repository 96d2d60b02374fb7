"""Choose the kernel family for a validated call (`select`) and run it.

Kernel families:
- "direct": loops over taps with per-tap in-bounds ranges (any geometry; the backward of
  layers with few channels);
- "flat": forward of unit-stride layers with few channels (narrow depthwise rows, one to
  three output channels, short rows; see PANEL_FORWARD_MIN_ROW): long
  vectorised loops over zero-padded bands of rows (finite weights only: padding taps are
  multiplied by zero there; and only where those bands do not outweigh the output);
  its backward is "direct";
- "panel": layers with many channels, and the forward of few channels in long rows of
  several output channels: output tiles aligned with the taps' in-bounds
  ranges, packed into panels, summed by a register-blocked micro-kernel; the input
  gradient is the same forward of grad_output with the transposed, turned kernel (at a
  stride, one per stride phase of the input, with the taps that reach it), and the
  weight gradient runs on the same micro-kernel; in v4 and v3 the forward of layers with
  long sums puts output channels in the vector lanes instead (the same bits);
- "gemm": per tile and tap, one BLAS matrix product (the forward of many channels into
  one to three, and its like as a float32 input gradient into two or three: see
  GEMM_FORWARD_MIN_PAIRS; the input gradient where padding goes past the dilated kernel,
  the weight gradient of 8 to 15 input channels per group; everything else when forced);
- "depthwise": layers with one input channel per group (depthwise, any channel
  multiplier): forward with each output summed in registers and stored once, one pass over
  input and output, chosen for unit column stride (a strided one runs, on scalars); input
  gradient at unit stride and multiplier 1 (the same forward with the turned kernel);
  weight gradient of more than one group at unit column stride (each tap's sum over its
  in-image rectangle in vector partial sums kept across images).
All are bitwise deterministic for any thread count. Each kernel module plans its own
tiles, scratch and tasks from the spec and the tuning (dilconv._tuning), and says where it
applies; `select` returns the family that really runs. `DILCONV_PATH=<one of PATHS>` in
the environment, or `tuning(path=...)`, forces a family (the fuzz lab and the tests use it
to reach every path); where the forced one does not apply, "direct" runs.
"""
from __future__ import annotations

import numpy as np

from . import _tiers
from ._openmp_helpers import environ_value
from ._tiers import _backward, _depthwise, _flat, _forward, _gemm, _panel
from ._geometry import ConvSpec, memoised
from ._tuning import PATHS, current

__all__ = ["PATHS", "select", "forward", "grad_input", "grad_weight", "grad_bias"]
OPS = ("forward", "grad_input", "grad_weight", "grad_bias")
# Depthwise forward: output rows at least this wide take the depthwise kernel (unit column
# stride); on narrower ones the flat kernel's long loops measured faster (float32: up to
# 1.4x at 16 columns; float64 breaks even there).
DEPTHWISE_MIN_WIDTH = 24
# At unit stride the input gradient is a panel forward from this many output channels
# (8: float32, one thread on an AVX-512 Xeon, 1.1x the direct loops' speed with 64 or 256
# input channels, 2.3x with 8 in 32 x 32 images, 3.2x with 32 groups of 8 -> 8 (their
# forward sums pairs of groups in vector lanes)).
PANEL_GRAD_INPUT_MIN_CHANNELS = 8
# Fewer output channels take it too where the forward rule would take the panels for the
# transposed layer (og -> cg channels; measured 2-4.9x the direct loops' speed: 4 -> 4,
# 8 -> 4, 16 -> 1 or 2, 64 -> 2 channels, 128 to 1024 columns). At a stride, from 16 input
# x output channels per group: 1.3-5.9x the direct loops' speed (1 -> 16, 3 -> 8, 4 -> 4,
# 8 -> 8, 3 -> 16, 16 -> 2); 8 groups of 1 -> 4 measured 1.3x slower.
PANEL_GRAD_INPUT_MIN_TERMS_STRIDED = 16
# Weight gradient with this many input channels per group (any number at a stride), fewer
# than the panels take, and GEMM_GRAD_WEIGHT_MIN_OUT_CHANNELS output channels: one BLAS
# product per tap (1.4-2.3x the direct loops' speed with 8 -> 8 or 8 -> 64; strided, 3 -> 8
# or 16 and 4 -> 4: 1.7-3.6x). With 1 or 2 output channels the direct loops are 1.5-3.3x
# faster.
GEMM_GRAD_WEIGHT_MIN_CHANNELS = 8
GEMM_GRAD_WEIGHT_MIN_OUT_CHANNELS = 4
# Forward with few channels (C/groups x O/groups < 32): the panels from this many output
# channels per group, where an output row of them has at least PANEL_FORWARD_MIN_ROW
# outputs (O/groups x Wo): packing the taps pays off over several output channels, and a
# tile's fixed costs over long rows. Otherwise the flat kernel, or the direct loops where
# flat does not apply (a stride): against those the panels pay off from shorter rows.
# Measured, float32, 1 and 2 threads, AVX-512 Xeon, 1 to 4 -> 4 to 16 channels: at unit
# stride and rows of 1024 or more, panels 1.2-5.8x flat's speed (4 -> 4 channels, 4096^2:
# 5.2x); strided, from rows of 256, 1.5-9x the direct loops'.
PANEL_FORWARD_MIN_OUT_CHANNELS = 4
PANEL_FORWARD_MIN_ROW = 1024
PANEL_FORWARD_MIN_ROW_STRIDED = 256
# Many pairs into fewer output channels than PANEL_FORWARD_MIN_OUT_CHANNELS, at unit
# stride (segmentation heads; the input gradient of RGB stems): one BLAS product per tap,
# where the panels' blocks of MR output channels are mostly empty. Measured, float32, 1 and
# 2 threads, AVX-512 EPYC: forward of 16 to 512 -> 2 or 3 channels 1.1-1.9x the panels'
# speed (256 -> 1 at 33 x 33: 1.2x at one thread, 0.89x at two); input gradient of
# 2 or 3 -> 16 to 64 channels 1.3-1.9x. Only on CPUs with AVX-512, where OpenBLAS runs its
# AVX-512 kernels: on an AVX2 Zen 3 its Haswell kernel spends its time packing the large
# operand (used by only 1-3 rows), and the flat kernel took such forwards at 2.4-5x BLAS's
# speed, the panels the input gradients at 1.8-3.4x (float32 and float64, 1 and 2 threads).
# A choice by the CPU, not by the tier: every tier of one CPU runs the same family.
GEMM_FORWARD_MIN_PAIRS = 32
GEMM_FEW_OUTPUT_CHANNELS = _tiers.FEATURES.get("avx512f", False)


def select(spec, op: str = "forward", weight=None, tuning=None, dtype=None) -> str:
    """The kernel family that runs `op` ("forward", "grad_input", "grad_weight" or
    "grad_bias") on this geometry, with the weights `weight` (None: taken as finite),
    `tuning` (None: the one in force) and operands of `dtype` (None: the weight's, else
    float64)."""
    tuning = current() if tuning is None else tuning
    dtype = np.dtype(dtype if dtype is not None else
                     weight.dtype if weight is not None else np.float64)
    return _with_weights(geometry_path(spec, op, tuning, forced_path(), dtype.itemsize),
                         spec, weight, tuning)


def forced_path():
    """The family DILCONV_PATH forces, or None."""
    return environ_value(b"DILCONV_PATH") or None


def geometry_path(spec, op: str, tuning, forced, itemsize: int) -> str:
    """select's choice before the weights are seen (`forced`: forced_path(); `itemsize`:
    the operands' dtype's), remembered on the spec."""
    return memoised(spec, ("select", op, forced, itemsize), tuning, _geometry_choice, spec,
                    op, tuning, forced, itemsize)


def _with_weights(path: str, spec, weight, tuning) -> str:
    # The weights change from call to call: flat's check of them is not remembered (its
    # check of the geometry is: geometry_path chose "flat" only where that applies).
    if path == "flat" and weight is not None and not _flat.finite(weight):
        return "direct"
    return path


def _geometry_choice(spec, op: str, tuning, forced, itemsize: int) -> str:
    """select's choice before the weights are seen."""
    path = _preferred(spec, op, tuning, forced, itemsize)
    if op == "forward":
        if path == "depthwise" and not _depthwise.applies(spec):
            return "direct"
        if path == "flat" and not _flat.applies(spec, None, tuning):
            return "direct"
    elif op == "grad_input":
        if path == "panel" and (transposed_spec(spec) is not None
                                or spec.stride != (1, 1)):
            return "panel"
        if path == "depthwise":
            return "depthwise" if _depthwise_grad_input(spec) else "direct"
        # Padding past the dilated kernel at unit stride takes the BLAS kernel.
        path = "gemm" if path in ("gemm", "panel") else "direct"
    elif op == "grad_weight":
        if path == "depthwise":
            return "depthwise" if _depthwise.grad_weight_applies(spec) else "direct"
        path = path if path in ("gemm", "panel") else "direct"
    else:
        return "direct"
    return "direct" if path == "gemm" and not _gemm.applies(spec, tuning) else path


def _preferred(spec, op: str, tuning, forced, itemsize: int) -> str:
    """The family forced (by the tuning, else `forced`: DILCONV_PATH), or the best one for
    this geometry if it applies."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    forced = tuning.path or forced
    if forced is not None:
        if forced not in PATHS:
            raise ValueError(f"DILCONV_PATH must be one of {PATHS}, got {forced!r}")
        return forced
    cg, og = spec.c // spec.groups, spec.o // spec.groups
    if op == "forward":
        if cg == 1 and spec.stride[1] == 1 and spec.wo >= DEPTHWISE_MIN_WIDTH:
            return "depthwise"
        if _panel_forward(cg, og, spec.wo, spec.stride):
            return "panel"
        return "gemm" if _gemm_forward(cg, og, spec.stride) else "flat"
    if op == "grad_input" and _panel_grad_input(spec, cg, og, itemsize):
        return "panel"
    if op == "grad_input" and _gemm_grad_input(spec, cg, og, itemsize):
        return "gemm"                  # select falls back to direct where it does not apply
    # One input channel in all (not a depthwise layer): direct loops, 2x the depthwise
    # weight gradient's speed with 1 -> 8 channels.
    if cg == 1 and op in ("grad_input", "grad_weight") and spec.groups > 1:
        return "depthwise"             # select falls back to direct where it does not apply
    # Gradient blocks run over input channels: with only a few, direct loops win.
    if cg >= 16 and og >= 8:
        return "panel"
    if op == "grad_weight" and og >= GEMM_GRAD_WEIGHT_MIN_OUT_CHANNELS and (
            cg >= GEMM_GRAD_WEIGHT_MIN_CHANNELS or spec.stride != (1, 1)):
        return "gemm"                  # select falls back to direct where it does not apply
    return "direct"


def _panel_forward(in_channels, out_channels, out_width, stride) -> bool:
    """The panels for a forward with these channels per group: many (32 or more pairs),
    or few in long output rows of several output channels (see PANEL_FORWARD_MIN_ROW)."""
    if in_channels * out_channels >= 32:
        return not _gemm_forward(in_channels, out_channels, stride)
    row = PANEL_FORWARD_MIN_ROW if stride == (1, 1) else PANEL_FORWARD_MIN_ROW_STRIDED
    return out_channels >= PANEL_FORWARD_MIN_OUT_CHANNELS and out_channels * out_width >= row


def _gemm_forward(in_channels, out_channels, stride) -> bool:
    """BLAS for a forward with these channels per group (see GEMM_FORWARD_MIN_PAIRS)."""
    return (GEMM_FEW_OUTPUT_CHANNELS and stride == (1, 1)
            and out_channels < PANEL_FORWARD_MIN_OUT_CHANNELS
            and in_channels * out_channels >= GEMM_FORWARD_MIN_PAIRS)


def _panel_grad_input(spec, cg, og, itemsize: int) -> bool:
    """The input gradient as a panel forward of grad_output (og -> cg channels, rows as
    wide as the input), where the forward rule would take the panels for it or it has
    PANEL_GRAD_INPUT_MIN_CHANNELS output channels, unless _gemm_grad_input takes BLAS; at
    a stride (one such forward per stride phase), from PANEL_GRAD_INPUT_MIN_TERMS_STRIDED
    channels in and out."""
    if spec.stride != (1, 1):
        return cg * og >= PANEL_GRAD_INPUT_MIN_TERMS_STRIDED
    # Into one input channel, the direct loops: 1.7-2.8x faster with 1 -> 8 or 16.
    if cg == 1:
        return False
    if _gemm_forward(og, cg, spec.stride):
        return not _gemm_grad_input(spec, cg, og, itemsize)
    return og >= PANEL_GRAD_INPUT_MIN_CHANNELS or _panel_forward(og, cg, spec.w, spec.stride)


def _gemm_grad_input(spec, cg, og, itemsize: int) -> bool:
    """BLAS for the input gradient into two or three input channels (the transposed
    forward, og -> cg, that the forward rule gives to BLAS, on CPUs with AVX-512 only:
    see GEMM_FORWARD_MIN_PAIRS), in float32 only: in float64
    the panels were 1.2-2.9x BLAS's speed (AVX-512 Xeon, 1 and 2 threads, 2 or 3 -> 16 to
    64 channels); in float32 BLAS 1.2-1.5x theirs with 16 output channels, 0.87-1.05x
    with 32 or 64."""
    return itemsize == 4 and cg > 1 and _gemm_forward(og, cg, spec.stride)


def _depthwise_grad_input(spec) -> bool:
    """The input gradient is a depthwise forward: multiplier 1, a transposed spec."""
    return (spec.c == spec.groups == spec.o and transposed_spec(spec) is not None)


def transposed_spec(spec):
    """For a unit-stride spec, the spec whose forward maps grad_output to grad_input
    (with the weights of transposed_weight), or None where its padding would be negative
    (padding beyond the dilated kernel)."""
    if spec.stride != (1, 1):
        return None
    (pt, pb), (pl, pr) = spec.padding
    reach_h, reach_w = (spec.kh - 1) * spec.dilation[0], (spec.kw - 1) * spec.dilation[1]
    pads = ((reach_h - pt, reach_h - pb), (reach_w - pl, reach_w - pr))
    if min(pads[0] + pads[1]) < 0:
        return None
    return ConvSpec(spec.n, spec.o, spec.ho, spec.wo, spec.c, spec.kh, spec.kw, (1, 1),
                    spec.dilation, pads, spec.groups)


def _axis_phases(size, out_size, k, s, d, pad):
    """Along one axis of a strided spec: per phase r (inputs r, r+s, ...) the taps that
    reach it (ascending), and, for the stride-1 correlation of grad_output with those taps
    turned that gives the phase's input gradient, (crop_lo, crop_hi) of grad_output,
    its padding (lo, hi) and dilation; None for a phase no tap reaches."""
    phases = []
    for r in range(s):
        n = -(-(size - r) // s)
        taps = [t for t in range(k) if (t * d - pad - r) % s == 0]
        if n <= 0 or not taps:
            phases.append(None)
            continue
        # Input r + s*i gets grad_output[i + (r + pad - t*d) / s] * w[t]: the taps turned
        # are offsets rising by d / gcd(s, d) from the last tap's.
        low = (r + pad - taps[-1] * d) // s
        dil = (taps[-1] - taps[-2]) * d // s if len(taps) > 1 else 1
        pad_lo, pad_hi = -low, n - out_size + low + (len(taps) - 1) * dil
        crop = (max(0, -pad_lo), max(0, -pad_hi))
        if out_size - crop[0] - crop[1] < 1:
            phases.append(None)        # every tap of the phase reads padding: zeros
            continue
        phases.append((taps, crop, (max(0, pad_lo), max(0, pad_hi)), dil))
    return phases


def stride_phases(spec):
    """For a strided spec, its input gradient as one stride-1 forward per stride phase
    (rows r_h, r_h + s_h, ...; columns likewise): a list of ((r_h, r_w), None) for phases
    no tap reaches (zero gradient) or ((r_h, r_w), (spec, kh_taps, kw_taps, rows, cols)),
    the forward's spec over grad_output[:, :, rows, cols] with the weights
    transposed_weight(weight[:, :, kh_taps][:, :, :, kw_taps], groups)."""
    (pt, pb), (pl, pr) = spec.padding
    rows = _axis_phases(spec.h, spec.ho, spec.kh, spec.stride[0], spec.dilation[0], pt)
    cols = _axis_phases(spec.w, spec.wo, spec.kw, spec.stride[1], spec.dilation[1], pl)
    out = []
    for rh, ph in enumerate(rows):
        for rw, pw in enumerate(cols):
            if ph is None or pw is None:
                out.append(((rh, rw), None))
                continue
            (kh_taps, ch, pad_h, dh), (kw_taps, cw, pad_w, dw) = ph, pw
            sub = ConvSpec(spec.n, spec.o, spec.ho - ch[0] - ch[1], spec.wo - cw[0] - cw[1],
                           spec.c, len(kh_taps), len(kw_taps), (1, 1), (dh, dw),
                           (pad_h, pad_w), spec.groups)
            out.append(((rh, rw), (sub, kh_taps, kw_taps, slice(ch[0], spec.ho - ch[1]),
                                   slice(cw[0], spec.wo - cw[1]))))
    return out


def transposed_weight(weight, groups):
    """(O, C/g, kH, kW) -> (C, O/g, kH, kW): per group, in and out channels swapped and
    the kernel turned by 180 degrees."""
    o, cg, kh, kw = weight.shape
    w = weight.reshape(groups, o // groups, cg, kh, kw)[:, :, :, ::-1, ::-1]
    return w.transpose(0, 2, 1, 3, 4).reshape(groups * cg, o // groups, kh, kw)


def forward(x, weight, bias, out, spec, tuning=None, path=None) -> None:
    """out[...] = conv2d(x, weight) + bias for a batched spec with N > 0 (`tuning`: the one
    in force, if already read; `path`: geometry_path's choice for it, if known)."""
    tuning = current() if tuning is None else tuning
    if path is None:                  # the flat kernel checks the weights itself
        path = geometry_path(spec, "forward", tuning, forced_path(), weight.dtype.itemsize)
    if path != "panel" and not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)   # only the panels read channel planes lying apart
    kernels = _tiers.of(tuning)       # once: a layer of tiny calls spends its time here
    if path == "panel":
        kernels._panel.forward(x, weight, bias, out, spec, tuning)
    elif path == "depthwise":
        kernels._depthwise.forward(x, weight, bias, out, spec, tuning)
    elif path == "gemm":
        kernels._gemm.forward(x, weight, bias, out, spec, tuning)
    elif path != "flat" or not kernels._flat.forward(x, weight, bias, out, spec, tuning):
        kernels._forward.forward(x, weight, bias, out, spec, tuning)


def grad_input(grad_output, weight, grad_x, spec, tuning=None, path=None) -> None:
    """grad_x[...] = the input gradient (`tuning`, `path`: as for `forward`)."""
    tuning = current() if tuning is None else tuning
    path = (select(spec, "grad_input", weight, tuning) if path is None
            else _with_weights(path, spec, weight, tuning))
    kernels = _tiers.of(tuning)       # once (see forward)
    if path == "panel" and spec.stride == (1, 1):
        # Unit stride: grad_input is the forward convolution of grad_output with the
        # transposed, turned kernel, on the panel kernel.
        kernels._panel.forward(grad_output, transposed_weight(weight, spec.groups),
                               np.empty(0, grad_x.dtype), grad_x, transposed_spec(spec),
                               tuning)
    elif path == "panel":
        # Strided: each stride phase of the input is such a forward, with the taps that
        # reach it, into a buffer of the phase's size (the input's over the stride's).
        no_bias = np.empty(0, grad_x.dtype)
        phases = stride_phases(spec)
        if any(phase is None for _, phase in phases):
            grad_x.fill(0)             # inputs no tap reads (in one pass, not strided)
        for (rh, rw), phase in phases:
            if phase is None:
                continue
            target = grad_x[:, :, rh::spec.stride[0], rw::spec.stride[1]]
            sub, kh_taps, kw_taps, rows, cols = phase
            w_sub = weight[:, :, kh_taps][:, :, :, kw_taps]
            buf = np.empty(sub.output_shape, grad_x.dtype)
            kernels._panel.forward(np.ascontiguousarray(grad_output[:, :, rows, cols]),
                                   transposed_weight(w_sub, spec.groups), no_bias, buf, sub,
                                   tuning)
            kernels._panel.copy_into(buf, target, spec, tuning)
    elif path == "depthwise":
        # Multiplier 1: the same forward with the turned kernel (a copy: it reads rows).
        turned = np.ascontiguousarray(transposed_weight(weight, spec.groups))
        kernels._depthwise.forward(grad_output, turned, np.empty(0, grad_x.dtype), grad_x,
                                   transposed_spec(spec), tuning)
    elif path == "gemm":
        kernels._gemm.grad_input(grad_output, weight, grad_x, spec, tuning)
    else:
        kernels._backward.grad_input(grad_output, weight, grad_x, spec, tuning)


def grad_weight(grad_output, x, grad_w, spec, tuning=None, path=None) -> None:
    """grad_w[...] = the weight gradient (`tuning`, `path`: as for `forward`)."""
    tuning = current() if tuning is None else tuning
    path = (select(spec, "grad_weight", None, tuning, grad_w.dtype) if path is None
            else path)
    kernels = _tiers.of(tuning)
    if path == "panel":
        kernels._panel.grad_weight(grad_output, x, grad_w, spec, tuning)
    elif path == "depthwise":
        kernels._depthwise.grad_weight(grad_output, x, grad_w, spec, tuning)
    elif path == "gemm":
        kernels._gemm.grad_weight(grad_output, x, grad_w, spec, tuning)
    else:
        kernels._backward.grad_weight(grad_output, x, grad_w, spec, tuning)


def grad_bias(grad_output, grad_b, spec, tuning=None) -> None:
    tuning = current() if tuning is None else tuning
    _tiers.of(tuning)._backward.grad_bias(grad_output, grad_b, spec, tuning)
