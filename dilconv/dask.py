"""dilconv on dask arrays: batches and images larger than memory, on one machine or a cluster.

Optional (``python -m pip install -e ".[dask]"`` in a clone of the repository: dask,
distributed and zarr) and never imported by ``import dilconv``.

``conv2d`` and ``conv2d_backward`` take a ``dask.array.Array`` (N, C, H, W) chunked along the
batch and/or the spatial axes, and return lazy dask arrays; nothing runs until you call
``.compute()``, ``dask.compute``, ``da.store``... on any dask scheduler (threads, processes,
``dask.distributed``).

How it works: every output block is one in-memory ``dilconv.conv2d`` call on the input window
it reads, ``[a*s - pad, (b-1)*s + d*(k-1) + 1 - pad)`` for output rows ``[a, b)`` (same for
columns), gathered from the input chunks it overlaps (the halo), with the part of the global
zero padding that falls inside the window passed as that call's padding. So every output
element is computed from exactly the taps the in-memory call uses, for any chunking and
stride; only the order of additions inside the kernels may differ (results agree within
``dilconv.tolerance``). Output block j along an axis holds the outputs whose window is
centred in input chunk j, so with ``padding='same'`` the output is chunked like the input.

The gradient of the input is computed block by block the same way (each input block gathers
the ``grad_output`` rows that read it); the gradients of weight and bias are partial sums per
``grad_output`` block added in a fixed tree (``split_every`` at a time, in block order), so
they are bitwise reproducible for a given chunking, on any scheduler.

Threads: each block runs the kernels on ``threads_per_task`` OpenMP threads (default 1): dask
already runs one task per worker thread, so workers x threads per worker x threads per task
should not exceed the cores. Pass ``threads_per_task=None`` to use dilconv's process setting
(``dilconv.set_num_threads`` / ``OMP_NUM_THREADS``), e.g. with the synchronous scheduler. The
limit is set in the task's own thread only and restored afterwards; ``set_num_threads(n)``
still caps it.
"""
from __future__ import annotations

import bisect
import concurrent.futures
import contextlib
import functools
import itertools
import math
import mmap
import numbers
import operator
import os
import re
import sys
import threading
import time
import warnings
import dataclasses
from dataclasses import dataclass
from typing import NamedTuple, Optional

import dask.array as da
import numpy as np
from dask.array.core import PerformanceWarning

try:
    import fcntl
except ImportError:                # not on Windows
    fcntl = None
from dask.base import tokenize
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

from . import _api, _openmp_helpers, _padding, _validate

__all__ = ["conv2d", "conv2d_chain", "conv2d_backward", "from_npy", "from_raw", "MemmapArray",
           "block_chunks"]

# padding_mode -> numpy/dask pad mode, as the in-memory API pads.
PAD_MODES = _padding.NUMPY_MODES


@contextlib.contextmanager
def limited_threads(n: Optional[int]):
    """Run dilconv's kernels on at most `n` OpenMP threads in this thread (None: no change).

    OpenMP's thread count is per calling thread, so concurrent dask tasks do not interfere.
    """
    if n is None:
        yield
        return
    previous = _openmp_helpers.max_threads()
    _openmp_helpers.set_max_threads(n)
    try:
        yield
    finally:
        _openmp_helpers.set_max_threads(previous)


# --- geometry of one spatial axis -------------------------------------------------------

@dataclass(frozen=True)
class _Axis:
    size: int
    k: int
    stride: int
    dilation: int
    lo: int             # zero padding before
    out: int            # output length

    @property
    def span(self) -> int:
        return self.dilation * (self.k - 1) + 1

    def window(self, a: int, b: int):
        """Input [r0, r1) read by outputs [a, b), and the padding (before, after) around it.

        Empty (r1 <= r0) when those outputs read only padding.
        """
        start = a * self.stride - self.lo
        end = (b - 1) * self.stride + self.span - self.lo
        r0, r1 = max(0, start), min(self.size, end)
        return r0, r1, (r0 - start, end - r1)

    def readers(self, r0: int, r1: int):
        """Outputs [ja, jb) whose window overlaps input [r0, r1) (empty when ja == jb)."""
        ja = max(0, -((self.span - 1 - self.lo - r0) // self.stride))
        jb = min(self.out, (r1 - 1 + self.lo) // self.stride + 1)
        return ja, max(ja, jb)

    def output_chunks(self, in_chunks: tuple) -> tuple:
        """Output j goes with the input chunk holding its window's centre (clamped).

        With 'same' padding and stride 1 the output is chunked exactly like the input.
        """
        shift = self.lo - (self.span - 1) // 2
        cuts = [min(self.out, max(0, -(-(start + shift) // self.stride)))
                for start in np.cumsum(in_chunks)[:-1].tolist()]
        bounds = [0] + cuts + [self.out]
        return tuple(b - a for a, b in zip(bounds, bounds[1:]) if b > a)


def _axes(spec):
    (pt, _), (pl, _) = spec.padding
    return (_Axis(spec.h, spec.kh, spec.stride[0], spec.dilation[0], pt, spec.ho),
            _Axis(spec.w, spec.kw, spec.stride[1], spec.dilation[1], pl, spec.wo))


def _ranges(chunks):
    """[(start, stop)] of each chunk."""
    bounds = np.cumsum((0,) + tuple(chunks)).tolist()
    return list(zip(bounds, bounds[1:]))


def _locate(bounds, r0, r1):
    """(chunk index, local start, local stop) of the chunks covering [r0, r1)."""
    i = bisect.bisect_right(bounds, r0) - 1
    pieces = []
    while r0 < r1:
        stop = min(r1, bounds[i + 1])
        if stop > r0:
            pieces.append((i, r0 - bounds[i], stop - bounds[i]))
        r0, i = stop, i + 1
    return pieces


# --- task-side pieces: opaque to dask (no keys inside), picklable -----------------------

@dataclass(frozen=True)
class _Slices:
    """Rows of (row slice, column slice) cutting each gathered block to the window."""

    grid: tuple


@dataclass(frozen=True)
class _Conv:
    """Arguments of one block's in-memory call."""

    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    threads: Optional[int]
    needs: tuple = ()


def _cut(block, rows, cols):
    # A copy, so a halo strip neither keeps its whole block alive nor ships it between
    # workers.
    return block[:, :, rows, cols].copy()


_local = threading.local()


def _scratch(slot: str, shape: tuple, dtype) -> np.ndarray:
    """A buffer of `shape` reused by every task of this thread (one per slot).

    Fresh block-sized arrays cost a page fault per page on first touch (glibc maps large
    allocations anew each time, always so in dask.distributed workers, whose nanny sets
    MALLOC_TRIM_THRESHOLD_): more CPU than the copies they receive. A scratch buffer is
    touched once per thread and holds only one task's data at a time. Page-aligned, so its
    rows can go to disk with O_DIRECT (`MemmapArray`).
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    buffers = _local.__dict__.setdefault("buffers", {})
    buf = buffers.get(slot)
    if buf is None or buf.nbytes < nbytes:
        raw = np.empty(max(nbytes, 1) + PAGE, np.uint8)
        buf = buffers[slot] = raw[-raw.ctypes.data % PAGE:][:max(nbytes, 1)]
    return buf[:nbytes].view(dtype).reshape(shape)


PAGE = 4096


@dataclass(frozen=True)
class _Direct:
    """A window read by its task straight from the array on disk (`_direct_source`)."""

    source: object
    region: tuple


def _is_zarr_array(source) -> bool:
    zarr = sys.modules.get("zarr")          # not imported: not a zarr array
    return zarr is not None and isinstance(source, zarr.Array)


def _direct_source(x: da.Array):
    """The `MemmapArray`, `RawZarrArray` or zarr array whose blocks `x` is, when `x` is
    exactly such an array wrapped by `from_array` (`from_npy`, `from_raw`, `from_zarr`,
    `dask.array.from_zarr`): tasks then read their windows from it themselves, into their
    window buffer, instead of gathering dask blocks (one copy fewer, and no block
    allocated or held by the scheduler: memory then depends on the tasks running, not on
    the order the scheduler reads blocks in)."""
    graph = x.__dask_graph__()
    layers = getattr(graph, "layers", {})
    if not x.name.startswith(("array-", "from-zarr-")) \
            or set(layers) != {x.name, "original-" + x.name}:
        return None
    source = dict(layers["original-" + x.name]).get("original-" + x.name)
    if (isinstance(source, (MemmapArray, RawZarrArray)) or _is_zarr_array(source)) \
            and tuple(source.shape) == x.shape and source.dtype == x.dtype \
            and getattr(source, "order", "C") == "C":
        return source
    return None


def _contiguous(a: np.ndarray, slot: str, planes=False) -> np.ndarray:
    """`a` itself when C-contiguous, or with `planes` when its channel planes are (conv2d
    reads those in place: `_validate.kernel_array`), else its copy in this thread's buffer
    `slot` (a fresh array per call would cost a page fault per page). A view of a
    memory-mapped file from a dask block is always copied: on some machines the kernels
    ran at 0.55x their speed in the file's mapping (see WINDOW_VIEWS)."""
    if not isinstance(a, np.memmap) and (
            a.flags.c_contiguous or (planes and _validate.planes_contiguous(a, a.dtype))):
        return a
    buf = _scratch(slot, a.shape, a.dtype)
    np.copyto(buf, a)
    return buf


# A forward's window of a `MemmapArray` goes to the kernels either as a view of the file's
# mapping (no copy) or read with pread into the task's buffer, and a `RawZarrArray`'s is
# copied into that buffer from its chunk files' mappings or read with pread into a chunk
# buffer first, whichever costs this machine less: on an AVX-512 EPYC under KVM the
# kernels ran at 0.55x their speed on a mapping (populated or not), and copies through
# one cost more than pread; on an AVX-512 Xeon under Firecracker the kernels ran as fast
# on it, the bench layer's threaded job took 0.7x the CPU with views, and chunks copied
# from their mappings 0.5-0.6x the CPU of pread and a copy. Each process measures, per
# kind of source: its first windows alternate (WINDOW_TRIALS of each), each timed in the
# task thread's CPU time per value from the read to the end of its first kernel call (a
# block written in stripes: its whole task), and it keeps the cheaper. A thread's first
# window of each kind is not counted: it touches that kind's buffers for the first time
# (3-10x the CPU of the next, which made the choice a coin toss). WINDOW_VIEWS = True or
# False decides instead (tests).
WINDOW_VIEWS: Optional[bool] = None
WINDOW_TRIALS = 3


class _WindowCost:
    """The measured choice between views and copies of windows (per kind of source)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.costs = {True: [], False: []}
        self.choice: Optional[bool] = None
        self.warm = threading.local()           # the kinds this thread has had

    def trying(self) -> bool:
        """Whether windows are still timed (neither WINDOW_VIEWS nor a measured choice)."""
        return WINDOW_VIEWS is None and self.choice is None

    def views(self) -> bool:
        if WINDOW_VIEWS is not None:
            return WINDOW_VIEWS
        with self.lock:
            if self.choice is not None:
                return self.choice
            return len(self.costs[True]) <= len(self.costs[False])

    def record(self, views: bool, seconds: float, values: int) -> None:
        warm = self.warm.__dict__.setdefault("kinds", set())
        if views not in warm:                          # this thread's first of the kind
            warm.add(views)
            return
        with self.lock:
            if self.choice is not None:
                return
            self.costs[views].append(seconds / max(values, 1))
            if min(len(c) for c in self.costs.values()) >= WINDOW_TRIALS:
                self.choice = min(self.costs[True]) < min(self.costs[False])


# Per kind of source (its class name): the choice measured in this process.
_window_costs = {"MemmapArray": _WindowCost(), "RawZarrArray": _WindowCost()}


def _read_window(direct: _Direct, slot="window", planes=False, rows=None, views=None):
    """The window read into this thread's buffer `slot`; with `planes` (for conv2d), a
    `MemmapArray`'s window may be a view of the file instead, a `RawZarrArray`'s copied
    from its chunk files' mappings (see WINDOW_VIEWS) or from the chunk rows `rows` (a
    `_ChunkRows`) keeps for the task. `views` given: the caller chose (and measures)."""
    source = direct.source
    if isinstance(source, (MemmapArray, RawZarrArray)) and planes:
        cost = _window_costs[type(source).__name__]
        trial = views is None and cost.trying()
        start = time.thread_time() if trial else 0.0
        views = cost.views() if views is None else views
        if isinstance(source, RawZarrArray):
            window = source.read_into(direct.region, slot, mapped=views, rows=rows)
        else:
            # A plain view (the mapping lives as its base): no np.memmap, which
            # _contiguous would copy.
            window = np.asarray(source[direct.region]) if views else None
            if window is None or not _validate.planes_contiguous(window, window.dtype):
                window, views = source.read_into(direct.region, slot), False
        if trial:
            _local.window_trial = (window, cost, views, start)
        return window
    if isinstance(source, (MemmapArray, RawZarrArray)):
        return source.read_into(direct.region, slot)
    # A zarr array decodes the chunks the window overlaps straight into the buffer.
    from zarr.core.buffer import default_buffer_prototype
    window = _scratch(slot, _region_shape(direct.region, source.shape), source.dtype)
    source.get_basic_selection(
        direct.region, out=default_buffer_prototype().nd_buffer.from_numpy_array(window))
    return window


def _assemble(blocks, slices: _Slices, planes=False):
    """The input window from its pieces: the piece itself when it is the whole window and
    C-contiguous (the kernels read it in place), else one copy into this thread's window
    buffer (valid until the thread's next window). With `planes` (for conv2d), a piece
    whose channel planes are C-contiguous is read in place too."""
    if isinstance(blocks, _Direct):
        return _read_window(blocks, planes=planes)
    grid = [[b[:, :, sh, sw] for b, (sh, sw) in zip(brow, srow)]
            for brow, srow in zip(blocks, slices.grid)]
    if len(grid) == 1 and len(grid[0]) == 1:
        return _contiguous(grid[0][0], "window", planes)
    first = grid[0][0]
    heights = [row[0].shape[2] for row in grid]
    widths = [piece.shape[3] for piece in grid[0]]
    window = _scratch("window", first.shape[:2] + (sum(heights), sum(widths)), first.dtype)
    r = 0
    for row, height in zip(grid, heights):
        c = 0
        for piece, width in zip(row, widths):
            np.copyto(window[:, :, r:r + height, c:c + width], piece)
            c += width
        r += height
    return window


def _conv_call(x, weight, bias, conv: _Conv, out=None):
    """One block's in-memory call on its window `x`, on the task's threads."""
    with limited_threads(conv.threads):
        y = _api.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation,
                        conv.groups, out=out)
    trial = getattr(_local, "window_trial", None)
    if trial is not None and np.may_share_memory(trial[0], x):   # its read and kernel
        _local.window_trial = None
        window, cost, views, start = trial
        cost.record(views, time.thread_time() - start, window.size)
    return y


def _forward_block(blocks, slices, weight, bias, conv: _Conv):
    return _conv_call(_assemble(blocks, slices, planes=True), weight, bias, conv)


def _bias_block(shape, dtype, bias, y=None):
    """An output block whose taps all fall in the padding: just the bias, as in memory."""
    y = np.zeros(shape, dtype=dtype) if y is None else y
    y[...] = 0 if bias is None else bias[None, :, None, None]
    return y


class _Store(NamedTuple):
    """Where one output block goes in `out` (region), and how the block is laid out."""

    target: object
    region: tuple        # index into `out` (no batch axis for unbatched output)
    shape: tuple         # (N, O, rows, cols) of the block
    dtype: np.dtype


def _in_place(store: _Store):
    """The region of `out` for one output block when the kernel can write it in place (a
    C-contiguous numpy region), else None."""
    target, region = store.target, store.region
    if isinstance(target, np.ndarray):
        view = target[region]
        if view.flags.c_contiguous and view.flags.aligned and view.dtype == store.dtype:
            return view.reshape(store.shape)
    return None


def _store_buffer(store: _Store):
    """(buffer, in place) for one output block: `_in_place`'s region, else this thread's
    output buffer (see `_store_put`)."""
    view = _in_place(store)
    if view is not None:
        return view, True
    return _scratch("output", store.shape, store.dtype), False


def _store_put(store: _Store, y, in_place) -> None:
    """One assignment (which is all a zarr array or a file needs) unless written in place."""
    if not in_place:
        store.target[store.region] = y.reshape(_region_shape(store.region,
                                                             store.target.shape))


# A block that is not computed in place in `out` is computed and written a stripe at a
# time: a thread of the task writes one stripe while the kernel computes the next. Writes to
# files are synchronous and would otherwise leave the core idle (a third of the time of one
# worker writing to a local disk, more with two). Each write request of a stripe (a stored
# chunk of a zarr array, or one channel's rows of a file) is at least this many bytes where
# the block allows: on a virtio disk, O_DIRECT writes of 1 MiB cost 3x the CPU per byte of
# 4 MiB ones, and a file's blocks written in stripes of 4 MiB (1 MiB per channel) cost more
# CPU than the same blocks written whole.
STRIPE_BYTES = 4 * 1024 ** 2


def _stripes(store: _Store):
    """(axis, length) of the stripes `store`'s block is computed and written in, or None
    when it goes in one piece: stripes are whole chunks of `out` (no chunk is written
    twice), rows if the block has at least two stripes of rows, else columns; of equal
    lengths, so that none is a sliver (a call of a few rows costs more per row)."""
    stored = getattr(store.target, "shards", None) or getattr(store.target, "chunks", None)
    n, o, rows, cols = store.shape
    item = np.dtype(store.dtype).itemsize
    # A stored chunk holds every channel; a file's channels are runs of their own.
    per_request = 1 if stored is None else n * o
    for axis, length, across in ((2, rows, cols), (3, cols, rows)):
        step = 1 if stored is None else int(stored[axis - 4])
        per = max(1, STRIPE_BYTES // (per_request * across * item * step)) * step
        if length > per:
            count = -(-length // per)
            return axis, -(-length // (count * step)) * step
    return None


def _writer():
    """This thread's writing thread (one stripe in flight while the next is computed)."""
    writer = getattr(_local, "writer", None)
    if writer is None:
        writer = _local.writer = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="dilconv-write")
    return writer


def _store_striped(blocks, slices, weight, bias, conv: _Conv, store: _Store, axis, per,
                   background=True):
    """`_store_block` a stripe at a time along `axis`, each written (with `background`)
    while the next is computed (into the other of two stripe buffers of this thread), or
    else before it."""
    cost = views = None
    if axis == 3 and isinstance(blocks, _Direct):
        # A stripe of columns of the window would be copied: read it from the file instead.
        extent = blocks.region[axis]
        size = extent.stop - extent.start
        rows = _ChunkRows() if isinstance(blocks.source, RawZarrArray) else None
        cost = _window_costs.get(type(blocks.source).__name__)
        if cost is not None:
            # Views or copies for the whole task, measured over it: its stripes share the
            # chunks they read (`rows`), so the first stripe reads more than the next.
            views = cost.views()
            if not cost.trying():
                cost = None
        started = time.thread_time()

        def stripe_input(r0, r1):
            region = blocks.region[:axis] + (slice(extent.start + r0, extent.start + r1),)
            return _read_window(_Direct(blocks.source, region), "stripe-input", planes=True,
                                rows=rows, views=views)
    else:
        x = _assemble(blocks, slices, planes=True)
        size = x.shape[axis]

        def stripe_input(r0, r1):
            return _contiguous(x[(slice(None),) * axis + (slice(r0, r1),)], "stripe-input",
                               planes=True)
    length = store.shape[axis]
    ax = _Axis(size, weight.shape[axis], conv.stride[axis - 2],
               conv.dilation[axis - 2], conv.padding[axis - 2][0], length)
    start = store.region[axis - 4].start
    pending = []
    try:
        for i, j0 in enumerate(range(0, length, per)):
            j1 = min(length, j0 + per)
            if len(pending) == 2:                  # the buffer this stripe reuses is free
                pending.pop(0).result()
            shape = store.shape[:axis] + (j1 - j0,) + store.shape[axis + 1:]
            y = _scratch(f"stripe-{i % 2}", shape, store.dtype)
            r0, r1, pad = ax.window(j0, j1)
            if r1 > r0:
                padding = conv.padding[:axis - 2] + (pad,) + conv.padding[axis - 1:]
                _conv_call(stripe_input(r0, r1), weight, bias,
                           dataclasses.replace(conv, padding=padding), out=y)
            else:
                _bias_block(shape, store.dtype, bias, y)
            region = list(store.region)
            region[axis - 4] = slice(start + j0, start + j1)
            stripe = _Store(store.target, tuple(region), shape, store.dtype)
            if background:
                pending.append(_writer().submit(_store_put, stripe, y, False))
            else:
                _store_put(stripe, y, False)
        for write in pending:
            write.result()
        if cost is not None:
            cost.record(views, time.thread_time() - started, math.prod(store.shape))
    finally:                 # no write may still read this thread's buffers after the task
        concurrent.futures.wait(pending)


_running = {"tasks": 0}
_running_lock = threading.Lock()


@contextlib.contextmanager
def _counted():
    """Count this process's tasks that are computing a block into `out`; yields how many
    (this one included)."""
    with _running_lock:
        _running["tasks"] += 1
        count = _running["tasks"]
    try:
        yield count
    finally:
        with _running_lock:
            _running["tasks"] -= 1


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)


@functools.lru_cache(maxsize=1)
def _sibling_workers() -> int:
    """In a dask.distributed worker, how many other workers run beside it on this machine:
    processes of the same command (but for the numbers in it: multiprocessing passes each
    its own pipe) started by the same parent (LocalCluster's workers, and those of
    `dask worker --nworkers`); 0 elsewhere. Counted once per process."""
    distributed = sys.modules.get("distributed")
    if distributed is None:
        return 0
    try:
        distributed.get_worker()
        import psutil

        def command(process):
            return [re.sub(r"\d+", "", arg) for arg in process.cmdline()]
        me = psutil.Process()
        mine = command(me)
        return sum(1 for p in me.parent().children()
                   if p.pid != me.pid and command(p) == mine)
    except Exception:      # not in a worker, or processes that cannot be listed
        return 0


def _writer_helps(tasks: int, threads: Optional[int]) -> bool:
    """Whether a writing thread would find a free core: not when this process's tasks
    already keep every core busy (dask's threaded scheduler, one thread per core), nor
    when the other workers beside it on this machine (as many tasks each) do. There the
    other tasks compute while one writes, and writing threads only compete with them (for
    the GIL and the caches): blocks written in stripes cost 1.1-1.2x the CPU of blocks
    written whole on the bench layer's threaded run; its two workers, 1.2-1.5x the CPU and
    1.05-1.15x the time."""
    machine_tasks = tasks * (1 + _sibling_workers())
    return machine_tasks * (threads or _openmp_helpers.max_threads()) < _cores()


def _store_block(blocks, slices, weight, bias, conv: _Conv, store: _Store):
    """Compute one output block straight into `out`: in stripes where a writing thread
    finds a free core or `out` is a `RawZarrArray` (a stripe of whole chunks is written
    as it is, a block chunk by chunk through a copy), else whole."""
    with _counted() as tasks:
        background = _writer_helps(tasks, conv.threads)
        # A RawZarrArray takes a stripe of whole chunks as they are; a block would be
        # copied chunk by chunk.
        striped = background or isinstance(store.target, RawZarrArray)
        stripes = (None if blocks is None or _in_place(store) is not None or not striped
                   else _stripes(store))
        if stripes is not None:
            return _store_striped(blocks, slices, weight, bias, conv, store, *stripes,
                                  background=background)
        y, in_place = _store_buffer(store)
        if blocks is None:
            _bias_block(store.shape, store.dtype, bias, y)
        else:
            _conv_call(_assemble(blocks, slices, planes=True), weight, bias, conv, out=y)
        _store_put(store, y, in_place)
    return None


def _region_shape(region, shape):
    return tuple(len(range(*index.indices(size))) for index, size in zip(region, shape))


def _stored(parts, target):
    """The final task of a store: `out`, once every block is in it."""
    return target


def _grad_input_block(blocks, slices, weight, conv: _Conv, window_shape, shape, rows, cols):
    """Gradient for one input block; `rows`/`cols` place the gradient window in the block."""
    gy = _assemble(blocks, slices)
    # Only the shape of the input matters for its gradient: calloc'd zeros are never touched.
    dummy = np.zeros(window_shape, dtype=gy.dtype)
    with limited_threads(conv.threads):
        g = _api.conv2d_backward(gy, dummy, weight, conv.stride, conv.padding, conv.dilation,
                                 conv.groups, needs=("input",)).input
    out = np.zeros(shape, dtype=gy.dtype)
    (r0, r1, s0), (c0, c1, t0) = rows, cols
    out[:, :, r0:r1, c0:c1] = g[:, :, s0:s0 + r1 - r0, t0:t0 + c1 - c0]
    return out


def _partial_grads(gy, blocks, slices, weight, conv: _Conv):
    """(grad weight, grad bias) of one grad_output block; None where not needed."""
    if blocks is None:     # the block reads only padding
        gw = np.zeros(weight.shape, gy.dtype) if "weight" in conv.needs else None
        gb = gy.sum(axis=(0, 2, 3)) if "bias" in conv.needs else None
        return gw, gb
    with limited_threads(conv.threads):
        grads = _api.conv2d_backward(gy, _assemble(blocks, slices), weight, conv.stride,
                                     conv.padding, conv.dilation, conv.groups,
                                     needs=conv.needs)
    return grads.weight, grads.bias


def _add_partials(parts):
    """Sum (weight, bias) pairs in list order (fixed, so the result is reproducible)."""
    def total(values):
        return None if values[0] is None else functools.reduce(operator.add, values)
    return tuple(total([p[i] for p in parts]) for i in range(2))


# --- graph building -------------------------------------------------------------------

def _window(dsk, src, bn, rows, cols, strip_name, where, direct=None):
    """Keys and slices assembling src[block bn, :, r0:r1, c0:c1] from src's chunks (or, with
    `direct`, src's source on disk: a `_Direct` read by the task itself, no keys).

    A piece that is less than half of its block is cut out by its own task, so only the
    halo travels; larger pieces are sliced inside the consuming task.
    """
    if direct is not None:
        n = np.cumsum((0,) + src.chunks[0]).tolist()
        return _Direct(direct, (slice(n[bn], n[bn + 1]), slice(None), slice(*rows),
                                slice(*cols))), None
    hb = np.cumsum((0,) + src.chunks[2]).tolist()
    wb = np.cumsum((0,) + src.chunks[3]).tolist()
    keys, grid = [], []
    for ih, h0, h1 in _locate(hb, *rows):
        krow, srow = [], []
        for iw, w0, w1 in _locate(wb, *cols):
            key = (src.name, bn, 0, ih, iw)
            index = (slice(h0, h1), slice(w0, w1))
            if 2 * (h1 - h0) * (w1 - w0) < (hb[ih + 1] - hb[ih]) * (wb[iw + 1] - wb[iw]):
                strip = (strip_name,) + where + (ih, iw)
                dsk[strip] = (_cut, key) + index
                key, index = strip, (slice(None), slice(None))
            krow.append(key)
            srow.append(index)
        keys.append(krow)
        grid.append(tuple(srow))
    return keys, _Slices(tuple(grid))


def _array(name, dsk, dependencies, chunks, dtype):
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=dependencies)
    return da.Array(graph, name, chunks, meta=np.empty((0,) * len(chunks), dtype=dtype))


class _Prepared(NamedTuple):
    x: da.Array              # (N, C, H, W), float dtype, channels in one chunk, mode-padded
    weight: np.ndarray
    bias: Optional[np.ndarray]
    spec: object             # ConvSpec of the zero-padding convolution run on x
    batched: bool
    dtype: np.dtype
    mode: str
    mode_pads: tuple         # padding done by da.pad for a non-zero padding_mode
    input_chunks: tuple      # of the input before that padding
    threads: Optional[int]
    extra: dict              # extra operands, validated like the input (numpy ones converted)


def _check_known_chunks(name, value):
    if isinstance(value, da.Array) and any(np.isnan(c) for axis in value.chunks
                                           for c in axis):
        raise ValueError(f"{name} has unknown chunk sizes {value.chunks}; call "
                         f"{name}.compute_chunk_sizes() first")


def _shape(value, probe) -> tuple:
    return tuple(value.shape) if isinstance(value, da.Array) else probe.shape


def _as_dask(name, value, probe, batched, dtype, chunks) -> da.Array:
    """A 4-D dask array of `dtype` with all channels in one chunk."""
    if not isinstance(value, da.Array):
        value = da.from_array(probe if batched else probe[None], chunks=chunks)
    elif not batched:
        value = value[None]
    if value.dtype != dtype:
        value = value.astype(dtype)
    if len(value.chunks[1]) > 1:
        warnings.warn(f"{name} is chunked along channels {value.chunks[1]}; dilconv.dask "
                      f"needs all channels of a block together and rechunks them into one "
                      f"chunk (rechunk({{1: -1}}) yourself to avoid this warning)",
                      PerformanceWarning, stacklevel=4)
        value = value.rechunk({1: -1})
    return value


def _check_threads(threads_per_task):
    if threads_per_task is None:
        return None
    if isinstance(threads_per_task, bool) or not isinstance(threads_per_task,
                                                            numbers.Integral):
        raise TypeError(f"threads_per_task must be a positive int or None, got "
                        f"{threads_per_task!r}")
    if threads_per_task < 1:
        raise ValueError(f"threads_per_task must be >= 1, got {threads_per_task}")
    return int(threads_per_task)


def _prepare(input, weight, bias, stride, padding, dilation, groups, padding_mode,
             threads_per_task, extra=None) -> _Prepared:
    """Validate as the in-memory call does, on shapes and dtypes only (nothing computes)."""
    mode = _validate.check_padding_mode(padding_mode)
    extra = extra or {}
    lazy = {"input": input, **extra}
    for name, value in lazy.items():
        _check_known_chunks(name, value)
    probes, dtype = _validate.intake({"input": input, "weight": weight, "bias": bias,
                                      **extra}, lazy=tuple(lazy))
    shape = _shape(input, probes["input"])
    w = np.ascontiguousarray(probes["weight"])
    spec = _validate.make_spec(shape, w.shape, stride, padding, dilation, groups)
    _validate.check_mode_padding(spec.padding, mode, shape)
    b = None
    if bias is not None:
        if probes["bias"].shape != (spec.o,):
            raise ValueError(f"bias must have shape ({spec.o},) to match weight.shape[0], "
                             f"got shape {probes['bias'].shape}")
        b = np.ascontiguousarray(probes["bias"])
    threads = _check_threads(threads_per_task)
    batched = len(shape) == 4
    # numpy input: automatic chunks, channels together.
    x = _as_dask("input", input, probes["input"], batched, dtype,
                 {0: "auto", 1: -1, 2: "auto", 3: "auto"})
    input_chunks, mode_pads = x.chunks, ((0, 0), (0, 0))
    if mode != "zeros" and any(spec.padding[0] + spec.padding[1]):
        # As in memory: pad by the mode, then convolve with zero padding 0.
        mode_pads, x = spec.padding, _pad_spatial(x, spec.padding, mode)
        spec = _validate.make_spec(x.shape, w.shape, stride, 0, dilation, groups)
    probes = {name: (value, probes[name]) for name, value in extra.items()}
    return _Prepared(x, w, b, spec, batched, dtype, mode, mode_pads, input_chunks, threads,
                     probes)


def _spec_token(spec) -> tuple:
    return (spec.n, spec.c, spec.h, spec.w, spec.o, spec.kh, spec.kw, spec.stride,
            spec.dilation, spec.padding, spec.groups)


def _constants(token, weight, bias=None):
    """A graph holding weight and bias once (not once per task), and their keys."""
    wkey, bkey = "dilconv-weight-" + token, None
    dsk = {wkey: weight}
    if bias is not None:
        bkey = "dilconv-bias-" + token
        dsk[bkey] = bias
    return dsk, wkey, bkey


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
           padding_mode="zeros", *, threads_per_task=1, out=None):
    """`dilconv.conv2d` of a dask array, as a lazy dask array (or written into `out`).

    Parameters
    ----------
    input : dask.array.Array, (N, C, H, W) or (C, H, W)
        Chunked along N, H and/or W in any way; channels are rechunked into one chunk (with
        a PerformanceWarning) if split. A numpy array is wrapped with automatic chunks.
    weight, bias : array_like
        In memory (small); as in `dilconv.conv2d`.
    stride, padding, dilation, groups, padding_mode
        As in `dilconv.conv2d`; arguments are checked before the graph is built and raise
        the same errors.
    threads_per_task : int or None
        OpenMP threads of each block's kernel call (default 1; None: dilconv's setting).
    out : array-like, optional
        Where to write the result, block by block, without a lock: a zarr array whose
        chunks the output blocks are made of, a `MemmapArray` (any scheduler), or a numpy
        array (threaded scheduler only: other processes would write into copies). It needs
        the output's shape and dtype. Each task writes its block as soon as it is computed
        (the kernel writes in place where that region of a numpy array is contiguous, else
        into a buffer of the thread: a stripe at a time, each written while the next is
        computed, where a core is free for the writing (`STRIPE_BYTES`), else whole), so
        no output block travels through dask or stays in memory.

    Returns
    -------
    dask.array.Array (N, O, Ho, Wo) (or (O, Ho, Wo)), chunked like the input along N and
    split along H/W where the input is (each output goes with the input chunk its window is
    centred in: 'same' padding keeps the input's chunks). With `out`: a
    `dask.delayed.Delayed` whose ``.compute()`` (or ``dask.compute``) fills `out` and
    returns it.

    Examples
    --------
    >>> import numpy as np, dask.array as da, dilconv, dilconv.dask
    >>> x = da.random.default_rng(0).random((2, 3, 64, 64), chunks=(1, 3, 16, 32))
    >>> w = np.ones((4, 3, 3, 3))
    >>> y = dilconv.dask.conv2d(x, w, dilation=2, padding="same")
    >>> y.chunks
    ((1, 1), (4,), (16, 16, 16, 16), (32, 32))
    >>> bool(np.allclose(y.compute(), dilconv.conv2d(x.compute(), w, dilation=2,
    ...                                              padding="same")))
    True
    """
    p = _prepare(input, weight, bias, stride, padding, dilation, groups, padding_mode,
                 threads_per_task)
    x, spec = p.x, p.spec
    ax_h, ax_w = _axes(spec)
    out_h, out_w = ax_h.output_chunks(x.chunks[2]), ax_w.output_chunks(x.chunks[3])
    chunks = (x.chunks[0], (spec.o,), out_h, out_w)
    if out is not None:
        _check_store_target(out, chunks, p.dtype, p.batched)
    token = tokenize(x.name, p.weight, p.bias, _spec_token(spec), p.threads,
                     None if out is None else id(out))
    name, strips = "dilconv-conv2d-" + token, "dilconv-conv2d-halo-" + token
    dsk, wkey, bkey = _constants(token, p.weight, p.bias)
    direct = _direct_source(x)
    inputs = [] if direct is not None else [x]     # tasks read the file themselves
    for bn, (n0, n1) in enumerate(_ranges(x.chunks[0])):
        for bi, (a, b) in enumerate(_ranges(out_h)):
            r0, r1, pad_h = ax_h.window(a, b)
            for bj, (c, d) in enumerate(_ranges(out_w)):
                c0, c1, pad_w = ax_w.window(c, d)
                key = (name, bn, 0, bi, bj)
                shape = (n1 - n0, spec.o, b - a, d - c)
                conv = _Conv(spec.stride, (pad_h, pad_w), spec.dilation, spec.groups,
                             p.threads)
                keys = slices = None              # None: the block reads only padding
                if r1 > r0 and c1 > c0:
                    keys, slices = _window(dsk, x, bn, (r0, r1), (c0, c1), strips,
                                           (bn, bi, bj), direct)
                if out is not None:
                    region = (slice(n0, n1),) if p.batched else ()
                    region += (slice(None), slice(a, b), slice(c, d))
                    dsk[key] = (_store_block, keys, slices, wkey, bkey, conv,
                                _Store(out, region, shape, p.dtype))
                elif keys is None:
                    dsk[key] = (_bias_block, shape, p.dtype, bkey)
                else:
                    dsk[key] = (_forward_block, keys, slices, wkey, bkey, conv)
    return _result(name, dsk, inputs, chunks, p.dtype, p.batched, out)


def _result(name, dsk, inputs, chunks, dtype, batched, out):
    """The lazy output array of blocks `name`, or with `out` the Delayed that stores them."""
    if out is not None:
        final = name.replace("dilconv-", "dilconv-stored-", 1)
        dsk[final] = (_stored, [k for k in dsk if isinstance(k, tuple) and k[0] == name],
                      out)
        graph = HighLevelGraph.from_collections(final, dsk, dependencies=inputs)
        return Delayed(final, graph)
    y = _array(name, dsk, inputs, chunks, dtype)
    return y if batched else y[0]


def _check_store_target(out, chunks, dtype, batched):
    """`out` must take the output's shape and dtype, and its storage chunks must tile the
    output blocks (so that no two tasks write one stored chunk and no lock is needed)."""
    shape = tuple(sum(c) for c in chunks)
    if not batched:
        shape, chunks = shape[1:], chunks[1:]
    if not hasattr(out, "__setitem__") or not hasattr(out, "shape"):
        raise TypeError(f"out must be an array with item assignment (numpy, zarr, "
                        f"MemmapArray), got {type(out).__name__}")
    if tuple(out.shape) != shape:
        raise ValueError(f"out must have shape {shape}, got {tuple(out.shape)}")
    if np.dtype(getattr(out, "dtype", dtype)) != dtype:
        raise TypeError(f"out must have dtype {np.dtype(dtype).name}, got "
                        f"{np.dtype(out.dtype).name}")
    # A sharded zarr array is written a shard at a time.
    stored = getattr(out, "shards", None) or getattr(out, "chunks", None)
    if stored is None or isinstance(out, np.ndarray):
        return
    for axis, (step, sizes) in enumerate(zip(tuple(stored), chunks)):
        cuts = np.cumsum(sizes)[:-1]
        if np.any(cuts % step):
            raise ValueError(f"out's chunks {tuple(stored)} do not tile the output blocks "
                             f"{tuple(len(c) for c in chunks)} along axis {axis} (block "
                             f"edges {cuts.tolist()}): rechunk the input to multiples of "
                             f"out's chunks, or use da.store(y, out, lock=True)")


# --- a chain of convolutions, fused per output block -------------------------------------

ACTIVATIONS = {"relu": lambda y: np.maximum(y, 0, out=y)}


@dataclass(frozen=True)
class _Layer:
    """One step of a fused block: the layer's output shape and its call's arguments."""

    index: int           # which layer (its weight and bias keys)
    shape: tuple         # (N, O, rows, cols) this block computes of the layer's output
    dtype: np.dtype
    conv: Optional[_Conv]    # None: its window reads only padding (the bias everywhere)


def _chain_block(blocks, slices, params, steps, activation, store=None):
    """All layers of a chain on one block: each layer computes the part of its output the
    later layers read (the chain's halo is recomputed, not exchanged), in this thread's
    buffers, so a task holds one block's activations and nothing waits between layers."""
    x = None if blocks is None else _assemble(blocks, slices, planes=True)
    for i, step in enumerate(steps):
        dtype = step.dtype
        weight, bias = params[step.index]
        last = i == len(steps) - 1
        if not last:
            y = _scratch(f"chain-{i % 2}", step.shape, dtype)
        elif store is not None:
            y, in_place = _store_buffer(store)
        else:
            y = np.empty(step.shape, dtype)
        if step.conv is None:
            _bias_block(step.shape, dtype, bias, y)
        else:
            _conv_call(x, weight, bias, step.conv, out=y)
        if not last and activation is not None:
            y = activation(y)
        x = y
    if store is None:
        return x
    _store_put(store, x, in_place)
    return None


def _check_layers(layers):
    """[(weight, bias, dilation, padding)] from `layers`' (weight, bias[, dilation[,
    padding]]) items."""
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__len__") or not layers:
        raise ValueError(f"layers must be a non-empty sequence of (weight, bias[, dilation[, "
                         f"padding]]) tuples, got {layers!r:.80}")
    out = []
    for i, layer in enumerate(layers):
        if not isinstance(layer, (tuple, list)) or not 2 <= len(layer) <= 4:
            raise ValueError(f"layers[{i}] must be a (weight, bias[, dilation[, padding]]) "
                             f"tuple, got {type(layer).__name__} {layer!r:.80}")
        weight, bias, dilation, padding = tuple(layer) + (1, "same")[len(layer) - 2:]
        out.append((weight, bias, dilation, padding))
    return out


def conv2d_chain(input, layers, *, activation=None, threads_per_task=1, out=None):
    """A chain of stride-1 `dilconv.conv2d` layers (zero padding) of a dask array, fused:
    one task per output block runs every layer on the window the block reads through the
    whole chain, so memory is bounded by the blocks, not by the image's height.

    A graph of one `conv2d` per layer instead makes the scheduler hold bands of every layer
    at once (more the taller the image). Here each layer recomputes the rows and columns its
    block's neighbours also compute (the chain's halo: the sum of ``dilation * (k - 1) //
    2`` over the layers on each side), which costs little when the blocks are large against
    the halo: tiles of, say, 512 x 512 pixels for a halo of 33, rather than thin bands.

    Parameters
    ----------
    input : dask.array.Array, (N, C, H, W) or (C, H, W)
        As in `conv2d`; its chunks are the output blocks ('same' padding).
    layers : sequence of (weight, bias[, dilation[, padding]])
        Applied in order; `bias` may be None, `dilation` defaults to 1 and `padding` to
        'same' (any zero padding of `dilconv.conv2d`).
    activation : None, 'relu' or callable
        Applied between layers (not after the last), elementwise: a callable gets a numpy
        array it may overwrite and returns the result (e.g. ``lambda y: np.tanh(y, out=y)``).
    threads_per_task, out
        As in `conv2d` (out: the last layer's output).

    Returns
    -------
    As `conv2d`: a lazy dask array, or with `out` a `dask.delayed.Delayed`.

    Examples
    --------
    >>> import numpy as np, dask.array as da, dilconv, dilconv.dask
    >>> x = da.random.default_rng(0).random((1, 2, 64, 64), chunks=(1, 2, 32, 32))
    >>> layers = [(np.ones((3, 2, 3, 3)) / 18, None, 1), (np.ones((2, 3, 3, 3)) / 27,
    ...           np.zeros(2), 4)]
    >>> y = dilconv.dask.conv2d_chain(x, layers, activation="relu")
    >>> ref = x.compute()
    >>> for i, (w, b, d) in enumerate(layers):
    ...     ref = dilconv.conv2d(ref, w, b, dilation=d, padding="same")
    ...     ref = np.maximum(ref, 0) if i == 0 else ref
    >>> y.chunks, bool(np.allclose(y.compute(), ref))
    (((1,), (2,), (32, 32), (32, 32)), True)
    """
    if activation is not None and not callable(activation):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be None, a callable or one of "
                             f"{sorted(ACTIVATIONS)}, got {activation!r}")
        activation = ACTIVATIONS[activation]
    preps, x = [], input
    for i, (weight, bias, dilation, padding) in enumerate(_check_layers(layers)):
        try:
            p = _prepare(x, weight, bias, 1, padding, dilation, 1, "zeros", threads_per_task)
        except (TypeError, ValueError) as e:
            raise type(e)(f"layers[{i}]: {e}") from None
        preps.append(p)
        # A stand-in of the layer's output for checking the next layer (nothing computes).
        spec = p.spec
        shape = spec.output_shape if p.batched else spec.output_shape[1:]
        x = da.zeros(shape, dtype=p.dtype, chunks=-1)
    first, last = preps[0], preps[-1]
    src = first.x
    axes = [_axes(p.spec) for p in preps]
    out_h, out_w = src.chunks[2], src.chunks[3]
    for ax_h, ax_w in axes:
        out_h, out_w = ax_h.output_chunks(out_h), ax_w.output_chunks(out_w)
    chunks = (src.chunks[0], (last.spec.o,), out_h, out_w)
    if out is not None:
        _check_store_target(out, chunks, last.dtype, last.batched)
    token = tokenize(src.name, [(p.weight, p.bias, _spec_token(p.spec)) for p in preps],
                     activation, first.threads, None if out is None else id(out))
    name, strips = "dilconv-chain-" + token, "dilconv-chain-halo-" + token
    dsk = {}
    direct = _direct_source(src)
    inputs = [] if direct is not None else [src]   # tasks read the file themselves
    params = []
    for i, p in enumerate(preps):
        layer, wkey, bkey = _constants(f"{token}-{i}", p.weight, p.bias)
        dsk.update(layer)
        params.append([wkey, bkey])
    for bn, (n0, n1) in enumerate(_ranges(src.chunks[0])):
        for bi, (a, b) in enumerate(_ranges(out_h)):
            for bj, (c, d) in enumerate(_ranges(out_w)):
                steps, rows, cols = [], (a, b), (c, d)
                for i in reversed(range(len(preps))):     # from the output back
                    ax_h, ax_w = axes[i]
                    r0, r1, pad_h = ax_h.window(*rows)
                    c0, c1, pad_w = ax_w.window(*cols)
                    shape = (n1 - n0, preps[i].spec.o, rows[1] - rows[0], cols[1] - cols[0])
                    if r1 <= r0 or c1 <= c0:       # reads only padding: the bias
                        steps.append(_Layer(i, shape, preps[i].dtype, None))
                        break
                    steps.append(_Layer(i, shape, preps[i].dtype,
                                        _Conv((1, 1), (pad_h, pad_w), preps[i].spec.dilation,
                                              1, first.threads)))
                    rows, cols = (r0, r1), (c0, c1)
                keys = slices = None
                if steps[-1].conv is not None:
                    keys, slices = _window(dsk, src, bn, rows, cols, strips, (bn, bi, bj),
                                           direct)
                key = (name, bn, 0, bi, bj)
                task = (_chain_block, keys, slices, params, tuple(steps[::-1]), activation)
                if out is not None:
                    region = (slice(n0, n1),) if last.batched else ()
                    region += (slice(None), slice(a, b), slice(c, d))
                    task += (_Store(out, region, steps[0].shape, last.dtype),)
                dsk[key] = task
    return _result(name, dsk, inputs, chunks, last.dtype, last.batched, out)


def conv2d_backward(grad_output, input, weight, stride=1, padding=0, dilation=1, groups=1,
                    padding_mode="zeros", *, needs=("input", "weight", "bias"),
                    threads_per_task=1, split_every=8) -> _api.Conv2dGrads:
    """`dilconv.conv2d_backward` of dask arrays, as lazy dask arrays.

    Parameters
    ----------
    grad_output : dask.array.Array (or numpy array)
        The forward output's shape, any chunking (its N chunks are matched to the input's).
    input : dask.array.Array
        As given to `conv2d`.
    weight, stride, padding, dilation, groups, padding_mode, needs, threads_per_task
        As in `dilconv.conv2d_backward` and `conv2d`.
    split_every : int
        Fan-in of the tree that adds the per-block weight and bias gradients (in block order).

    Returns
    -------
    Conv2dGrads(input, weight, bias) of dask arrays (None where not asked for). The input
    gradient is chunked like the input; compute them together (``dask.compute(*grads)``) to
    share the work.

    Examples
    --------
    >>> import numpy as np, dask, dask.array as da, dilconv, dilconv.dask
    >>> x = da.ones((1, 1, 4, 4), chunks=(1, 1, 2, 2))
    >>> g = dilconv.dask.conv2d_backward(da.ones((1, 1, 2, 2)), x, np.ones((1, 1, 2, 2)),
    ...                                  dilation=2)
    >>> gx, gw, gb = dask.compute(*g)
    >>> gb, gw[0, 0]
    (array([4.]), array([[4., 4.],
           [4., 4.]]))
    """
    needs = _validate.check_needs(needs)
    if isinstance(split_every, bool) or not isinstance(split_every, numbers.Integral) \
            or split_every < 2:
        raise ValueError(f"split_every must be an int >= 2, got {split_every!r}")
    p = _prepare(input, weight, None, stride, padding, dilation, groups, padding_mode,
                 threads_per_task, extra={"grad_output": grad_output})
    x, spec = p.x, p.spec
    gy_value, gy_probe = p.extra["grad_output"]
    # (Padding by the mode first leaves the output shape unchanged.)
    expected = spec.output_shape if p.batched else spec.output_shape[1:]
    if _shape(gy_value, gy_probe) != expected:
        raise ValueError(f"grad_output must have shape {expected}, got "
                         f"{_shape(gy_value, gy_probe)}")
    ax_h, ax_w = _axes(spec)
    # numpy grad_output: chunked as conv2d's output would be.
    gy = _as_dask("grad_output", gy_value, gy_probe, p.batched, p.dtype,
                  (x.chunks[0], (spec.o,), ax_h.output_chunks(x.chunks[2]),
                   ax_w.output_chunks(x.chunks[3])))
    if gy.chunks[0] != x.chunks[0]:
        gy = gy.rechunk({0: x.chunks[0]})
    token = tokenize(x.name, gy.name, p.weight, _spec_token(spec), sorted(needs), p.threads,
                     split_every)
    grad_input = grad_weight = grad_bias = None
    if "input" in needs:
        grad_input = _grad_input_graph(token, x, gy, p)
        if p.mode != "zeros":
            grad_input = _fold_spatial(grad_input, p.mode_pads, p.mode, p.input_chunks)
        if not p.batched:
            grad_input = grad_input[0]
    param_needs = tuple(n for n in ("weight", "bias") if n in needs)
    if param_needs:
        graph, root = _partials_graph(token, x, gy, p, param_needs, split_every)
        if "weight" in needs:
            name = "dilconv-grad-weight-" + token
            grad_weight = _array(name, {(name, 0, 0, 0, 0): (operator.getitem, root, 0)},
                                 [graph], tuple((s,) for s in p.weight.shape), p.dtype)
        if "bias" in needs:
            name = "dilconv-grad-bias-" + token
            grad_bias = _array(name, {(name, 0): (operator.getitem, root, 1)}, [graph],
                               ((spec.o,),), p.dtype)
    return _api.Conv2dGrads(grad_input, grad_weight, grad_bias)


class _Graph:
    """A bare dask collection around a graph, so another layer can depend on it."""

    def __init__(self, graph):
        self.graph = graph

    def __dask_graph__(self):
        return self.graph

    def __dask_layers__(self):
        return tuple(self.graph.layers)


def _grad_input_graph(token, x, gy, p) -> da.Array:
    """Each input block gathers the grad_output rows/columns whose windows overlap it."""
    spec = p.spec
    ax_h, ax_w = _axes(spec)
    name = "dilconv-grad-input-" + token
    strips = "dilconv-grad-input-halo-" + token
    dsk, wkey, _ = _constants(token, p.weight)
    for bn, nb in enumerate(x.chunks[0]):
        for bi, (r0, r1) in enumerate(_ranges(x.chunks[2])):
            ja, jb = ax_h.readers(r0, r1)
            l0, l1, pad_h = ax_h.window(ja, jb)
            for bj, (c0, c1) in enumerate(_ranges(x.chunks[3])):
                ka, kb = ax_w.readers(c0, c1)
                m0, m1, pad_w = ax_w.window(ka, kb)
                key = (name, bn, 0, bi, bj)
                shape = (nb, spec.c, r1 - r0, c1 - c0)
                if ja == jb or ka == kb:       # no output reads this block
                    dsk[key] = (np.zeros, shape, p.dtype)
                    continue
                keys, slices = _window(dsk, gy, bn, (ja, jb), (ka, kb), strips, (bn, bi, bj))
                conv = _Conv(spec.stride, (pad_h, pad_w), spec.dilation, spec.groups,
                             p.threads)
                # Overlap of block and gradient window: block rows [from, to), window row.
                rows = (max(r0, l0) - r0, min(r1, l1) - r0, max(r0, l0) - l0)
                cols = (max(c0, m0) - c0, min(c1, m1) - c0, max(c0, m0) - m0)
                dsk[key] = (_grad_input_block, keys, slices, wkey, conv,
                            (nb, spec.c, l1 - l0, m1 - m0), shape, rows, cols)
    return _array(name, dsk, [x, gy], x.chunks, p.dtype)


def _partials_graph(token, x, gy, p, needs, split_every):
    """Per grad_output block (weight, bias) partial sums, then a fixed-order tree sum.

    Returns the graph (as a collection) and the key of the final (weight, bias) pair.
    """
    spec = p.spec
    ax_h, ax_w = _axes(spec)
    name = "dilconv-grad-partial-" + token
    strips = "dilconv-grad-partial-halo-" + token
    dsk, wkey, _ = _constants(token, p.weight)
    partials = []
    for bn in range(len(gy.chunks[0])):
        for bi, (a, b) in enumerate(_ranges(gy.chunks[2])):
            r0, r1, pad_h = ax_h.window(a, b)
            for bj, (c, d) in enumerate(_ranges(gy.chunks[3])):
                c0, c1, pad_w = ax_w.window(c, d)
                key = (name, bn, bi, bj)
                conv = _Conv(spec.stride, (pad_h, pad_w), spec.dilation, spec.groups,
                             p.threads, needs)
                keys = slices = None           # None: the block reads only padding
                if r1 > r0 and c1 > c0:
                    keys, slices = _window(dsk, x, bn, (r0, r1), (c0, c1), strips,
                                           (bn, bi, bj))
                dsk[key] = (_partial_grads, (gy.name, bn, 0, bi, bj), keys, slices, wkey,
                            conv)
                partials.append(key)
    level = 0
    while len(partials) > 1:
        groups = [partials[i:i + split_every] for i in range(0, len(partials), split_every)]
        partials = []
        for i, group in enumerate(groups):
            key = ("dilconv-grad-sum-" + token, level, i)
            dsk[key] = (_add_partials, group)
            partials.append(key)
        level += 1
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[x, gy])
    return _Graph(graph), partials[0]


# --- non-zero padding modes: pad with da.pad, fold the gradient back --------------------

def _pad_spatial(x: da.Array, pads: tuple, mode: str) -> da.Array:
    return da.pad(x, ((0, 0), (0, 0)) + tuple(pads), mode=PAD_MODES[mode])


def _fold_axis(g: da.Array, axis: int, lo: int, hi: int, size: int, mode: str,
               chunks: tuple) -> da.Array:
    """Adjoint of padding `axis` by (lo, hi) in `mode`: add each padded position's
    gradient to the input position it copies."""
    if lo == hi == 0:
        return g
    source = _padding.source_index(size, lo, hi, mode)

    def take(start, stop):
        index = [slice(None)] * g.ndim
        index[axis] = slice(start, stop)
        return g[tuple(index)]

    targets = {}
    for pos in list(range(lo)) + list(range(lo + size, lo + size + hi)):
        targets.setdefault(int(source[pos]), []).append(pos)
    pieces, start = [], 0
    for t in sorted(targets):
        if t > start:
            pieces.append(take(lo + start, lo + t))
        row = take(lo + t, lo + t + 1)
        for pos in targets[t]:
            row = row + take(pos, pos + 1)
        pieces.append(row)
        start = t + 1
    if start < size:
        pieces.append(take(lo + start, lo + size))
    return da.concatenate(pieces, axis=axis).rechunk({axis: chunks})


def _fold_spatial(g: da.Array, pads: tuple, mode: str, chunks: tuple) -> da.Array:
    """Gradient of the unpadded input (chunked as `chunks`) from the gradient of
    `_pad_spatial`'s result."""
    for axis, (lo, hi) in zip((2, 3), pads):
        g = _fold_axis(g, axis, lo, hi, g.shape[axis] - lo - hi, mode, chunks[axis])
    return g


# --- arrays on disk, read in place; block sizes from a memory budget ---------------------

class MemmapArray:
    """A raw or ``.npy`` file seen as an array without reading it: small and picklable, so
    the tasks on any worker map the file themselves.

    ``a[index]`` is a read-only view of the file (no copy: the view holds its pages only
    while it lives), ``a.read_into(index)`` a copy read with pread; ``a[index] = value``
    writes to the file (rows with pwrite). `dilconv.dask.from_npy` / `from_raw` wrap one in
    a dask array; as `conv2d`'s `out` it receives the output blocks from any scheduler.

    >>> import numpy as np, tempfile, os, dilconv.dask
    >>> path = os.path.join(tempfile.mkdtemp(), "y.npy")
    >>> y = dilconv.dask.MemmapArray.create_npy(path, (2, 3), np.float32)
    >>> y[1] = [1, 2, 3]
    >>> np.load(path)
    array([[0., 0., 0.],
           [1., 2., 3.]], dtype=float32)
    """

    def __init__(self, path, shape, dtype, offset=0, order="C"):
        self.path, self.shape, self.dtype = os.fspath(path), tuple(shape), np.dtype(dtype)
        self.offset, self.order, self.ndim = int(offset), order, len(self.shape)

    @classmethod
    def open_npy(cls, path) -> "MemmapArray":
        """The array stored in the ``.npy`` file `path` (only its header is read)."""
        # Mapping reads the header only (and raises for object arrays).
        mapped = np.load(path, mmap_mode="r")
        order = "F" if mapped.flags.f_contiguous and not mapped.flags.c_contiguous else "C"
        return cls(path, mapped.shape, mapped.dtype, mapped.offset, order)

    @classmethod
    def create_npy(cls, path, shape, dtype) -> "MemmapArray":
        """A new ``.npy`` file of zeros (sparse: no data is written) for `shape`, `dtype`.

        Its header is padded (with spaces, as the format allows) so that the data starts
        at 4096 bytes: page-aligned rows can then be written with O_DIRECT.
        """
        dtype, shape = np.dtype(dtype), tuple(int(s) for s in shape)
        header = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                       "shape": shape})
        prefix = np.lib.format.magic(1, 0)
        length = PAGE - len(prefix) - 2
        if len(header) + 1 > length:                 # a huge shape: numpy's own layout
            np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
            return cls.open_npy(path)
        with open(path, "wb") as f:
            f.write(prefix + length.to_bytes(2, "little")
                    + (header.ljust(length - 1) + "\n").encode("latin1"))
            f.truncate(PAGE + math.prod(shape) * dtype.itemsize)
        return cls.open_npy(path)

    def _map(self, mode):
        return np.memmap(self.path, self.dtype, mode, self.offset, self.shape, self.order)

    def __getitem__(self, index):
        return self._map("r")[index]

    def _runs(self, view, mapped):
        """(index, byte offset in the file) of each run of contiguous bytes of `view` (a
        view of `mapped`), or None where runs are shorter than IO_RUN_BYTES (or the file
        is in Fortran order): then a copy through the mapping costs less than a system call
        per run."""
        tail = _contiguous_tail(view)
        run = math.prod(view.shape[view.ndim - tail:]) * view.itemsize
        if self.order != "C" or run < IO_RUN_BYTES:
            return None
        return [(lead, self.offset + view[lead].ctypes.data - mapped.ctypes.data)
                for lead in np.ndindex(view.shape[:view.ndim - tail])]

    def read_into(self, index, slot=None):
        """``self[index]`` copied into a new array or (slot) this thread's buffer of that
        name, read with pread (on an AVX-512 EPYC under KVM, less CPU than copying
        through a mapping, whose pages each task's mapping faults in afresh): a task's
        window where a view of the mapping costs more (see WINDOW_VIEWS)."""
        mapped = self._map("r")
        view = mapped[index]
        out = np.empty(view.shape, self.dtype) if slot is None else _scratch(slot, view.shape,
                                                                              self.dtype)
        runs = self._runs(view, mapped)
        if runs is None:
            np.copyto(out, view)
            return out
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for lead, at in runs:
                if not _read(fd, memoryview(out[lead]).cast("B"), at):
                    raise ValueError(f"{self.path} is shorter than its shape {self.shape}")
        finally:
            os.close(fd)
        return out

    def __setitem__(self, index, value):
        mapped = self._map("r+")
        view = mapped[index]
        runs = self._runs(view, mapped)
        if runs is None:
            view[...] = value
            return
        # Written with pwrite, not through the mapping: a store into a mapped page that
        # is not yet in the page cache faults, which costs more than the copy (5x here).
        # Aligned runs bypass the page cache (O_DIRECT): putting new data into the cache
        # cost 1.3-2.4 CPU seconds per GiB on a VM that hands freed memory back to its
        # host, 0.04 s direct; the output is not read again by the job.
        value = np.broadcast_to(np.asarray(value, dtype=self.dtype), view.shape)
        fds = {}
        try:
            for lead, at in runs:
                source = np.ascontiguousarray(value[lead])
                direct = DIRECT and (at | source.ctypes.data | source.nbytes) % DIRECT_ALIGN == 0
                _write(self.path, fds, direct, memoryview(source).cast("B"), at)
        finally:
            for fd in fds.values():
                os.close(fd)

    def __array__(self, dtype=None, copy=None):
        return np.array(self._map("r"), dtype=dtype)

    def __dask_tokenize__(self):
        stat = os.stat(self.path)
        return (type(self).__name__, os.path.realpath(self.path), stat.st_mtime_ns,
                stat.st_size, self.shape, self.dtype.str, self.offset, self.order)

    def __repr__(self):
        return (f"MemmapArray({self.path!r}, shape={self.shape}, dtype={self.dtype.name}, "
                f"offset={self.offset})")


# Runs of at least this many contiguous bytes are read and written with pread / pwrite.
IO_RUN_BYTES = 64 * 1024
# O_DIRECT needs the address, length and file offset aligned to the device's logical block
# (512 bytes on common disks; 4096 covers the others).
DIRECT = getattr(os, "O_DIRECT", 0)
DIRECT_ALIGN = 4096


def _write(path, fds: dict, direct: bool, data: memoryview, at: int) -> None:
    """pwrite all of `data` at `at`, with O_DIRECT if asked and the file system allows."""
    if direct and "direct" not in fds:
        try:
            fds["direct"] = os.open(path, os.O_WRONLY | DIRECT)
        except OSError:                          # e.g. tmpfs: no O_DIRECT
            fds["direct"] = None
    fd = fds.get("direct") if direct else None
    if fd is None:
        if "buffered" not in fds:
            fds["buffered"] = os.open(path, os.O_WRONLY)
            # Writers of one file take turns, sleeping: in the kernel they would contend
            # for the file's lock by spinning, which cost as much CPU as the writes.
            if fcntl is not None:
                fcntl.flock(fds["buffered"], fcntl.LOCK_EX)
        fd = fds["buffered"]
    while data:
        try:
            done = os.pwrite(fd, data, at)
        except OSError:
            if fd != fds.get("direct"):
                raise
            os.close(fd)                         # refused (alignment): write buffered
            fds["direct"], fd = None, fds.get("buffered") or os.open(path, os.O_WRONLY)
            fds["buffered"] = fd
            continue
        data, at = data[done:], at + done


def _read(fd: int, data: memoryview, at: int) -> bool:
    """pread all of `data` from `at`; False where the file ends first."""
    while data:
        done = os.preadv(fd, [data], at)
        if not done:
            return False
        data, at = data[done:], at + done
    return True


def _contiguous_tail(view) -> int:
    """How many trailing axes of `view` form one C-contiguous run."""
    tail, step = 0, view.itemsize
    for size, stride in zip(view.shape[::-1], view.strides[::-1]):
        if size != 1 and stride != step:
            break
        tail, step = tail + 1, step * size
    return tail


def from_npy(path, chunks=None) -> da.Array:
    """A ``.npy`` file as a dask array whose blocks are views of the file: no copy.

    ``da.from_array(np.load(path, mmap_mode="r"), ...)`` reads and copies the whole file
    into anonymous memory before anything computes (dask 2026.8); this does not. `chunks`
    as in `dask.array.from_array`; None: `block_chunks` of a 1 GiB budget (4-D arrays).

    >>> import numpy as np, tempfile, os, dilconv.dask
    >>> path = os.path.join(tempfile.mkdtemp(), "x.npy")
    >>> np.save(path, np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4))
    >>> x = dilconv.dask.from_npy(path, chunks=(1, 2, 1, 4))
    >>> x.chunks, float(x.sum().compute())
    (((1,), (2,), (1, 1, 1), (4,)), 276.0)
    """
    return _from_memmap(MemmapArray.open_npy(path), chunks)


def from_raw(path, shape, dtype, offset=0, chunks=None) -> da.Array:
    """A raw C-order file (`shape`, `dtype`, data at byte `offset`) as a dask array whose
    blocks are views of the file: no copy. `chunks` as in `from_npy`."""
    return _from_memmap(MemmapArray(path, shape, dtype, offset), chunks)


def _from_memmap(source: MemmapArray, chunks) -> da.Array:
    if chunks is None:
        chunks = block_chunks(source.shape, source.dtype) if source.ndim == 4 else "auto"
    return da.from_array(source, chunks=chunks, lock=False, asarray=False,
                         meta=np.empty((0,) * source.ndim, source.dtype))


# Blocks alive per task at once: the input block, its window, the output block, and the
# neighbours kept for their halos or read ahead by the scheduler.
BLOCKS_PER_TASK = 6
# Blocks the scheduler holds for each further layer of a chain: the bands the next layer's
# windows read and those read ahead. Measured on the 7-layer context module: about six per
# layer for 2048 rows, but more for taller images (about 12 for 8192, 19 for 16384 rows):
# dask's ordering does not keep one wavefront through all layers.
BLOCKS_PER_LAYER = 6
# glibc maps allocations above 32 MiB (its largest threshold) anew every time, so every
# such block (and a reader's decoded chunks) would pay a page fault per page: stay well
# below.
MAX_BLOCK_BYTES = 16 * 1024 ** 2


def block_chunks(shape, dtype, memory_budget=1024 ** 3, *, tasks=None, layers=1,
                 storage_chunks=None, halo=0, streamed=False) -> tuple:
    """Chunks for an (N, C, H, W) array so that a graph of `layers` convolutions run by
    `tasks` concurrent tasks stays in `memory_budget`.

    Blocks of at most ``budget / 2 / (tasks * BLOCKS_PER_TASK + (layers - 1) *
    BLOCKS_PER_LAYER)`` bytes (half the budget is left to the interpreters, libraries and
    transfers) and MAX_BLOCK_BYTES, all channels together, in bands of full
    rows: a band's halo comes from the bands above and below, so the scheduler holds bands
    (a few per layer; more on tall images) rather than rows of tiles (a 2-D grid makes it
    hold about two rows of tiles per layer), and less memory the thinner they are. Tiles only where not even one
    band fits, as few rows high as the storage allows. Along H and W they are multiples of
    `storage_chunks` (a zarr array's chunks), so every stored chunk is read and written by
    one task. `tasks` defaults to the CPU count; size `shape` by the widest array in the
    graph (a chain's hidden layers).

    ``halo > 0``: blocks for `conv2d_chain`, whose tasks each hold the window of their
    block widened by `halo` on every side (the chain's reach), for every layer: tiles at
    least ``HALO_ROWS * halo`` rows high (so the recomputed halo is a small part), as wide
    as the window's budget (``budget / 2 / (tasks * BLOCKS_PER_TASK)``) allows; a row of
    such tiles is what the scheduler holds of the input.

    ``streamed=True``: for one `conv2d(..., out=)` whose tasks read their input from a file
    or raw zarr store themselves (`from_npy`, `from_raw`, `from_zarr` of an uncompressed
    array, not sliced) and write into a `MemmapArray`, `RawZarrArray` or numpy `out`: no
    block is then a dask array or a fresh allocation, so blocks are bounded by the budget
    alone, not by MAX_BLOCK_BYTES (zarr's own codec pipeline copies each block it writes). Larger blocks are written in fewer, larger requests, and
    in stripes that keep a free core writing (on the 4.3 GB bench layer one worker took
    0.65x the time and 0.8x the CPU with blocks of 85 MiB instead of 16).

    >>> import dilconv.dask
    >>> dilconv.dask.block_chunks((1, 4, 16384, 16384), "float32", tasks=2)
    (1, 4, 64, 16384)
    >>> dilconv.dask.block_chunks((1, 16, 16384, 16384), "float32", tasks=2, layers=7)
    (1, 16, 10, 16384)
    >>> dilconv.dask.block_chunks((1, 4, 16384, 16384), "float32", tasks=2,
    ...                           storage_chunks=(1, 4, 512, 512))
    (1, 4, 512, 2048)
    >>> dilconv.dask.block_chunks((1, 16, 16384, 16384), "float32", tasks=2, halo=33)
    (1, 16, 264, 2052)
    """
    n, c, h, w = (int(s) for s in shape)
    item = np.dtype(dtype).itemsize
    tasks = tasks or os.cpu_count() or 1
    if halo > 0:
        return _fused_chunks(c, h, w, item, memory_budget, tasks, storage_chunks, int(halo))
    alive = tasks * BLOCKS_PER_TASK + max(0, layers - 1) * BLOCKS_PER_LAYER
    largest = memory_budget // 2 // alive
    if not streamed:
        largest = min(MAX_BLOCK_BYTES, largest)
    pixels = max(1, largest // (max(1, c) * item))
    step_h, step_w = (1, 1) if storage_chunks is None else tuple(storage_chunks)[2:4]
    rows = pixels // max(1, w)
    if rows >= step_h or w <= step_w:
        rows, cols = max(step_h, rows - rows % step_h), w
    else:                       # as few rows as the storage allows: the memory held grows
        rows = step_h           # with the rows of a row of tiles
        cols = min(w, max(step_w, pixels // rows - pixels // rows % step_w))
    return (1, c, min(rows, max(1, h)), cols)


# A fused chain's tiles are at least this many halos high: the layers then recompute at
# most about 2 / HALO_ROWS more rows than they output.
HALO_ROWS = 8


def _fused_chunks(c, h, w, item, budget, tasks, storage_chunks, halo) -> tuple:
    window = max(1, budget // 2 // (tasks * BLOCKS_PER_TASK) // (max(1, c) * item))
    step_h, step_w = (1, 1) if storage_chunks is None else tuple(storage_chunks)[2:4]
    rows = min(h, -(-HALO_ROWS * halo // step_h) * step_h)
    cols = max(1, window // (rows + 2 * halo) - 2 * halo)
    cols = w if cols >= w else max(step_w, cols - cols % step_w)
    return (1, c, max(1, rows), min(w, cols))


# --- a zarr store that writes chunks past the page cache --------------------------------

def _put_direct(path, data: memoryview) -> None:
    """Write `data` to the file `path` (atomically: a temporary file, then renamed), its
    4096-byte-aligned part with O_DIRECT."""
    import uuid
    data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
    head = len(data) - len(data) % DIRECT_ALIGN if DIRECT else 0
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.{uuid.uuid4().hex}.partial"
    fds = {}
    create = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    try:
        if head:
            aligned = np.frombuffer(data[:head], np.uint8)
            if aligned.ctypes.data % DIRECT_ALIGN:      # O_DIRECT needs an aligned buffer
                aligned = _scratch("direct-write", (head,), np.uint8)
                aligned[...] = np.frombuffer(data[:head], np.uint8)
            try:                # created for O_DIRECT: one open fewer per chunk
                fds["direct"] = os.open(partial, create | DIRECT, 0o644)
            except OSError:                      # e.g. tmpfs: no O_DIRECT
                fds["direct"], fds["buffered"] = None, os.open(partial, create, 0o644)
            _write(partial, fds, True, memoryview(aligned), 0)
        else:
            fds["buffered"] = os.open(partial, create, 0o644)
        if len(data) > head:
            _write(partial, fds, False, data[head:], head)
    except BaseException:
        for fd in fds.values():
            if fd is not None:
                os.close(fd)
        os.unlink(partial)
        raise
    for fd in fds.values():
        if fd is not None:
            os.close(fd)
    os.replace(partial, path)


try:
    from zarr.storage import LocalStore as _LocalStore
except ImportError:                          # zarr is optional
    _LocalStore = None

if _LocalStore is not None:
    class DirectStore(_LocalStore):
        """zarr's `LocalStore`, writing each chunk past the page cache (O_DIRECT).

        A job that writes a large array does not read it again: giving every new chunk
        fresh page-cache pages is most of the CPU such a write costs (1.3-2.4 CPU seconds
        per GiB on a VM that hands freed memory back to its host; 0.04 s direct). The
        store on disk is an ordinary zarr store, read by any zarr. Where the file system
        refuses O_DIRECT (tmpfs), writes are ordinary ones.

        >>> import numpy as np, tempfile, zarr, dilconv.dask
        >>> store = dilconv.dask.DirectStore(tempfile.mkdtemp())
        >>> z = zarr.create_array(store, shape=(4, 1024), chunks=(2, 1024), dtype="f4")
        >>> z[...] = 1.5
        >>> float(zarr.open_array(store.root, mode="r")[...].sum())
        6144.0
        """

        async def set(self, key, value) -> None:
            import asyncio
            if not self._is_open:
                await self._open()
            self._check_writable()
            await asyncio.to_thread(_put_direct, os.path.join(self.root, key),
                                    memoryview(value.as_buffer_like()))

    __all__.append("DirectStore")


# --- uncompressed zarr arrays, read and written chunk file by chunk file ------------------

class _ChunkRows:
    """Stored chunks read by one task, for its next windows: the column stripes of a block
    (`_store_striped`) share their halos, so a chunk that one stripe's window overlaps,
    the next stripe's overlaps too. Each chunk is read once per task instead of once per
    window (three times on the bench layer): its whole rows (a plane is then one run)
    into a buffer of this thread, or mapped; `keep` drops the chunks the current window
    leaves behind."""

    def __init__(self):
        self.entries = {}           # chunk index -> (first row, stop row, slot or mapping)
        self.free, self.made = [], 0

    def _drop(self, chunk) -> None:
        held = self.entries.pop(chunk)[2]
        if isinstance(held, str):               # a buffer slot, free for the next chunk
            self.free.append(held)

    def keep(self, chunks) -> None:
        chunks = set(chunks)
        for chunk in [c for c in self.entries if c not in chunks]:
            self._drop(chunk)

    def get(self, source, chunk, inner, mapped=False) -> np.ndarray:
        """The chunk, valid in (at least) the rows `inner` takes."""
        rows = inner[-2] if len(inner) >= 2 else slice(0, 1)
        entry = self.entries.get(chunk)
        if entry is not None and entry[0] <= rows.start and rows.stop <= entry[1]:
            held = entry[2]
            return _scratch(held, source.chunks, source.dtype) if isinstance(held, str) \
                else held
        if entry is not None:                   # fewer rows than this read takes
            self._drop(chunk)
        if mapped:
            data = source._map_chunk(chunk)
            self.entries[chunk] = (0, math.inf, data)          # every row
            return data
        if self.free:
            slot = self.free.pop()
        else:
            slot, self.made = f"zarr-rows-{self.made}", self.made + 1
        self.entries[chunk] = (rows.start, rows.stop, slot)
        return source._read_chunk(chunk, inner, slot, whole_rows=True)


class RawZarrArray:
    """An uncompressed zarr v3 array in a local directory, read and written chunk file by
    chunk file: each chunk is read into a buffer of the reading thread and copied into the
    block, and written from such a buffer with O_DIRECT, past zarr's codec pipeline.

    For such an array (no compressor, no filters, no sharding, little-endian bytes, C order)
    a chunk file is the chunk's raw bytes, so zarr's per-chunk work (event loop, buffer
    allocation, decoding) is all overhead: it cost about as much CPU as the convolution. Any
    other array is a ValueError naming what differs (use `dask.array.from_zarr` and a zarr
    array as `out`). Small and picklable, like `MemmapArray`; a dask array reading it comes
    from `dilconv.dask.from_zarr`, and as `conv2d`'s `out` it takes blocks from any
    scheduler (blocks must tile its chunks; a partly written chunk is read, updated and
    written whole).

    >>> import numpy as np, tempfile, zarr, dilconv.dask
    >>> path = tempfile.mkdtemp() + "/y.zarr"
    >>> _ = zarr.create_array(path, shape=(3, 5), chunks=(2, 4), dtype="f4", compressors=None)
    >>> y = dilconv.dask.RawZarrArray.open(path)
    >>> y[1:3] = np.arange(10).reshape(2, 5)
    >>> zarr.open_array(path, mode="r")[...]
    array([[0., 0., 0., 0., 0.],
           [0., 1., 2., 3., 4.],
           [5., 6., 7., 8., 9.]], dtype=float32)
    """

    def __init__(self, root, shape, chunks, dtype, fill_value, separator="/"):
        self.root, self.shape, self.chunks = os.fspath(root), tuple(shape), tuple(chunks)
        self.dtype, self.fill_value = np.dtype(dtype), fill_value
        self.separator, self.ndim = separator, len(self.shape)

    @classmethod
    def open(cls, array) -> "RawZarrArray":
        """`array`: a zarr array or the path of one (only its metadata is read)."""
        import zarr
        from zarr.storage import LocalStore
        z = zarr.open_array(os.fspath(array), mode="r") if isinstance(
            array, (str, os.PathLike)) else array
        meta, store = z.metadata, z.store_path.store
        codecs = getattr(meta, "codecs", ())
        encoding = getattr(meta, "chunk_key_encoding", None)
        dtype = np.dtype(z.dtype)
        checks = [
            (meta.zarr_format == 3, f"zarr format {meta.zarr_format}, not 3"),
            (isinstance(store, LocalStore), f"a {type(store).__name__}, not a local directory"),
            (len(codecs) == 1 and type(codecs[0]).__name__ == "BytesCodec"
             and getattr(codecs[0].endian, "value", "little") == "little",
             f"codecs {codecs} (compressed, filtered or sharded)"),
            (dtype.byteorder in "=|<" and (dtype.isnative or dtype.itemsize == 1)
             and dtype.kind in "biuf", f"dtype {dtype}"),
            (z.order == "C", f"order {z.order}"),
            (getattr(encoding, "name", None) == "default", f"chunk keys {encoding}"),
        ]
        for ok, what in checks:
            if not ok:
                raise ValueError(f"RawZarrArray needs an uncompressed zarr v3 array in a local "
                                 f"directory, got {what}")
        root = os.path.join(store.root, z.store_path.path)
        return cls(root, z.shape, z.chunks, dtype, meta.fill_value, encoding.separator)

    def _path(self, index) -> str:
        return os.path.join(self.root, "c", *(str(i) for i in index)) if self.separator == "/" \
            else os.path.join(self.root, self.separator.join(("c",) + tuple(map(str, index))))

    def _pieces(self, index):
        """The region's shape (integer axes kept, of length 1), the shape of `index`'s
        result, and (region, chunk index, slices in the chunk) per chunk it overlaps."""
        if not isinstance(index, tuple):
            index = (index,)
        index = index + (slice(None),) * (self.ndim - len(index))
        bounds, kept = [], []
        for i, size in zip(index, self.shape):
            if isinstance(i, numbers.Integral) and -size <= i < size:
                bounds.append((i % size, i % size + 1))
                continue
            if not isinstance(i, slice) or i.indices(size)[2] != 1:
                raise IndexError(f"RawZarrArray takes integers and slices of step 1 "
                                 f"within its shape {self.shape}, got {index}")
            start, stop, _ = i.indices(size)
            bounds.append((start, max(start, stop)))
            kept.append(max(start, stop) - start)
        shape = tuple(b - a for a, b in bounds)
        # Per axis: (chunk, slice of the region, slice in the chunk) of each chunk it meets.
        axes = [[(j, slice(max(a, j * c) - a, min(b, j * c + c) - a),
                  slice(max(a, j * c) - j * c, min(b, j * c + c) - j * c))
                 for j in range(a // c, -(-b // c))]
                for (a, b), c in zip(bounds, self.chunks)]
        pieces = [tuple(zip(*parts)) or ((), (), ()) for parts in itertools.product(*axes)]
        return shape, tuple(kept), [(region, chunk, inner) for chunk, region, inner in pieces]

    def _read_chunk(self, chunk, inner=None, slot="zarr-chunk", whole_rows=False):
        """The chunk in this thread's buffer `slot`; with `inner` (its slices that are
        used), only the bytes from the first to the last element of `inner` in each plane
        of the last two axes are read (a window's halo takes a few rows of a chunk), or
        with `whole_rows` the whole rows `inner` takes (what `_ChunkRows` keeps)."""
        buf = _scratch(slot, self.chunks, self.dtype)
        flat = memoryview(buf.reshape(-1).view(np.uint8))
        runs = [(0, buf.nbytes)]
        if inner is not None and buf.ndim >= 2:
            *lead, rows, cols = inner
            row = buf.strides[-2]
            first, last = (0, self.chunks[-1]) if whole_rows else (cols.start, cols.stop)
            start = rows.start * row + first * buf.itemsize
            size = (rows.stop - 1 - rows.start) * row + (last - first) * buf.itemsize
            runs = [(start + sum((i + s.start) * step for i, s, step in
                                 zip(plane, lead, buf.strides)), size)
                    for plane in np.ndindex(*(s.stop - s.start for s in lead))]
        try:
            with open(self._path(chunk), "rb", buffering=0) as f:
                for at, size in runs:
                    if not _read(f.fileno(), flat[at:at + size], at):
                        raise self._short(chunk)
        except FileNotFoundError:                  # never written: the fill value
            buf[...] = self.fill_value
        return buf

    def __getitem__(self, index):
        return self.read_into(index)

    def read_into(self, index, slot=None, mapped=False, rows=None):
        """``self[index]``, in a new array or (slot) in this thread's buffer of that name:
        each chunk's part read into a chunk buffer, then copied; with `mapped`, copied
        from a mapping of the chunk file (one copy fewer; see WINDOW_VIEWS); with `rows`
        (a `_ChunkRows`), the chunks' rows are read once for this and the next reads."""
        shape, result, pieces = self._pieces(index)
        out = np.empty(shape, self.dtype) if slot is None else _scratch(slot, shape,
                                                                         self.dtype)
        if rows is not None:
            rows.keep(chunk for _, chunk, _ in pieces)
        for region, chunk, inner in pieces:
            if rows is not None:
                data = rows.get(self, chunk, inner, mapped)
            elif mapped:
                data = self._map_chunk(chunk)
            else:
                data = self._read_chunk(chunk, inner)
            np.copyto(out[region], data[inner])
        return out.reshape(result)

    def _map_chunk(self, chunk):
        """The chunk as a read-only view of its file (the fill value where none is)."""
        try:
            with open(self._path(chunk), "rb") as f:
                mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            return np.frombuffer(mapping, self.dtype,
                                 math.prod(self.chunks)).reshape(self.chunks)
        except FileNotFoundError:                  # never written: the fill value
            return np.broadcast_to(np.asarray(self.fill_value, self.dtype), self.chunks)
        except ValueError:                         # the file is shorter than the chunk
            raise self._short(chunk) from None

    def _short(self, chunk) -> ValueError:
        nbytes = math.prod(self.chunks) * self.dtype.itemsize
        return ValueError(f"chunk {chunk} of {self.root} is shorter than {nbytes} bytes: "
                          f"not an uncompressed chunk")

    def __setitem__(self, index, value):
        shape, result, pieces = self._pieces(index)
        value = np.broadcast_to(np.asarray(value, dtype=self.dtype), result).reshape(shape)
        for region, chunk, inner in pieces:
            whole = all(s.stop - s.start == min(c, n - j * c) for s, c, n, j in
                        zip(inner, self.chunks, self.shape, chunk))
            part = value[region]
            if whole and part.shape == self.chunks and part.flags.c_contiguous:
                buf = part                         # already the chunk's bytes
            else:
                if whole:
                    buf = _scratch("zarr-chunk", self.chunks, self.dtype)
                    if any(s.stop < c for s, c in zip(inner, self.chunks)):
                        buf[...] = self.fill_value     # an edge chunk is stored whole
                else:
                    buf = self._read_chunk(chunk)
                np.copyto(buf[inner], part)
            _put_direct(self._path(chunk), memoryview(buf.reshape(-1).view(np.uint8)))

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self[...], dtype=dtype)

    def __dask_tokenize__(self):
        meta = os.path.join(self.root, "zarr.json")
        stat = os.stat(meta)
        return (type(self).__name__, os.path.realpath(self.root), stat.st_mtime_ns,
                self.shape, self.chunks, self.dtype.str)

    def __repr__(self):
        return (f"RawZarrArray({self.root!r}, shape={self.shape}, chunks={self.chunks}, "
                f"dtype={self.dtype.name})")


def from_zarr(array, chunks=None) -> da.Array:
    """An uncompressed zarr v3 array (a zarr array or its path) as a dask array read chunk
    file by chunk file (`RawZarrArray`); any other zarr array through
    `dask.array.from_zarr`. `chunks`: as in `from_npy` (None: `block_chunks` of a 1 GiB
    budget, multiples of the stored chunks, for 4-D arrays; else the stored chunks)."""
    import zarr
    z = zarr.open_array(os.fspath(array), mode="r") if isinstance(
        array, (str, os.PathLike)) else array
    if chunks is None:
        chunks = (block_chunks(z.shape, z.dtype, storage_chunks=z.chunks) if z.ndim == 4
                  else z.chunks)
    try:
        source = RawZarrArray.open(z)
    except ValueError:
        return da.from_zarr(z, chunks=chunks)
    return da.from_array(source, chunks=chunks, lock=False, asarray=False,
                         meta=np.empty((0,) * source.ndim, source.dtype))


__all__ += ["RawZarrArray", "from_zarr"]
