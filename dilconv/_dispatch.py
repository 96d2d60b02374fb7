"""Choose and run a kernel for a validated call.

Kernel families:
- "direct": loops over taps with per-tap in-bounds ranges (any geometry; the backward of
  layers with few channels);
- "flat": forward of unit-stride layers with few channels (depthwise, RGB stems): long
  vectorised loops over zero-padded bands of rows (finite weights only: padding taps are
  multiplied by zero there); its backward is "direct";
- "panel": layers with many channels: output tiles aligned with the taps' in-bounds
  ranges, packed into panels, summed by a register-blocked micro-kernel; at unit stride
  the input gradient is the same forward of grad_output with the transposed, turned
  kernel, and the weight gradient runs on the same micro-kernel;
- "gemm": per tile and tap, one BLAS matrix product (the strided input gradient of the
  panel family's layers; everything else when forced);
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
import functools
import math
import os
import threading

import numpy as np

from ._tiers import _backward, _depthwise, _flat, _forward, _gemm, _panel
from ._geometry import ConvSpec
from ._threads import threads_for

PATHS = ("direct", "flat", "gemm", "panel", "depthwise")
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
    """Kernel family for `op` on this geometry: 'forward', 'grad_input', or 'backward'
    (the weight gradient)."""
    fits_blas = _fits_blas(spec)
    forced = _forced or os.environ.get("DILCONV_PATH") or None
    if forced is not None:
        if forced not in PATHS:
            raise ValueError(f"DILCONV_PATH must be one of {PATHS}, got {forced!r}")
        return "direct" if forced == "gemm" and not fits_blas else forced
    cg, og = spec.c // spec.groups, spec.o // spec.groups
    if (op == "forward" and cg == 1 and spec.stride[1] == 1
            and spec.wo >= DEPTHWISE_MIN_WIDTH):
        return "depthwise"
    if op == "forward":
        if cg * og >= 32:
            return "panel"
        return "flat" if spec.stride == (1, 1) else "direct"
    # At unit stride the input gradient is a forward convolution over the output
    # channels: enough of them make it a panel forward, however few input channels.
    if op == "grad_input" and spec.stride == (1, 1) and og >= PANEL_GRAD_INPUT_MIN_CHANNELS:
        return "panel"
    # Gradient blocks run over input channels: with only a few, direct loops win.
    return "panel" if cg >= 16 and og >= 8 else "direct"


PANEL_GRAD_INPUT_MIN_CHANNELS = 16


def _fits_blas(spec) -> bool:
    # BLAS takes 32-bit sizes, and the gemm forward passes the output plane size as a
    # leading dimension: larger geometries run direct, even when gemm is forced.
    return (max(spec.c, spec.o) * MAX_TILE_PIXELS <= BLAS_INT_MAX
            and spec.ho * spec.wo <= BLAS_INT_MAX)


def plane_tiles(height: int, width: int, channels: int) -> np.ndarray:
    """Fixed rectangles (r0, r1, c0, c1) covering a height x width plane.

    Depends on the geometry only (never on the thread count), so results do not either.
    """
    target = max(MIN_TILE_PIXELS, min(MAX_TILE_PIXELS, TILE_ELEMENTS // max(1, channels)))
    return np.array(_rect_tiles(0, height, 0, width, target), dtype=np.intp)


def _rect_tiles(r0: int, r1: int, c0: int, c1: int, target: int) -> list:
    """Rectangles of about `target` pixels covering rows [r0, r1) x columns [c0, c1):
    whole rows of the rectangle, or pieces of one row when a row is that long."""
    height, width = r1 - r0, c1 - c0
    if width >= target:
        tile_h = 1
        tile_w = math.ceil(width / math.ceil(width / target))
    else:
        tile_w = width
        tile_h = math.ceil(height / math.ceil(height * width / target))
    return [(r, min(r1, r + tile_h), c, min(c1, c + tile_w))
            for r in range(r0, r1, tile_h) for c in range(c0, c1, tile_w)]


def _range_edges(lo: np.ndarray, hi: np.ndarray, size: int) -> list:
    """0, size and every tap range end inside (0, size), sorted: between two edges, each
    tap is in the image for all outputs or for none."""
    inner = {int(v) for v in np.concatenate([lo, hi]) if 0 < v < size}
    return sorted(inner | {0, size})


@functools.lru_cache(maxsize=256)
def aligned_tiles(spec, target: int, zero_fill: bool = False) -> np.ndarray:
    """Tiles (r0, r1, c0, c1) of about `target` pixels, none crossing a tap range end (of
    the row taps only, with `zero_fill`: column taps then read zeros in the padding).
    Remembered per geometry (layers call with the same one again and again): read-only."""
    rows = _range_edges(spec.oh_lo, spec.oh_hi, spec.ho)
    cols = [0, spec.wo] if zero_fill else _range_edges(spec.ow_lo, spec.ow_hi, spec.wo)
    tiles = np.array([tile for a, b in zip(rows, rows[1:]) for c, d in zip(cols, cols[1:])
                      for tile in _rect_tiles(a, b, c, d, target)], dtype=np.intp)
    tiles.flags.writeable = False
    return tiles


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


def tap_runs(lo: np.ndarray, hi: np.ndarray, size: int) -> np.ndarray:
    """Rows (start, end, t0, t1): the outputs [0, size) of one axis cut at the range edges,
    with the taps [t0, t1) that read the image for a whole run (none when t0 == t1; the
    input index grows with the tap, so they are a contiguous range)."""
    edges = _range_edges(lo, hi, size)
    lo, hi = lo.tolist(), hi.tolist()
    runs = []
    for start, end in zip(edges, edges[1:]):
        inside = [t for t in range(len(lo)) if lo[t] <= start < hi[t]]
        runs.append((start, end, inside[0], inside[-1] + 1) if inside else (start, end, 0, 0))
    return np.array(runs, dtype=np.intp).reshape(-1, 4)


def _depthwise_forward(x, weight, bias, out, spec) -> None:
    band_rows = max(1, min(spec.ho, DEPTHWISE_TASK_PIXELS // spec.wo))
    n_tasks = spec.n * spec.o * math.ceil(spec.ho / band_rows)
    _depthwise.forward(x, weight, bias, out, spec, tap_runs(spec.oh_lo, spec.oh_hi, spec.ho),
                       tap_runs(spec.ow_lo, spec.ow_hi, spec.wo), band_rows,
                       _threads(spec, n_tasks))


def forward(x, weight, bias, out, spec) -> None:
    """out[...] = conv2d(x, weight) + bias for a batched spec with N > 0."""
    path = choose_path(spec)
    if path == "depthwise" and spec.c == spec.groups:
        _depthwise_forward(x, weight, bias, out, spec)
        return
    if path == "panel":
        _panel_forward(x, weight, bias, out, spec)
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


# Panel-path tiles (tasks): about this many bytes of input terms (pixels x taps x
# channels), and enough pixels that blocks of NR are mostly full.
PANEL_PACK_BYTES = 1024 * 1024
PANEL_MIN_PIXELS = 256
# Panels are packed in groups of about this many bytes, just before their blocks run.
PANEL_GROUP_BYTES = 128 * 1024
# Unit-stride blocks read the image in place when one block reads at most this many bytes,
# or at any depth when there are at most this many blocks of output channels.
PANEL_IN_PLACE_BYTES = 4 * 1024
PANEL_IN_PLACE_MAX_BLOCKS = 2
# Panel tiles are cut at the column taps' range ends too, unless not cutting them
# multiplies at most this many zeros per useful multiply-add (border columns).
PANEL_ZERO_FILL_MAX = 0.1


def pack_panel_weights(weight, bias, spec):
    """Weights as (groups, blocks, kH*kW, C/g, MR) and bias as (groups, blocks, MR): MR
    output channels per block, zero past O/groups. `weight` may be any strided view."""
    groups, cg, og = spec.groups, spec.c // spec.groups, spec.o // spec.groups
    blocks = -(-og // _panel.MR)
    wp = np.empty((groups, blocks, spec.kh * spec.kw, cg, _panel.MR), dtype=weight.dtype)
    bp = np.empty((groups, blocks, _panel.MR), dtype=weight.dtype)
    _panel.pack_weights(weight, bias, wp, bp)
    return wp, bp


@functools.lru_cache(maxsize=256)
def zero_filled_columns(spec) -> float:
    """Multiply-adds on zeros per useful one when tiles span whole output rows: a column
    tap partly in the padding then reads zeros there."""
    useful = int((spec.ow_hi - spec.ow_lo).sum())
    active = int((spec.ow_hi > spec.ow_lo).sum())
    return (active * spec.wo - useful) / max(useful, 1)


def _panel_forward(x, weight, bias, out, spec) -> None:
    nr = _panel.BLOCK_NBYTES // x.dtype.itemsize
    depth = spec.kh * spec.kw * (spec.c // spec.groups)
    target = max(PANEL_MIN_PIXELS, PANEL_PACK_BYTES // x.dtype.itemsize // depth)
    # A packed panel serves every block of MR output channels: for one or two blocks it
    # does not pay, and unit-stride blocks read the image in place at any depth (in
    # tiles cut at the column taps' range ends).
    in_place_bytes = PANEL_IN_PLACE_BYTES
    blocks = -(-(spec.o // spec.groups) // _panel.MR)
    few_blocks = spec.stride[1] == 1 and blocks <= PANEL_IN_PLACE_MAX_BLOCKS
    if few_blocks:
        in_place_bytes = max(in_place_bytes, depth * _panel.BLOCK_NBYTES)
    # Tiles not cut at the column taps' range ends (whole rows, when the rows are short)
    # store each block straight into the output and pack whole blocks; border columns
    # then multiply zeros, so only finite weights go that way (0 * inf = nan), and only
    # where few zeros are multiplied (with none, the tiles are whole rows anyway).
    zero_fill = (not few_blocks and 0 < zero_filled_columns(spec) <= PANEL_ZERO_FILL_MAX
                 and bool(np.isfinite(weight).all()))
    tiles = aligned_tiles(spec, min(MAX_TILE_PIXELS, max(nr, target - target % nr)), zero_fill)
    threads = _threads(spec, spec.n * spec.groups * len(tiles))
    group = max(1, PANEL_GROUP_BYTES // (_panel.BLOCK_NBYTES * depth))
    scratch = np.empty((threads, group * nr * depth + _panel.MR * nr), dtype=x.dtype)
    tap_scratch = np.empty((threads, 4 * spec.kh * spec.kw), dtype=np.intp)
    wp, bp = pack_panel_weights(weight, bias, spec)
    _panel.forward(x, wp, bp, out, tiles, zero_fill, scratch, tap_scratch,
                   in_place_bytes, group, spec, threads)


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


def transposed_weight(weight, spec):
    """(O, C/g, kH, kW) -> (C, O/g, kH, kW): per group, in and out channels swapped and
    the kernel turned by 180 degrees."""
    groups, cg, og = spec.groups, spec.c // spec.groups, spec.o // spec.groups
    w = weight.reshape(groups, og, cg, spec.kh, spec.kw)[:, :, :, ::-1, ::-1]
    return w.transpose(0, 2, 1, 3, 4).reshape(spec.c, og, spec.kh, spec.kw)


def grad_input(grad_output, weight, grad_x, spec) -> None:
    path = choose_path(spec, "grad_input")
    spec_t = transposed_spec(spec) if path == "panel" else None
    if spec_t is not None:
        # Unit stride: grad_input is the forward convolution of grad_output with the
        # transposed, turned kernel, on the panel kernel.
        _panel_forward(grad_output, transposed_weight(weight, spec), np.empty(0, grad_x.dtype),
                       grad_x, spec_t)
        return
    # Strided layers of the panel family (and padding past the dilated kernel) take the
    # BLAS kernel where BLAS's sizes allow.
    if path not in ("gemm", "panel") or (path == "panel" and not _fits_blas(spec)):
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


# Weight-gradient tiles of the panel path: their packed input stays within this (in L1/L2),
# and a task's output channels of grad_output (in L2 across the taps) within this many.
PANEL_GRAD_WEIGHT_PACK_BYTES = 64 * 1024
PANEL_GRAD_WEIGHT_O_CHUNK = 128


def _panel_grad_weight(grad_output, x, grad_w, spec) -> None:
    cg = spec.c // spec.groups
    nr = _panel.BLOCK_NBYTES // x.dtype.itemsize
    taps = spec.kh * spec.kw
    target = min(MAX_TILE_PIXELS, max(1, PANEL_GRAD_WEIGHT_PACK_BYTES // _panel.BLOCK_NBYTES))
    tiles = aligned_tiles(spec, target)
    c_blocks = -(-cg // nr)
    og = spec.o // spec.groups
    o_chunk = min(og, PANEL_GRAD_WEIGHT_O_CHUNK)
    o_chunk += -o_chunk % _panel.MR
    threads = _threads(spec, spec.groups * c_blocks * -(-og // o_chunk))
    scratch = np.empty((threads, nr * _largest_tile(tiles)), dtype=x.dtype)
    rows = int((tiles[:, 1] - tiles[:, 0]).max())
    offset_scratch = np.empty((threads, 2 * rows), dtype=np.intp)
    gwt = np.zeros((taps, spec.o, c_blocks * nr), dtype=x.dtype)
    _panel.grad_weight(grad_output, x, gwt, tiles, o_chunk, scratch, offset_scratch, spec,
                       threads)
    grad_w[...] = gwt[:, :, :cg].transpose(1, 2, 0).reshape(grad_w.shape)


def grad_weight(grad_output, x, grad_w, spec) -> None:
    cg, og = spec.c // spec.groups, spec.o // spec.groups
    path = choose_path(spec, "backward")
    if path == "panel":
        _panel_grad_weight(grad_output, x, grad_w, spec)
        return
    if path != "gemm":
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
