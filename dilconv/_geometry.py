"""Convolution geometry: one immutable spec per call, shared by all kernels."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np


def conv_output_size(size: int, k: int, stride: int, dilation: int, pad_lo: int,
                     pad_hi: int) -> int:
    """Output length along one axis: floor((in + pads - d*(k-1) - 1) / s) + 1."""
    return (size + pad_lo + pad_hi - dilation * (k - 1) - 1) // stride + 1


def tap_ranges(k: int, stride: int, dilation: int, pad_lo: int, size: int, out: int):
    """Per tap t, the half-open range of outputs whose input index is inside [0, size).

    Input index of output j through tap t is j*stride + t*dilation - pad_lo. Kernels loop
    only over these ranges, so they need no bounds test and skip taps in the padding.
    """
    lo = np.empty(k, dtype=np.intp)
    hi = np.empty(k, dtype=np.intp)
    for t in range(k):
        offset = t * dilation - pad_lo
        first = max(0, -(offset // stride))          # ceil(-offset / stride), at least 0
        last = min(out, (size - 1 - offset) // stride + 1) if size - 1 - offset >= 0 else 0
        lo[t] = first
        hi[t] = max(first, last)
    return lo, hi


# Entries a spec remembers: a new tuning object (each `with tuning(...)`) adds one.
MEMO_ENTRIES = 32


def memoised(spec, key, tuning, compute, *args):
    """compute(*args), remembered on `spec` under `key` for this `tuning` object: specs and
    tunings are immutable, and specs of plain arguments are shared by equal calls (see
    dilconv._validate.make_spec), so a layer called again skips its plans' Python work.
    The entry holds the tuning, so its id is not reused while the entry lives (and is
    checked all the same: an entry put there by other code may hold another tuning)."""
    memo = spec.memo
    full_key = (key, id(tuning))
    entry = memo.get(full_key)
    if entry is None or entry[0] is not tuning:
        if len(memo) >= MEMO_ENTRIES:
            memo.clear()
        entry = memo[full_key] = (tuning, compute(*args))
    return entry[1]


def fills_zero_columns(spec, weight, tuning) -> bool:
    """Whether a forward's border columns may read zeros in the padding (runs as wide as
    the row; panel and depthwise kernels): only where few zeros are multiplied
    (`tuning.zero_fill_max` per useful multiply-add; none: whole rows anyway) and the
    weights are finite (0 * inf = nan)."""
    return (0 < zero_filled_columns(spec) <= tuning.zero_fill_max
            and bool(np.isfinite(weight).all()))


@functools.lru_cache(maxsize=256)
def zero_filled_columns(spec) -> float:
    """Multiply-adds on zeros per useful one when runs span whole output rows: a column
    tap partly in the padding then reads zeros there."""
    useful = int((spec.ow_hi - spec.ow_lo).sum())
    active = int((spec.ow_hi > spec.ow_lo).sum())
    return (active * spec.wo - useful) / max(useful, 1)


@dataclass(frozen=True)
class ConvSpec:
    """Validated geometry of a 2-D convolution (batched, NCHW / OIHW)."""

    n: int
    c: int
    h: int
    w: int
    o: int
    kh: int
    kw: int
    stride: tuple
    dilation: tuple
    padding: tuple      # ((top, bottom), (left, right))
    groups: int
    ho: int = field(init=False)
    wo: int = field(init=False)
    oh_lo: np.ndarray = field(init=False, repr=False, compare=False)
    oh_hi: np.ndarray = field(init=False, repr=False, compare=False)
    ow_lo: np.ndarray = field(init=False, repr=False, compare=False)
    ow_hi: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        (pt, pb), (pl, pr) = self.padding
        ho = conv_output_size(self.h, self.kh, self.stride[0], self.dilation[0], pt, pb)
        wo = conv_output_size(self.w, self.kw, self.stride[1], self.dilation[1], pl, pr)
        set_ = object.__setattr__
        set_(self, "ho", ho)
        set_(self, "wo", wo)
        oh_lo, oh_hi = tap_ranges(self.kh, self.stride[0], self.dilation[0], pt, self.h, ho)
        ow_lo, ow_hi = tap_ranges(self.kw, self.stride[1], self.dilation[1], pl, self.w, wo)
        for name, arr in (("oh_lo", oh_lo), ("oh_hi", oh_hi), ("ow_lo", ow_lo),
                          ("ow_hi", ow_hi)):
            arr.flags.writeable = False
            set_(self, name, arr)

    @functools.cached_property
    def memo(self) -> dict:
        """Choices made for this geometry (see `memoised`), and the kernels' view of it
        (pyx/_common.pxd's make_geom)."""
        return {}

    def __getstate__(self):
        # The memo is this process's: plans hold its objects, make_geom its pointers.
        state = dict(self.__dict__)
        state.pop("memo", None)
        return state

    @property
    def output_shape(self):
        return (self.n, self.o, self.ho, self.wo)

    @functools.cached_property
    def effective_taps(self) -> int:
        """Multiply-adds per (image, output channel, input channel of the group) that
        touch the image rather than the padding."""
        rows = int((self.oh_hi - self.oh_lo).sum())
        cols = int((self.ow_hi - self.ow_lo).sum())
        return rows * cols

    @functools.cached_property
    def macs(self) -> int:
        """Multiply-adds of the whole call that touch the image."""
        return self.n * self.o * (self.c // self.groups) * self.effective_taps
