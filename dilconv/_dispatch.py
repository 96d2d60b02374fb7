"""Choose and run a kernel for a validated call.

Kernel families:
- "direct": loops over taps with per-tap in-bounds ranges (any geometry; the backward of
  layers with few channels);
- "flat": forward of unit-stride layers with few channels (depthwise, RGB stems): long
  vectorised loops over zero-padded bands of rows (finite weights only: padding taps are
  multiplied by zero there); its backward is "direct";
- "gemm": per output tile and tap, one matrix product of packed pixels with the tap's
  weights (layers with many channels);
- "depthwise": forward of layers with one input channel per group (depthwise, any channel
  multiplier): each output summed in registers and stored once, one pass over input and
  output; chosen for unit column stride (a strided one runs, on scalars); its backward is
  "direct".
All are bitwise deterministic for any thread count. `DILCONV_PATH=<one of PATHS>` in the
environment, or `force_path(...)`, overrides the choice (the fuzz lab and the tests use it
to reach every path); a forced "flat" or "depthwise" where it does not apply runs "direct".
"""
from __future__ import annotations

import contextlib
import math
import os
import threading

import numpy as np

from . import _backward, _depthwise, _flat, _forward, _gemm
from ._threads import threads_for

PATHS = ("direct", "flat", "gemm", "depthwise")
# Pixels per GEMM tile: a packed tile of a few hundred KiB stays in L2.
TILE_ELEMENTS = 256 * 1024
MIN_TILE_PIXELS = 64
MAX_TILE_PIXELS = 4096
# Forward GEMMs take a whole kernel row at once below this many channels per group.
KW_GROUP_BELOW_CHANNELS = 128
_forced = None
_controller = None
_blas_lock = threading.Lock()
_blas_users = 0
_blas_limiter = None
# BLAS takes 32-bit sizes: larger channel counts stay on the direct path.
BLAS_INT_MAX = 2 ** 31 - 1


@contextlib.contextmanager
def force_path(path):
    """Run the enclosed calls on kernel family `path` (one of PATHS, or None)."""
    global _forced
    if path is not None and path not in PATHS:
        raise ValueError(f"path must be one of {PATHS} or None, got {path!r}")
    previous, _forced = _forced, path
    try:
        yield
    finally:
        _forced = previous


def choose_path(spec, op: str = "forward") -> str:
    """Kernel family for `op` ('forward', or 'backward' for the input and weight
    gradients) on this geometry."""
    # BLAS takes 32-bit sizes, and the gemm forward passes the output plane size as a
    # leading dimension: larger geometries run direct, even when gemm is forced.
    fits_blas = (max(spec.c, spec.o) * MAX_TILE_PIXELS <= BLAS_INT_MAX
                 and spec.ho * spec.wo <= BLAS_INT_MAX)
    forced = _forced or os.environ.get("DILCONV_PATH") or None
    if forced is not None:
        if forced not in PATHS:
            raise ValueError(f"DILCONV_PATH must be one of {PATHS}, got {forced!r}")
        return "direct" if forced == "gemm" and not fits_blas else forced
    cg, og = spec.c // spec.groups, spec.o // spec.groups
    if (op == "forward" and cg == 1 and spec.stride[1] == 1
            and spec.wo >= DEPTHWISE_MIN_WIDTH):
        return "depthwise"
    if not fits_blas:
        return "direct"
    if op == "forward":
        if cg * og >= 32:
            return "gemm"
        return "flat" if spec.stride == (1, 1) else "direct"
    # Gradient GEMMs multiply over input channels: with only a few, direct loops win.
    return "gemm" if cg >= 16 and og >= 8 else "direct"


def plane_tiles(height: int, width: int, channels: int) -> np.ndarray:
    """Fixed rectangles (r0, r1, c0, c1) covering a height x width plane.

    Depends on the geometry only (never on the thread count), so results do not either.
    """
    target = max(MIN_TILE_PIXELS, min(MAX_TILE_PIXELS, TILE_ELEMENTS // max(1, channels)))
    if width >= target:
        tile_h = 1
        tile_w = math.ceil(width / math.ceil(width / target))
    else:
        tile_w = width
        tile_h = math.ceil(height / math.ceil(height * width / target))
    tiles = [(r, min(height, r + tile_h), c, min(width, c + tile_w))
             for r in range(0, height, tile_h) for c in range(0, width, tile_w)]
    return np.array(tiles, dtype=np.intp)


# Waking a second OpenMP thread costs microseconds (milliseconds on a busy machine): each
# thread gets at least this many multiply-adds.
MIN_MACS_PER_THREAD = 1 << 17


def _threads(spec, tasks: int) -> int:
    """Threads for a kernel with `tasks` parallel tasks on this geometry."""
    macs = spec.n * spec.o * (spec.c // spec.groups) * spec.effective_taps
    return min(threads_for(tasks), max(1, macs // MIN_MACS_PER_THREAD))


def _largest_tile(tiles: np.ndarray) -> int:
    return int(((tiles[:, 1] - tiles[:, 0]) * (tiles[:, 3] - tiles[:, 2])).max())


@contextlib.contextmanager
def _blas_single_threaded():
    """BLAS runs inside our parallel regions: keep it to one thread there.

    The limit is process-wide, so concurrent calls share one: the first caller sets it and
    the last one restores the original count (otherwise one thread could restore it while
    another is still inside BLAS, or leave it at 1 for good).
    """
    global _controller, _blas_users, _blas_limiter
    with _blas_lock:
        if _blas_users == 0:
            if _controller is None:
                from threadpoolctl import ThreadpoolController
                _controller = ThreadpoolController()
            _release_openblas_control()
            _blas_limiter = _controller.limit(limits=1, user_api="blas")
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                _release_openblas_control()
                _blas_limiter.restore_original_limits()
                _blas_limiter = None
                _release_openblas_control()


def _release_openblas_control() -> None:
    """Let this thread set OpenBLAS's count.

    threadpoolctl (3.6+) lets only one "controlling" thread change a process-wide
    OpenBLAS pool and silently ignores the others; the last caller, who restores the
    count, may not be the first, who set it. We hold _blas_lock here.
    """
    try:
        from threadpoolctl import OpenBLASController
    except ImportError:
        return
    clear = getattr(OpenBLASController, "clear_controlling_thread", None)
    if clear is not None:
        clear(force=True)


def _after_fork_in_child() -> None:
    # Another thread may have held the lock or the limit at fork(): start afresh.
    global _blas_lock, _blas_users, _blas_limiter
    _blas_lock = threading.Lock()
    if _blas_users and _blas_limiter is not None:
        _blas_limiter.restore_original_limits()
    _blas_users, _blas_limiter = 0, None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# Flat kernel: one output channel's band accumulator stays in L1; output channels of a
# block share the packed input bands.
FLAT_SPAN_ELEMENTS = 2048
FLAT_MAX_O_BLOCK = 16


def _flat_forward(x, weight, bias, out, spec) -> None:
    og = spec.o // spec.groups
    o_block = math.gcd(og, FLAT_MAX_O_BLOCK)
    wp = spec.wo + (spec.kw - 1) * spec.dilation[1]
    rows = max(1, min(spec.ho, FLAT_SPAN_ELEMENTS // wp))
    n_tasks = spec.n * spec.groups * (og // o_block) * math.ceil(spec.ho / rows)
    threads = _threads(spec, n_tasks)
    band = (rows + (spec.kh - 1) * spec.dilation[0]) * wp + (spec.kw - 1) * spec.dilation[1]
    cg = spec.c // spec.groups
    scratch = np.empty((threads, cg * band + o_block * rows * wp), dtype=x.dtype)
    _flat.forward(x, weight, bias, out, spec, rows, o_block, scratch, threads)


# Depthwise forward: output rows at least this wide take the depthwise kernel (unit column
# stride); on narrower ones the flat kernel's long loops measured faster (float32: up to
# 1.4x at 16 columns; float64 breaks even there).
DEPTHWISE_MIN_WIDTH = 24
# Depthwise tasks: bands of about this many output pixels of one plane (planes of typical
# layers are one task; huge ones are split so that both threads get work).
DEPTHWISE_TASK_PIXELS = 1 << 14


def _depthwise_forward(x, weight, bias, out, spec) -> None:
    band_rows = max(1, min(spec.ho, DEPTHWISE_TASK_PIXELS // spec.wo))
    n_tasks = spec.n * spec.o * math.ceil(spec.ho / band_rows)
    _depthwise.forward(x, weight, bias, out, spec, band_rows, _threads(spec, n_tasks))


def forward(x, weight, bias, out, spec) -> None:
    """out[...] = conv2d(x, weight) + bias for a batched spec with N > 0."""
    path = choose_path(spec)
    if path == "depthwise" and spec.c == spec.groups:
        _depthwise_forward(x, weight, bias, out, spec)
        return
    if path == "flat" and spec.stride == (1, 1) and np.isfinite(weight).all():
        _flat_forward(x, weight, bias, out, spec)
        return
    if path != "gemm":
        _forward.forward(x, weight, bias, out, spec, _threads(spec, spec.n * spec.o))
        return
    cg, og = spec.c // spec.groups, spec.o // spec.groups
    # Few channels: one product per kernel row (all kW taps, zeros where a tap is in the
    # padding) has a longer K and runs faster than one per tap.
    # Those zeros meet the weights, so only finite weights may take that way (0*inf = nan).
    kw_group = spec.kw if cg < KW_GROUP_BELOW_CHANNELS and np.isfinite(weight).all() else 1
    tiles = plane_tiles(spec.ho, spec.wo, kw_group * cg)
    threads = _threads(spec, spec.n * spec.groups * len(tiles))
    # (O, C/g, kH, kW) -> (kH*kW/kw_group, O, kw_group*C/g): columns (kw, c) per product.
    taps = np.ascontiguousarray(weight.transpose(2, 3, 0, 1)).reshape(
        spec.kh, spec.kw // kw_group, kw_group, spec.o, cg).transpose(0, 1, 3, 2, 4).reshape(
        spec.kh * spec.kw // kw_group, spec.o, kw_group * cg)
    taps = np.ascontiguousarray(taps)
    scratch = np.empty((threads, (kw_group * cg + og) * _largest_tile(tiles)), dtype=x.dtype)
    with _blas_single_threaded():
        _gemm.forward(x, taps, bias, out, tiles, kw_group, scratch, spec, threads)


def grad_input(grad_output, weight, grad_x, spec) -> None:
    if choose_path(spec, "backward") != "gemm":
        _backward.grad_input(grad_output, weight, grad_x, spec,
                             _threads(spec, spec.n * spec.c))
        return
    cg, og = spec.c // spec.groups, spec.o // spec.groups
    tiles = plane_tiles(spec.h, spec.w, og)
    threads = _threads(spec, spec.n * spec.groups * len(tiles))
    # (O, C/g, kH, kW) -> (kH*kW, C, O/g): per tap and group, a (C/g x O/g) matrix.
    taps = np.ascontiguousarray(
        weight.reshape(spec.groups, og, cg, spec.kh, spec.kw).transpose(3, 4, 0, 2, 1)
    ).reshape(spec.kh * spec.kw, spec.c, og)
    scratch = np.empty((threads, (cg + og) * _largest_tile(tiles)), dtype=grad_x.dtype)
    with _blas_single_threaded():
        _gemm.grad_input(grad_output, taps, grad_x, tiles, scratch, spec, threads)


def grad_weight(grad_output, x, grad_w, spec) -> None:
    cg, og = spec.c // spec.groups, spec.o // spec.groups
    if choose_path(spec, "backward") != "gemm":
        _backward.grad_weight(grad_output, x, grad_w, spec, _threads(spec, spec.o * cg))
        return
    # Output-channel blocks (dividing O/groups) x taps are the parallel tasks.
    o_block = math.gcd(og, 64)
    tiles = plane_tiles(spec.ho, spec.wo, cg + o_block)
    n_tasks = spec.kh * spec.kw * (spec.o // o_block)
    threads = _threads(spec, n_tasks)
    width = (cg + o_block) * _largest_tile(tiles) + o_block * cg
    scratch = np.empty((threads, width), dtype=grad_w.dtype)
    with _blas_single_threaded():
        _gemm.grad_weight(grad_output, x, grad_w, tiles, o_block, scratch, spec, threads)


def grad_bias(grad_output, grad_b, spec) -> None:
    _backward.grad_bias(grad_output, grad_b, spec, _threads(spec, spec.o))
