"""Tuning knobs of the kernels: one typed, immutable object per context.

The defaults are the measured ones; the tests and the fuzz lab change them (tiles of a few
pixels, so that small images cross tile boundaries; a forced kernel family) through

    with tuning(path="flat", max_tile_pixels=7):
        ...

which holds for the calls of the enclosing thread (or asyncio task) only: the setting lives
in a context variable, so other threads keep theirs. An unknown knob name or a value of the
wrong type is an error, never silently ignored.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import numbers
from dataclasses import dataclass
from typing import Optional

# Kernel families (see dilconv._dispatch).
PATHS = ("direct", "flat", "gemm", "panel", "depthwise")


@dataclass(frozen=True)
class Tuning:
    """Every knob a kernel plan reads. Sizes are in pixels, elements or bytes, as named."""

    # Kernel family for every call (None: dispatch chooses; DILCONV_PATH also forces one).
    path: Optional[str] = None
    # CPU tier whose kernels run (None: the one chosen at import; see dilconv._tiers).
    tier: Optional[str] = None
    # Pixels per GEMM tile (and bounds of the panel tiles): a packed tile stays in L2.
    min_tile_pixels: int = 64
    max_tile_pixels: int = 4096
    # Flat kernel: output elements of one band of rows (its accumulator stays in L1).
    flat_span_elements: int = 2048
    # Depthwise tasks: bands of about this many output pixels of one plane.
    depthwise_task_pixels: int = 1 << 14
    # Waking a second OpenMP thread costs microseconds (milliseconds on a busy machine):
    # each thread gets at least this many multiply-adds.
    min_macs_per_thread: int = 1 << 17
    # GEMM forward: one product per kernel row (not per tap) below this many channels.
    kw_group_below_channels: int = 128
    # Panel forward: unit-stride blocks read the image in place when one block reads at
    # most this many bytes, or at any depth with at most this many blocks of output channels.
    panel_in_place_bytes: int = 4 * 1024
    panel_in_place_max_blocks: int = 2
    # Panel tiles are cut along rows only, and depthwise rows are one run, while at most
    # this many zeros are multiplied per useful multiply-add (border columns).
    zero_fill_max: float = 0.1
    # Panel forward: panels are packed in groups of about this many bytes, and their taps
    # in chunks of about this many bytes per panel (a panel's chunk stays in L1 while it
    # is summed into every output block, the chunk's weights in L2).
    panel_group_bytes: int = 128 * 1024
    panel_chunk_bytes: Optional[int] = None      # None: the CPU tier's own
    # Panel forward in the lanes scheme (output channels in vector lanes, pyx/_lanes.h):
    # None: where the CPU tier's plan takes it; True or False: always or never.
    panel_lanes: Optional[bool] = None
    # Lanes scheme: an output block's taps summed one at a time, in chunks of channels with
    # about this many bytes of weights (None: where the CPU tier's plan does so).
    panel_lanes_chunk_bytes: Optional[int] = None
    # Panel weight gradient: blocks of input channels per task (None: the plan's), and
    # grad_output packed for blocks of the tier's MR_GW rows (None: where the plan packs
    # it; True: wherever the tier has such blocks and the layer those channels; False:
    # never). The sums keep their order either way: the same bits.
    panel_grad_weight_c_group: Optional[int] = None
    panel_grad_weight_packed: Optional[bool] = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "path":
                if value is not None and value not in PATHS:
                    raise ValueError(f"tuning path must be one of {PATHS} or None, "
                                     f"got {value!r}")
            elif f.name == "tier":
                if value is not None:
                    from . import _tiers
                    _tiers.check(value, "tuning tier")
            elif f.type == "Optional[bool]":
                if value is not None and not isinstance(value, bool):
                    raise TypeError(f"tuning {f.name} must be True, False or None, "
                                    f"got {value!r}")
            elif value is None and f.type == "Optional[int]":
                pass                   # an int knob whose default the kernel module picks
            elif f.type == "float":
                if isinstance(value, bool) or not isinstance(value, numbers.Real):
                    raise TypeError(f"tuning {f.name} must be a number, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"tuning {f.name} must be an int, got {value!r}")
            else:
                least = 0 if f.name.startswith("panel_in_place") else 1
                if value < least:
                    raise ValueError(f"tuning {f.name} must be >= {least}, got {value}")


KNOBS = tuple(f.name for f in dataclasses.fields(Tuning))
_current: contextvars.ContextVar = contextvars.ContextVar("dilconv_tuning", default=Tuning())


def current() -> Tuning:
    """The knobs in force in this context."""
    return _current.get()


@contextlib.contextmanager
def tuning(**knobs):
    """Change some knobs for the enclosed calls of this context (thread or task).

    >>> from dilconv._tuning import tuning, current
    >>> with tuning(path="direct"):
    ...     current().path
    'direct'
    >>> current().path is None
    True
    """
    unknown = sorted(set(knobs) - set(KNOBS))
    if unknown:
        raise TypeError(f"unknown tuning knob(s) {', '.join(unknown)}; "
                        f"known ones: {', '.join(KNOBS)}")
    token = _current.set(dataclasses.replace(_current.get(), **knobs))
    try:
        yield _current.get()
    finally:
        _current.reset(token)
