"""Deliberately wrong implementations for the self-test: each one must be caught.

A mutant wraps the real API (changing an argument or the result) or replaces the forward pass
with a small numpy tap loop that carries the bug. Mutants validate with dilconv's own checks,
so they differ from dilconv only by their bug. The Cython kernels are never touched.
"""
from __future__ import annotations

import ctypes

import numpy as np

import dilconv
from dilconv import _dispatch, _threads, _tiers, _validate, testing

from .cases import FMA_ISAS, ISAS


ALL_GRADS = ("input", "weight", "bias")


class Mutant:
    """dilconv with one bug. Override `forward` (batched, validated call -> batched output),
    or conv2d / conv2d_backward themselves."""

    description = ""
    expect_kind = None          # the failure kind that counts as a kill (None: any)
    # Why this CPU cannot show the bug (the self-test then skips it), or None.
    unavailable = None

    def conv2d(self, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
               padding_mode="zeros", out=None):
        call, _ = _validate.conv_call(input, weight, bias, stride, padding, dilation, groups,
                                      padding_mode)
        y = self.forward(call, padding_mode)
        y = y if call.batched else y[0]
        if out is None:
            return y
        _validate.check_out(out, y.shape, call.dtype, (("input", input), ("weight", weight)))
        out[...] = y
        return out

    def conv2d_backward(self, grad_output, input, weight, stride=1, padding=0, dilation=1,
                        groups=1, *, padding_mode="zeros", needs=ALL_GRADS):
        return dilconv.conv2d_backward(grad_output, input, weight, stride, padding, dilation,
                                       groups, padding_mode=padding_mode, needs=needs)

    def forward(self, call, mode):
        return real_forward(call, mode)

    def __getattr__(self, name):
        # conv1d, conv_transpose2d, ...: the real ones (the bugs live in conv2d's calls).
        return getattr(dilconv, name)


def real_forward(call, mode, weight=None, bias="same", x=None, padding=None):
    """dilconv's forward of a validated call, with some parts swapped."""
    spec = call.spec
    return dilconv.conv2d(call.x if x is None else x,
                          call.weight if weight is None else weight,
                          call.bias if isinstance(bias, str) else bias,
                          spec.stride, spec.padding if padding is None else padding,
                          spec.dilation, spec.groups, padding_mode=mode)


def taps_forward(call, mode, tap_step=None, out_step=None, group_of=None):
    """A numpy tap loop (the mutants' own forward), with optional bugs: taps `tap_step`
    apart, outputs `out_step` apart, output channel o reading input group group_of(o)."""
    spec = call.spec
    xp = testing.pad(call.x.astype(np.float64), spec.padding, mode)
    sh, sw = out_step or spec.stride
    dh, dw = tap_step or spec.dilation
    og, cg = spec.o // spec.groups, spec.c // spec.groups
    groups_of = np.array([(group_of or (lambda o: o // og))(o) for o in range(spec.o)])
    y = np.zeros(spec.output_shape)
    for p in range(spec.kh):
        for q in range(spec.kw):
            patch = xp[:, :, p * dh:p * dh + (spec.ho - 1) * sh + 1:sh,
                       q * dw:q * dw + (spec.wo - 1) * sw + 1:sw]
            patch = patch.reshape(spec.n, spec.groups, cg, spec.ho, spec.wo)[:, groups_of]
            y += np.einsum("nochw,oc->nohw", patch, call.weight[:, :, p, q])
    if call.bias is not None:
        y += call.bias[None, :, None, None]
    return y.astype(call.dtype)


class DilationOffByOne(Mutant):
    description = "taps spaced dilation-1 apart (forward)"

    def forward(self, call, mode):
        return taps_forward(call, mode, tap_step=tuple(d - (d > 1) for d in call.spec.dilation))


class StrideIgnored(Mutant):
    description = "outputs read at stride 1 (forward)"

    def forward(self, call, mode):
        return taps_forward(call, mode, out_step=(1, 1))


class GroupsMappedWrongly(Mutant):
    description = "output channel o reads input group o % groups (forward)"

    def forward(self, call, mode):
        return taps_forward(call, mode, group_of=lambda o: o % call.spec.groups)


class PaddingWrongSide(Mutant):
    description = "top/bottom and left/right padding swapped (forward and backward)"

    def forward(self, call, mode):
        (t, b), (l, r) = call.spec.padding
        return real_forward(call, mode, padding=((b, t), (r, l)))

    def conv2d_backward(self, grad_output, input, weight, stride=1, padding=0, dilation=1,
                        groups=1, *, padding_mode="zeros", needs=ALL_GRADS):
        spec = _validate.make_spec(np.shape(input), np.shape(weight), stride, padding,
                                   dilation, groups)
        (t, b), (l, r) = spec.padding
        return super().conv2d_backward(grad_output, input, weight, stride, ((b, t), (r, l)),
                                       dilation, groups, padding_mode=padding_mode,
                                       needs=needs)


class KernelFlipped(Mutant):
    description = "true convolution (kernel rotated 180 degrees) instead of correlation"

    def forward(self, call, mode):
        return real_forward(call, mode, weight=call.weight[:, :, ::-1, ::-1])


class BiasDropped(Mutant):
    description = "bias ignored (forward)"

    def forward(self, call, mode):
        return real_forward(call, mode, bias=None)


class BiasDoubled(Mutant):
    description = "bias added twice (forward)"

    def forward(self, call, mode):
        y = real_forward(call, mode)
        return y if call.bias is None else y + call.bias[None, :, None, None]


class Float32PartialTaps(Mutant):
    description = "float32 only: the last kernel tap never accumulated"

    def forward(self, call, mode):
        if call.dtype != np.float32:
            return real_forward(call, mode)
        w = call.weight.copy()
        w[:, :, -1, -1] = 0
        return real_forward(call, mode, weight=w)


class Float64InFloat32(Mutant):
    description = "float64 computed in float32 (forward)"

    def forward(self, call, mode):
        if call.dtype != np.float64:
            return real_forward(call, mode)
        f32 = call._replace(x=call.x.astype(np.float32), weight=call.weight.astype(np.float32),
                            bias=None if call.bias is None else call.bias.astype(np.float32))
        return real_forward(f32, mode).astype(np.float64)


class PaddingFilledWithOnes(Mutant):
    description = "zero padding filled with ones (forward)"

    def forward(self, call, mode):
        if mode != "zeros":
            return real_forward(call, mode)
        xp = np.pad(call.x, ((0, 0), (0, 0)) + call.spec.padding, constant_values=1)
        return real_forward(call, mode, x=xp, padding=0)


class BigEndianMisread(Mutant):
    description = "non-native byte order read as native (forward)"

    def conv2d(self, input, weight, *args, **kwargs):
        if isinstance(input, np.ndarray) and not input.dtype.isnative:
            input = input.view(input.dtype.newbyteorder("="))
        return super().conv2d(input, weight, *args, **kwargs)


class FortranMisread(Mutant):
    description = "Fortran-ordered input read in memory order as if C-ordered (forward)"

    def conv2d(self, input, weight, *args, **kwargs):
        if (isinstance(input, np.ndarray) and input.ndim > 1 and input.flags.f_contiguous
                and not input.flags.c_contiguous):
            input = input.ravel(order="K").reshape(input.shape)
        return super().conv2d(input, weight, *args, **kwargs)


class UnbatchedKeepsBatchAxis(Mutant):
    description = "unbatched (C, H, W) input returns a 4-D output"

    def forward(self, call, mode):
        y = real_forward(call, mode)
        return y if call.batched else y[None]


class OutIgnored(Mutant):
    description = "conv2d(out=...) returns a new array and leaves `out` alone"

    def conv2d(self, *args, out=None, **kwargs):
        return super().conv2d(*args, **kwargs)


class ThreadDependent(Mutant):
    description = "result changes by one ulp with 2 threads (only determinism can see it)"

    def forward(self, call, mode):
        y = real_forward(call, mode)
        if _threads._requested == 2 and y.size:
            y.flat[0] = np.nextafter(y.flat[0], np.inf)
        return y


class DirectDropsLastColumn(Mutant):
    description = "direct path only: last output column left at zero (forward)"

    def forward(self, call, mode):
        y = real_forward(call, mode)
        if _dispatch.select(call.spec, "forward", call.weight) == "direct" and y.shape[-1] > 1:
            y[..., -1] = 0
        return y


class FlatDropsFirstRow(Mutant):
    description = "flat path only: first output row left at zero (forward)"

    def forward(self, call, mode):
        y = real_forward(call, mode)
        if _dispatch.select(call.spec, "forward", call.weight) == "flat":
            y[..., 0, :] = 0
        return y


class DepthwiseDropsSecondRows(Mutant):
    description = "depthwise path only: last output column of odd rows left at zero (forward)"

    def forward(self, call, mode):
        y = real_forward(call, mode)
        spec = call.spec
        if _dispatch.select(spec, "forward", call.weight) == "depthwise":
            y[..., 1::2, -1] = 0
        return y


class GemmIgnoresBias(Mutant):
    description = "gemm path only: bias ignored (forward)"

    def forward(self, call, mode):
        if _dispatch.select(call.spec, "forward", call.weight) == "gemm":
            return real_forward(call, mode, bias=None)
        return real_forward(call, mode)


class PanelSkipsLastTap(Mutant):
    description = "panel path only: the last kernel tap left out (forward)"

    def forward(self, call, mode):
        if (_dispatch.select(call.spec, "forward", call.weight) == "panel"
                and call.weight.shape[-1] > 1):
            weight = call.weight.copy()
            weight[..., -1, -1] = 0
            return real_forward(call, mode, weight=weight)
        return real_forward(call, mode)


# The tier mutants need two FMA tiers (on x86-64 with AVX2: v3 and v4_on_v3).
_NO_TWO_FMA_TIERS = None if len(FMA_ISAS) > 1 else (
    f"this CPU runs fewer than two FMA tiers ({', '.join(ISAS)})")


class TierOneUlpOff(Mutant):
    description = (f"tier {FMA_ISAS[-1] if FMA_ISAS else 'v3'} one ulp off in its largest "
                   f"output (forward; only the cross-tier check can see it)")
    expect_kind = "bits"
    unavailable = _NO_TWO_FMA_TIERS

    def forward(self, call, mode):
        y = real_forward(call, mode)
        if _tiers.current() == FMA_ISAS[-1] and y.size:
            i = int(np.argmax(np.abs(y)))
            y.flat[i] = np.nextafter(y.flat[i], np.inf)
        return y


class TierSelectorOneTooLow(Mutant):
    description = "the first FMA tier asked for runs the tier below it (forward)"
    expect_kind = "bits"
    unavailable = _NO_TWO_FMA_TIERS or (None if ISAS.index(FMA_ISAS[0]) > 0 else
                                        "no tier below the FMA tiers")

    def forward(self, call, mode):
        if _tiers.current() == FMA_ISAS[0]:
            with _tiers.use(ISAS[ISAS.index(FMA_ISAS[0]) - 1]):
                return real_forward(call, mode)
        return real_forward(call, mode)


class _GradMutant(Mutant):
    """Changes a gradient after the real backward."""

    def conv2d_backward(self, *args, **kwargs):
        grads = super().conv2d_backward(*args, **kwargs)
        return grads._replace(**self.fix(grads, *args))

    def fix(self, grads, grad_output, *rest) -> dict:
        raise NotImplementedError


class GradWeightMissingLastRow(_GradMutant):
    description = "grad_weight: last kernel row never written"

    def fix(self, grads, *args):
        if grads.weight is None:
            return {}
        gw = grads.weight.copy()
        gw[:, :, -1, :] = 0
        return {"weight": gw}


class GradInputOffByOneRow(_GradMutant):
    description = "grad_input shifted down one row"

    def fix(self, grads, *args):
        return {} if grads.input is None else {"input": np.roll(grads.input, 1, axis=-2)}


class GradBiasFirstImageOnly(_GradMutant):
    description = "grad_bias sums the first image of the batch only"

    def fix(self, grads, grad_output, *args):
        g = np.asarray(grad_output)
        if grads.bias is None or g.ndim != 4 or g.shape[0] < 2:
            return {}
        return {"bias": g[:1].sum(axis=(0, 2, 3)).astype(grads.bias.dtype)}


class EmptyBatchGradWeightGarbage(_GradMutant):
    description = "grad_weight of an empty batch left uninitialised (ones)"

    def fix(self, grads, grad_output, *args):
        if grads.weight is None or np.shape(grad_output)[0] != 0 or np.ndim(grad_output) != 4:
            return {}
        return {"weight": np.ones_like(grads.weight)}


class _DepthwiseGradMutant(Mutant):
    """Changes one gradient where `select` runs it on the depthwise kernels (zero padding)."""

    op = None                   # "grad_input" or "grad_weight"

    def conv2d_backward(self, grad_output, input, weight, stride=1, padding=0, dilation=1,
                        groups=1, *, padding_mode="zeros", needs=ALL_GRADS):
        grads = super().conv2d_backward(grad_output, input, weight, stride, padding, dilation,
                                        groups, padding_mode=padding_mode, needs=needs)
        name = self.op[len("grad_"):]
        if padding_mode != "zeros" or getattr(grads, name) is None:
            return grads
        call, _ = _validate.conv_call(input, weight, None, stride, padding, dilation, groups,
                                      padding_mode)
        if not call.spec.n or _dispatch.select(call.spec, self.op, call.weight) != "depthwise":
            return grads
        gy = np.asarray(grad_output)
        wrong = self.wrong(call, gy if call.batched else gy[None])
        if name == "input" and not call.batched:
            wrong = wrong[0]
        return grads._replace(**{name: wrong})

    def wrong(self, call, grad_output):
        raise NotImplementedError


class DepthwiseGradWeightSkipsLastRow(_DepthwiseGradMutant):
    description = ("depthwise weight gradient only: the last output row of every image left "
                   "out of its sums")
    op = "grad_weight"

    def wrong(self, call, grad_output):
        kept = np.array(grad_output)
        kept[..., -1, :] = 0
        s = call.spec
        return dilconv.conv2d_backward(kept, call.x, call.weight, s.stride, s.padding,
                                       s.dilation, s.groups, needs=("weight",)).weight


class DepthwiseGradInputKernelNotTurned(_DepthwiseGradMutant):
    description = ("depthwise input gradient only: the forward of grad_output with the kernel "
                   "not turned by 180 degrees")
    op = "grad_input"

    def wrong(self, call, grad_output):
        # The transposed spec's padding and dilation, the weights as they are.
        turned = _dispatch.transposed_spec(call.spec)
        return dilconv.conv2d(grad_output, call.weight, None, padding=turned.padding,
                              dilation=turned.dilation, groups=turned.groups)


class ErrorsSwallowed(Mutant):
    description = "bad arguments return an empty result instead of raising"

    def conv2d(self, *args, **kwargs):
        try:
            return super().conv2d(*args, **kwargs)
        except (ValueError, TypeError):
            return np.zeros((1, 1, 1, 1))

    def conv2d_backward(self, *args, **kwargs):
        try:
            return super().conv2d_backward(*args, **kwargs)
        except (ValueError, TypeError):
            return dilconv.Conv2dGrads(None, None, None)


class WrongExceptionType(Mutant):
    description = "bad values raise RuntimeError instead of ValueError"

    def conv2d(self, *args, **kwargs):
        try:
            return super().conv2d(*args, **kwargs)
        except ValueError as exc:
            raise RuntimeError(str(exc)) from None


class VagueErrors(Mutant):
    description = "error messages do not name the argument"

    def conv2d(self, *args, **kwargs):
        try:
            return super().conv2d(*args, **kwargs)
        except (ValueError, TypeError) as exc:
            raise type(exc)("invalid arguments") from None


class Conv1dKernelReversed(Mutant):
    description = "conv1d only: kernel taps in reverse order"

    def conv1d(self, input, weight, *args, **kwargs):
        return dilconv.conv1d(input, np.asarray(weight)[..., ::-1], *args, **kwargs)


class TransposeBiasDropped(Mutant):
    description = "conv_transpose2d only: bias ignored"

    def conv_transpose2d(self, input, weight, bias=None, *args, **kwargs):
        return dilconv.conv_transpose2d(input, weight, None, *args, **kwargs)


class SegfaultOnWideDilation(Mutant):
    description = "segfaults when the width dilation is 6 or more"
    expect_kind = "crash"

    def forward(self, call, mode):
        if call.spec.dilation[1] >= 6:
            ctypes.string_at(0)          # read address 0: SIGSEGV
        return real_forward(call, mode)


class ReflectAsReplicate(Mutant):
    description = "padding_mode='reflect' pads by replicating the edge"

    def forward(self, call, mode):
        return real_forward(call, "replicate" if mode == "reflect" else mode)


def _name(cls) -> str:
    return "".join("_" + ch.lower() if ch.isupper() else ch for ch in cls.__name__)[1:]


MUTANTS = {_name(cls): cls() for cls in (
    DilationOffByOne, StrideIgnored, GroupsMappedWrongly, PaddingWrongSide, KernelFlipped,
    BiasDropped, BiasDoubled, Float32PartialTaps, Float64InFloat32, PaddingFilledWithOnes,
    BigEndianMisread, FortranMisread, UnbatchedKeepsBatchAxis, OutIgnored, ThreadDependent,
    DirectDropsLastColumn, FlatDropsFirstRow, GemmIgnoresBias, PanelSkipsLastTap,
    DepthwiseDropsSecondRows, TierOneUlpOff, TierSelectorOneTooLow, GradWeightMissingLastRow,
    GradInputOffByOneRow, DepthwiseGradWeightSkipsLastRow, DepthwiseGradInputKernelNotTurned,
    GradBiasFirstImageOnly, EmptyBatchGradWeightGarbage,
    ErrorsSwallowed, WrongExceptionType, VagueErrors, Conv1dKernelReversed,
    TransposeBiasDropped, SegfaultOnWideDilation, ReflectAsReplicate)}
