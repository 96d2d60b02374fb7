"""dilconv.dask on data on disk: files read window by window, blocks written straight into
zarr arrays and files, block sizes from a memory budget."""
import os

import threading

import numpy as np
import pytest

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
zarr = pytest.importorskip("zarr")
from dask.delayed import Delayed             # noqa: E402

import dilconv                                   # noqa: E402
import dilconv.dask as dd                        # noqa: E402
from dilconv import tolerance                    # noqa: E402
from dilconv._validate import make_spec          # noqa: E402

from _helpers import forward_bound               # noqa: E402


def _layer(rng, c=3, o=4):
    x = rng.standard_normal((2, c, 37, 45)).astype(np.float32)
    w = rng.standard_normal((o, c, 3, 3)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    args = dict(dilation=2, padding="same")
    expected = dilconv.conv2d(x, w, b, **args)
    return x, w, b, args, expected, forward_bound(x, w, b, _spec(x, w, **args))


def _spec(x, w, dilation, padding):
    return make_spec(x.shape, w.shape, 1, padding, dilation, 1)


def _within(got, expected, bound):
    got = np.asarray(got)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert tolerance.worst_ratio(got, expected, bound) <= 1.0


# --- reading files ------------------------------------------------------------------

@pytest.mark.parametrize("order", ["C", "F"])
def test_from_npy_blocks_are_views_of_the_file(tmp_path, rng, order):
    x, w, b, args, expected, bound = _layer(rng)
    path = tmp_path / "x.npy"
    np.save(path, np.asarray(x, order=order))
    xd = dd.from_npy(path, chunks=(1, 3, 16, 20))
    assert xd.chunks == ((1, 1), (3,), (16, 16, 5), (20, 20, 5)) and xd.dtype == x.dtype
    # The task's result (compute() would copy it into the result array).
    block = dask.get(dict(xd.__dask_graph__()), (xd.name, 1, 0, 2, 1))
    assert isinstance(block, np.memmap) and not block.flags.owndata     # a view, no copy
    assert not block.flags.writeable
    np.testing.assert_array_equal(block, x[1:2, :, 32:37, 20:40])
    np.testing.assert_array_equal(xd.compute(), x)
    _within(dd.conv2d(xd, w, b, **args).compute(scheduler="threads"), expected, bound)


@pytest.mark.parametrize("run_bytes", [1, None])
def test_file_windows_are_read_into_the_task_buffer(tmp_path, rng, monkeypatch, run_bytes):
    """A task's window of a file is read into its thread's buffer (pread per run, or with
    short runs a copy through the mapping), never handed to the kernels as a view of the
    mapping."""
    if run_bytes:
        monkeypatch.setattr(dd, "IO_RUN_BYTES", run_bytes)
    x = rng.standard_normal((2, 3, 40, 36)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    source = dd.MemmapArray.open_npy(tmp_path / "x.npy")
    for region in ((slice(1, 2), slice(None), slice(3, 17), slice(None)),
                   (slice(0, 2), slice(1, 3), slice(5, 9), slice(2, 30))):
        window = dd._read_window(dd._Direct(source, region))
        assert not isinstance(window, np.memmap)
        assert np.shares_memory(window, dd._scratch("window", window.shape, window.dtype))
        np.testing.assert_array_equal(window, x[region])
        np.testing.assert_array_equal(source.read_into(region), x[region])
    # A view of a mapping gathered from dask blocks is copied too.
    view = source[0:1, :, 2:9, :]
    copied = dd._contiguous(view, "window", planes=True)
    assert not isinstance(copied, np.memmap)
    np.testing.assert_array_equal(copied, x[0:1, :, 2:9, :])


def test_from_raw_with_offset(tmp_path, rng):
    x = rng.standard_normal((1, 2, 9, 7))
    path = tmp_path / "x.raw"
    path.write_bytes(b"header!!" + x.tobytes())
    xd = dd.from_raw(path, x.shape, x.dtype, offset=8, chunks=(1, 2, 4, 7))
    np.testing.assert_array_equal(xd.compute(), x)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_from_npy_does_not_copy_the_file_into_memory(tmp_path):
    def anon_mib():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon")) / 1024
    path = tmp_path / "big.npy"
    mm = np.lib.format.open_memmap(path, "w+", np.float32, (1, 4, 2048, 2048))   # 64 MiB
    mm[:] = 1.0
    del mm
    before = anon_mib()
    total = dd.from_npy(path, chunks=(1, 4, 128, 2048)).sum().compute(scheduler="sync")
    assert total == 4 * 2048 * 2048
    assert anon_mib() - before < 24, "the file was copied into anonymous memory"


def test_memmap_array_reads_and_writes(tmp_path, rng):
    y = dd.MemmapArray.create_npy(tmp_path / "y.npy", (2, 3, 40, 8192), np.float32)
    band = rng.standard_normal((1, 3, 5, 8192)).astype(np.float32)    # 32 KiB rows: pwrite
    y[1:2, :, 10:15, :] = band
    y[0, 1, 3:6, 7:9] = 2.5                                            # strided: mapped
    want = np.zeros(y.shape, np.float32)
    want[1:2, :, 10:15, :] = band
    want[0, 1, 3:6, 7:9] = 2.5
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), want)
    np.testing.assert_array_equal(y[1, :, 10:15], band[0])
    again = dd.MemmapArray.open_npy(tmp_path / "y.npy")
    assert (again.shape, again.dtype, again.offset) == (y.shape, y.dtype, y.offset)
    assert dask.base.tokenize(again) == dask.base.tokenize(y)


def test_memmap_array_writes_aligned_rows_directly(tmp_path, monkeypatch):
    """Page-aligned rows (as from the tasks' output buffers) bypass the page cache where
    the file system allows O_DIRECT; the file is the same either way."""
    calls = []
    write = dd._write
    monkeypatch.setattr(dd, "_write", lambda path, fds, direct, data, at: (
        calls.append(direct), write(path, fds, direct, data, at)))
    y = dd.MemmapArray.create_npy(tmp_path / "y.npy", (1, 2, 8, 4096), np.float32)
    assert y.offset == 4096
    value = dd._scratch("test", (1, 2, 4, 4096), np.float32)     # 64 KiB rows
    value[...] = np.arange(value.size, dtype=np.float32).reshape(value.shape)
    y[:, :, 4:8, :] = value
    assert calls == [bool(dd.DIRECT)] * 2
    want = np.zeros(y.shape, np.float32)
    want[:, :, 4:8] = value
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), want)


# --- writing blocks straight into the target ----------------------------------------

def _zarr(path, shape, chunks, compressors=None):
    return zarr.create_array(str(path), shape=shape, chunks=chunks, dtype="float32",
                             compressors=compressors)


# Padding wider than the kernel's reach: the blocks at the border read only padding.
WIDE = ((9, 4), (0, 40))


@pytest.mark.parametrize("stripe_bytes", [None, 48])
@pytest.mark.parametrize("target, padding", [
    ("numpy", WIDE), ("memmap", WIDE), ("memmap", "same"), ("zarr", "same"),
    ("zarr-zstd", "same"), ("zarr-narrow", "same")])
def test_conv2d_out_writes_every_block(tmp_path, rng, monkeypatch, target, padding,
                                       stripe_bytes):
    """Also with blocks written a stripe at a time (rows of files, columns of zarr chunks
    as tall as the block, stripes that read only padding)."""
    if stripe_bytes:
        monkeypatch.setattr(dd, "STRIPE_BYTES", stripe_bytes)
        monkeypatch.setattr(dd, "_writer_helps", lambda tasks, threads: True)
    x, w, b, _, _, _ = _layer(rng)
    expected = dilconv.conv2d(x, w, b, dilation=2, padding=padding)
    bound = forward_bound(x, w, b, _spec(x, w, 2, padding))
    shape = expected.shape
    if target == "numpy":
        out = np.full(shape, np.nan, np.float32)
    elif target == "memmap":
        out = dd.MemmapArray.create_npy(tmp_path / "y.npy", shape, np.float32)
    else:                                   # 'same' keeps the input's blocks: 8 x 16
        compressors = zarr.codecs.ZstdCodec(level=1) if target == "zarr-zstd" else None
        chunks = (1, 4, 8, 8 if target == "zarr-narrow" else 16)
        out = _zarr(tmp_path / "y.zarr", shape, chunks, compressors)
    xd = da.from_array(x, chunks=(1, 3, 8, 16))
    job = dd.conv2d(xd, w, b, dilation=2, padding=padding, out=out)
    assert isinstance(job, Delayed)
    assert job.compute(scheduler="threads") is out
    _within(out[...], expected, bound)


def test_stripes_are_written_in_whole_requests(tmp_path):
    """A file's stripes hold STRIPE_BYTES of each channel's rows (one write request per
    channel); a zarr array's, STRIPE_BYTES of its stored chunks, which hold all channels."""
    rows = dd.STRIPE_BYTES // (16384 * 4)                      # of one channel: 64
    y = dd.MemmapArray.create_npy(tmp_path / "y.npy", (1, 4, 4 * rows, 16384), np.float32)
    assert dd._stripes(dd._Store(y, (), (1, 4, rows, 16384), np.float32)) is None
    assert dd._stripes(dd._Store(y, (), (1, 4, 3 * rows - 22, 16384), np.float32)) == (
        2, rows - 22 // 3)
    z = _zarr(tmp_path / "y.zarr", (1, 4, 512, 2048), (1, 4, 512, 512))
    assert dd._stripes(dd._Store(z, (), (1, 4, 512, 2048), np.float32)) == (3, 512)


def test_blocks_are_striped_only_where_a_core_is_free(monkeypatch):
    monkeypatch.setattr(dd, "_cores", lambda: 4)
    monkeypatch.setattr(dd, "_sibling_workers", lambda: 0)
    assert dd._writer_helps(1, 1) and dd._writer_helps(3, 1) and dd._writer_helps(1, 3)
    assert not dd._writer_helps(4, 1) and not dd._writer_helps(2, 2)
    with dd._counted() as first, dd._counted() as second:
        assert (first, second) == (1, 2)
    with dd._counted() as again:
        assert again == 1


def test_conv2d_out_write_errors_reach_the_caller(rng, monkeypatch):
    """A stripe written by the task's writing thread still fails the task."""
    monkeypatch.setattr(dd, "STRIPE_BYTES", 48)
    monkeypatch.setattr(dd, "_writer_helps", lambda tasks, threads: True)
    x, w, b, args, expected, _ = _layer(rng)

    class Full:
        shape, dtype = expected.shape, expected.dtype

        def __setitem__(self, index, value):
            raise OSError("no space left on device")

    job = dd.conv2d(da.from_array(x, chunks=(1, 3, 8, 16)), w, b, **args, out=Full())
    with pytest.raises(OSError, match="no space"):
        job.compute(scheduler="threads")


def test_conv2d_out_unbatched_and_in_place(rng):
    x, w, b, args, expected, bound = _layer(rng)
    out = np.zeros(expected.shape[1:], np.float32)
    # Blocks of whole rows along N=1: each region of `out` is contiguous, written in place.
    dd.conv2d(da.from_array(x[0], chunks=(3, 37, 45)), w, b, **args, out=out).compute()
    _within(out, expected[0], bound[0])


def test_conv2d_out_rejects(tmp_path, rng):
    x, w, b, args, expected, _ = _layer(rng)
    xd = da.from_array(x, chunks=(1, 3, 8, 16))
    with pytest.raises(ValueError, match=r"out must have shape \(2, 4, 37, 45\)"):
        dd.conv2d(xd, w, b, **args, out=np.zeros((2, 4, 37, 44), np.float32))
    with pytest.raises(TypeError, match="out must have dtype float32"):
        dd.conv2d(xd, w, b, **args, out=np.zeros(expected.shape))
    with pytest.raises(TypeError, match="out must be an array"):
        dd.conv2d(xd, w, b, **args, out=[0.0])
    # zarr chunks of 6 rows cannot be written by blocks of 8 without two tasks sharing one.
    misaligned = _zarr(tmp_path / "m.zarr", expected.shape, (1, 4, 6, 16))
    with pytest.raises(ValueError, match="do not tile the output blocks"):
        dd.conv2d(xd, w, b, **args, out=misaligned)


@pytest.mark.parametrize("compressed", [False, True])
def test_direct_store_is_an_ordinary_zarr_store(tmp_path, rng, compressed):
    """Chunks written past the page cache (whole 4096-byte blocks direct, the tail of a
    compressed chunk ordinarily) read back with zarr's own store."""
    x, w, b, args, expected, bound = _layer(rng)
    store = dd.DirectStore(str(tmp_path / "y.zarr"))
    out = zarr.create_array(store, shape=expected.shape, chunks=(1, 4, 32, 32),
                            dtype="float32",
                            compressors=zarr.codecs.ZstdCodec(level=1) if compressed else None)
    dd.conv2d(da.from_array(x, chunks=(1, 3, 32, 32)), w, b, **args, out=out).compute()
    assert not list(tmp_path.rglob("*.partial"))
    _within(zarr.open_array(str(tmp_path / "y.zarr"), mode="r")[...], expected, bound)


def test_zarr_round_trip(tmp_path, rng):
    """README's example: a zarr store in, a zarr store out."""
    x, w, b, args, expected, bound = _layer(rng)
    source = _zarr(tmp_path / "slide.zarr", x.shape, (1, 3, 16, 16))
    source[...] = x
    xd = da.from_zarr(str(tmp_path / "slide.zarr"))
    assert xd.chunks[2] == (16, 16, 5)
    dd.conv2d(xd, w, b, **args).to_zarr(str(tmp_path / "features.zarr"))
    _within(zarr.open_array(str(tmp_path / "features.zarr"))[...], expected, bound)


# --- block sizes ------------------------------------------------------------------------

@pytest.mark.parametrize("shape, budget, tasks, layers, storage", [
    ((1, 4, 16384, 16384), 1024 ** 3, 2, 1, None),
    ((1, 16, 16384, 16384), 1024 ** 3, 2, 7, None),
    ((1, 4, 16384, 16384), 1024 ** 3, 2, 1, (1, 4, 512, 512)),
    ((1, 3, 1000, 700), 64 * 1024 ** 2, 4, 2, (1, 3, 100, 70)),
    ((1, 8, 50, 30), 1024 ** 3, 1, 1, None),
])
@pytest.mark.parametrize("streamed", [False, True])
def test_block_chunks_fit_the_budget(shape, budget, tasks, layers, storage, streamed):
    n, c, rows, cols = dd.block_chunks(shape, np.float32, budget, tasks=tasks, layers=layers,
                                       storage_chunks=storage, streamed=streamed)
    assert (n, c) == (1, shape[1]) and 1 <= rows <= shape[2] and 1 <= cols <= shape[3]
    block = c * rows * cols * 4
    alive = tasks * dd.BLOCKS_PER_TASK + (layers - 1) * dd.BLOCKS_PER_LAYER
    limit = budget // 2 // alive if streamed else min(budget // 2 // alive, dd.MAX_BLOCK_BYTES)
    assert block <= limit or (rows, cols) == shape[2:]
    if streamed and shape == (1, 4, 16384, 16384) and storage is None:
        assert block > dd.MAX_BLOCK_BYTES and 2 * block > limit
    if storage is not None:
        assert rows % storage[2] == 0 and (cols % storage[3] == 0 or cols == shape[3])
    if cols < shape[3]:        # tiles only where not one band of stored rows fits
        assert storage is not None and shape[1] * storage[2] * shape[3] * 4 > block


# --- a chain fused per block -------------------------------------------------------------

def _chain(rng, channels=(3, 5, 4, 2), dilations=(1, 4, 2), bias=(True, False, True),
           padding=("same",) * 3):
    layers = []
    for cin, cout, d, b, p in zip(channels, channels[1:], dilations, bias, padding):
        w = rng.standard_normal((cout, cin, 3, 3)).astype(np.float32)
        layers.append((w, rng.standard_normal(cout).astype(np.float32) if b else None, d, p))
    return layers


def _chain_expected(x, layers, relu):
    """The in-memory chain, and its error bound: the terms of all layers over the chain of
    absolute values (a ReLU does not increase an error)."""
    y, total = x, np.abs(x).astype(np.float64)
    for i, (w, b, d, p) in enumerate(layers):
        y = dilconv.conv2d(y, w, b, dilation=d, padding=p)
        if relu and i < len(layers) - 1:
            y = np.maximum(y, 0)
        total = dilconv.conv2d(total, np.abs(w).astype(np.float64),
                               None if b is None else np.abs(b).astype(np.float64),
                               dilation=d, padding=p)
    terms = sum(w.shape[1] * 9 + 1 for w, *_ in layers)
    return y, tolerance.error_bound(total, terms, np.float32)


@pytest.mark.parametrize("chunks, relu, padding", [
    ((1, 3, 8, 16), True, ("same",) * 3),         # blocks smaller than the chain's halo (7)
    ((2, 3, (20, 17), 45), False, ("same",) * 3),  # uneven bands of full rows
    ((1, 3, 13, 9), True, (0, "same", ((3, 1), (0, 2)))),   # shrinking and uneven padding
    ((1, 3, 37, 45), True, ("same",) * 3),        # one block
])
def test_conv2d_chain_matches_the_in_memory_chain(rng, chunks, relu, padding):
    x = rng.standard_normal((2, 3, 37, 45)).astype(np.float32)
    layers = _chain(rng, padding=padding)
    expected, bound = _chain_expected(x, layers, relu)
    y = dd.conv2d_chain(da.from_array(x, chunks=chunks), layers,
                        activation="relu" if relu else None)
    assert y.shape == expected.shape
    _within(y.compute(scheduler="threads"), expected, bound)
    # Bitwise the same for any thread count.
    np.testing.assert_array_equal(y.compute(scheduler="threads", num_workers=3),
                                  y.compute(scheduler="sync"))


def test_conv2d_chain_one_task_per_block(rng):
    """Memory bounded by the blocks: no layer's output is a dask array, each output block
    is one task reading only input blocks (or their halo strips)."""
    x = rng.standard_normal((1, 3, 64, 48)).astype(np.float32)
    xd = da.from_array(x, chunks=(1, 3, 16, 48))
    y = dd.conv2d_chain(xd, _chain(rng))
    graph = dict(y.__dask_graph__())
    blocks = [k for k in graph if isinstance(k, tuple) and k[0] == y.name]
    assert len(blocks) == 4 and y.chunks == xd.chunks[:1] + ((2,),) + xd.chunks[2:]
    computed = [k for k in graph if isinstance(k, tuple) and k[0] not in
                (y.name, xd.name) and "halo" not in k[0]]
    assert not computed, computed


def test_conv2d_chain_unbatched_into_storage(tmp_path, rng):
    x = rng.standard_normal((3, 40, 44)).astype(np.float32)
    layers = [(w, b, d) for w, b, d, _ in _chain(rng)]
    expected, bound = _chain_expected(x[None], [lay + ("same",) for lay in layers], True)
    for out in (np.full(expected.shape[1:], np.nan, np.float32),
                _zarr(tmp_path / "y.zarr", expected.shape[1:], (2, 8, 44)),
                dd.MemmapArray.create_npy(tmp_path / "y.npy", expected.shape[1:], np.float32)):
        job = dd.conv2d_chain(da.from_array(x, chunks=(3, 8, 44)), layers, activation="relu",
                              out=out)
        assert job.compute(scheduler="threads") is out
        _within(out[...], expected[0], bound[0])


def test_conv2d_chain_callable_activation(rng):
    x = rng.standard_normal((1, 3, 20, 20)).astype(np.float32)
    layers = _chain(rng, dilations=(1, 1, 1))
    y = dd.conv2d_chain(da.from_array(x, chunks=(1, 3, 7, 7)), layers,
                        activation=lambda v: np.tanh(v, out=v))
    expected = x
    for i, (w, b, d, p) in enumerate(layers):
        expected = dilconv.conv2d(expected, w, b, dilation=d, padding=p)
        expected = np.tanh(expected) if i < 2 else expected
    np.testing.assert_allclose(y.compute(), expected, rtol=1e-4, atol=1e-4)


def test_conv2d_chain_rejects(rng):
    xd = da.zeros((1, 3, 16, 16), chunks=(1, 3, 8, 8), dtype=np.float32)
    layers = _chain(rng)
    with pytest.raises(ValueError, match="layers must be a non-empty sequence"):
        dd.conv2d_chain(xd, [])
    with pytest.raises(ValueError, match=r"layers\[1\] must be a \(weight, bias"):
        dd.conv2d_chain(xd, [layers[0], np.ones((4, 5, 3, 3))])
    # The second layer expects the first's 5 channels.
    with pytest.raises(ValueError, match=r"layers\[1\]: .*channel"):
        dd.conv2d_chain(xd, [layers[0], layers[0]])
    with pytest.raises(ValueError, match="activation must be None, a callable or one of"):
        dd.conv2d_chain(xd, layers, activation="gelu")


@pytest.mark.parametrize("shape, storage, halo", [
    ((1, 16, 16384, 16384), None, 33), ((1, 16, 16384, 16384), (1, 4, 512, 512), 33),
    ((1, 8, 300, 200), (1, 8, 64, 64), 5), ((1, 2, 20, 30), None, 40)])
def test_block_chunks_for_a_fused_chain(shape, storage, halo):
    budget, tasks = 1024 ** 3, 2
    n, c, rows, cols = dd.block_chunks(shape, np.float32, budget, tasks=tasks,
                                       storage_chunks=storage, halo=halo)
    assert (n, c) == (1, shape[1]) and 1 <= rows <= shape[2] and 1 <= cols <= shape[3]
    assert rows >= min(shape[2], dd.HALO_ROWS * halo)
    window = c * 4 * (rows + 2 * halo) * (cols + 2 * halo)
    assert window <= budget // 2 // (tasks * dd.BLOCKS_PER_TASK) or cols == (
        1 if storage is None else min(shape[3], storage[3]))
    if storage is not None:
        assert rows % storage[2] == 0 or rows == shape[2]
        assert cols % storage[3] == 0 or cols == shape[3]


# --- uncompressed zarr read and written chunk file by chunk file --------------------------

def test_raw_zarr_array_reads_and_writes_like_zarr(tmp_path, rng):
    shape, chunks = (2, 3, 21, 19), (1, 3, 8, 5)
    z = zarr.create_array(str(tmp_path / "a.zarr"), shape=shape, chunks=chunks,
                          dtype="float32", compressors=None, fill_value=-2.5)
    data = rng.standard_normal(shape).astype(np.float32)
    z[:, :, :16] = data[:, :, :16]                    # rows 16: never written
    raw = dd.RawZarrArray.open(str(tmp_path / "a.zarr"))
    assert (raw.shape, raw.chunks, raw.dtype) == (shape, chunks, np.float32)
    for index in [(slice(None),), (1, slice(None), slice(3, 20), slice(2, 17)),
                  (slice(0, 2), slice(None), slice(15, 21), slice(0, 19)),
                  (slice(1, 2), slice(1, 3), slice(7, 9), slice(4, 11))]:
        np.testing.assert_array_equal(raw[index], z[index])
    # Whole chunks, edge chunks and a partial chunk, written and read back by zarr.
    raw[:, :, 8:21, 10:19] = data[:, :, 8:21, 10:19]
    raw[0, :, 1:3, 1:2] = 7.0
    expected = np.where(np.arange(21)[:, None] < 16, data, -2.5).astype(np.float32)
    expected[:, :, 8:21, 10:19] = data[:, :, 8:21, 10:19]
    expected[0, :, 1:3, 1:2] = 7.0
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "a.zarr"), mode="r")[...],
                                  expected)
    assert not list(tmp_path.rglob("*.partial"))
    np.testing.assert_array_equal(raw[0, 1:3, 5:19, 3:18], expected[0, 1:3, 5:19, 3:18])
    with pytest.raises(IndexError, match="slices of step 1"):
        raw[:, :, ::2]
    with pytest.raises(IndexError, match="slices of step 1"):
        raw[2]


def test_raw_zarr_array_reads_from_chunk_mappings_alike(tmp_path, rng):
    """Windows copied from the chunk files' mappings equal those read with pread, the
    fill value where a chunk was never written; a chunk file too short is an error."""
    shape, chunks = (2, 3, 21, 19), (1, 3, 8, 5)
    z = zarr.create_array(str(tmp_path / "a.zarr"), shape=shape, chunks=chunks,
                          dtype="float32", compressors=None, fill_value=-2.5)
    z[:, :, :16] = rng.standard_normal((2, 3, 16, 19)).astype(np.float32)
    raw = dd.RawZarrArray.open(str(tmp_path / "a.zarr"))
    for index in [(slice(None),), (slice(1, 2), slice(None), slice(3, 20), slice(2, 17))]:
        np.testing.assert_array_equal(raw.read_into(index, mapped=True), z[index])
        np.testing.assert_array_equal(raw.read_into(index, mapped=True),
                                      raw.read_into(index))
    with open(raw._path((0, 0, 0, 0)), "r+b") as f:
        f.truncate(12)
    with pytest.raises(ValueError, match="not an uncompressed chunk"):
        raw.read_into((0,), mapped=True)


def test_raw_zarr_array_reads_only_the_rows_it_needs(tmp_path, rng, monkeypatch):
    """A window's halo (two rows of the chunks below a band) reads those rows of each
    channel, not the chunks."""
    shape, chunks = (1, 3, 64, 64), (1, 3, 32, 32)
    z = zarr.create_array(str(tmp_path / "a.zarr"), shape=shape, chunks=chunks,
                          dtype="float32", compressors=None)
    z[...] = data = rng.standard_normal(shape).astype(np.float32)
    raw = dd.RawZarrArray.open(str(tmp_path / "a.zarr"))
    read, preadv = [], os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, buffers, at: read.append(
        preadv(fd, buffers, at)) or read[-1])
    np.testing.assert_array_equal(raw[:, :, 30:34, :], data[:, :, 30:34, :])
    assert sum(read) == data[:, :, 30:34, :].nbytes          # 2 + 2 rows of 4 chunks


def test_raw_zarr_array_rejects_what_is_not_raw(tmp_path):
    z = _zarr(tmp_path / "c.zarr", (1, 2, 8, 8), (1, 2, 4, 4), zarr.codecs.ZstdCodec(level=1))
    with pytest.raises(ValueError, match="uncompressed zarr v3 array.*codecs"):
        dd.RawZarrArray.open(z)
    assert "from-zarr" in dd.from_zarr(z).name           # dask's own reader instead


@pytest.mark.parametrize("chain", [False, True])
def test_zarr_in_zarr_out_chunk_files(tmp_path, rng, chain):
    """conv2d / conv2d_chain from RawZarrArray blocks into a RawZarrArray."""
    x = rng.standard_normal((1, 3, 40, 36)).astype(np.float32)
    source = _zarr(tmp_path / "x.zarr", x.shape, (1, 3, 8, 12))
    source[...] = x
    xd = dd.from_zarr(str(tmp_path / "x.zarr"), chunks=(1, 3, 16, 36))
    assert "from-zarr" not in xd.name and xd.chunks[2] == (16, 16, 8)
    layers = [(w, b, d, "same") for w, b, d, _ in _chain(rng, channels=(3, 5, 3))]
    expected, bound = _chain_expected(x, layers if chain else layers[:1], False)
    out = dd.RawZarrArray.open(_zarr(tmp_path / "y.zarr", expected.shape,
                                     (1, expected.shape[1], 8, 12)))
    if chain:
        dd.conv2d_chain(xd, layers, out=out).compute(scheduler="threads")
    else:
        w, b, d, p = layers[0]
        dd.conv2d(xd, w, b, dilation=d, padding=p, out=out).compute(scheduler="threads")
    _within(zarr.open_array(str(tmp_path / "y.zarr"), mode="r")[...], expected, bound)


@pytest.mark.parametrize("source", ["npy", "zarr"])
def test_column_stripes_read_from_the_source(tmp_path, rng, monkeypatch, source):
    """Blocks one stored chunk high are written in stripes of columns; from a file each
    stripe reads its own window (with the halo columns of its neighbours)."""
    monkeypatch.setattr(dd, "STRIPE_BYTES", 48)
    monkeypatch.setattr(dd, "_writer_helps", lambda tasks, threads: True)
    x = rng.standard_normal((1, 3, 40, 36)).astype(np.float32)
    if source == "npy":
        np.save(tmp_path / "x.npy", x)
        xd = dd.from_npy(tmp_path / "x.npy", chunks=(1, 3, 8, 36))
    else:
        _zarr(tmp_path / "x.zarr", x.shape, (1, 3, 8, 12))[...] = x
        xd = dd.from_zarr(str(tmp_path / "x.zarr"), chunks=(1, 3, 8, 36))
    w, b, d, p = _chain(rng, channels=(3, 5))[0]
    expected, bound = _chain_expected(x, [(w, b, d, p)], False)
    out = dd.RawZarrArray.open(_zarr(tmp_path / "y.zarr", expected.shape, (1, 5, 8, 12)))
    assert dd._stripes(dd._Store(out, (), (1, 5, 8, 36), np.float32)) == (3, 12)
    reads = []
    read_window = dd._read_window
    monkeypatch.setattr(dd, "_read_window", lambda direct, slot="window", planes=False, **kw:
                        reads.append((direct.region[3], slot))
                        or read_window(direct, slot, planes, **kw))
    dd.conv2d(xd, w, b, dilation=d, padding=p, out=out).compute(scheduler="sync")
    _within(zarr.open_array(str(tmp_path / "y.zarr"), mode="r")[...], expected, bound)
    assert {slot for _, slot in reads} == {"stripe-input"} and len(reads) == 5 * 3


@pytest.mark.parametrize("mapped", [False, True])
@pytest.mark.parametrize("background", [False, True])
def test_stripes_read_each_stored_chunk_once(tmp_path, rng, monkeypatch, mapped, background):
    """Into a RawZarrArray a block is written in stripes of whole chunks, with or without a
    writing thread; the stripes of one block share their halos, and each stored chunk of
    the input is read (or mapped) once per block, not once per stripe that overlaps it."""
    monkeypatch.setattr(dd, "STRIPE_BYTES", 48)
    monkeypatch.setattr(dd, "_writer_helps", lambda tasks, threads: background)
    monkeypatch.setattr(dd, "WINDOW_VIEWS", mapped)
    x = rng.standard_normal((1, 3, 40, 36)).astype(np.float32)
    _zarr(tmp_path / "x.zarr", x.shape, (1, 3, 8, 12))[...] = x
    xd = dd.from_zarr(str(tmp_path / "x.zarr"), chunks=(1, 3, 8, 36))
    w, b, d, p = _chain(rng, channels=(3, 5))[0]
    expected, bound = _chain_expected(x, [(w, b, d, p)], False)
    out = dd.RawZarrArray.open(_zarr(tmp_path / "y.zarr", expected.shape, (1, 5, 8, 12)))
    reads = []
    name = "_map_chunk" if mapped else "_read_chunk"
    original = getattr(dd.RawZarrArray, name)
    monkeypatch.setattr(dd.RawZarrArray, name, lambda self, chunk, *a, **kw:
                        reads.append(chunk) or original(self, chunk, *a, **kw))
    dd.conv2d(xd, w, b, dilation=d, padding=p, out=out).compute(scheduler="sync")
    _within(zarr.open_array(str(tmp_path / "y.zarr"), mode="r")[...], expected, bound)
    # 5 bands of 3 stripes; each band's window takes its own chunk row and (but at the
    # image's edges) the rows of the chunks above and below: every chunk once per band.
    assert sorted(reads) == sorted((0, 0, i + di, j) for i in range(5) for di in (-1, 0, 1)
                                   for j in range(3) if 0 <= i + di < 5)


@pytest.mark.parametrize("chunks", [(1, 3, 16, 36), (1, 3, 12, 20), (2, 3, 40, 36)])
@pytest.mark.parametrize("source", ["npy", "zarr", "zarr-zstd"])
def test_windows_read_from_the_source_by_the_tasks(tmp_path, rng, source, chunks):
    """On a from_npy / from_zarr / dask.array.from_zarr array each task reads its window
    from the file (a copy or zarr's decoding into the task's buffer): no input block is a
    task."""
    x = rng.standard_normal((2, 3, 40, 36)).astype(np.float32)
    if source == "npy":
        np.save(tmp_path / "x.npy", x)
        xd = dd.from_npy(tmp_path / "x.npy", chunks=chunks)
    elif source == "zarr":
        _zarr(tmp_path / "x.zarr", x.shape, (1, 3, 4, 4))[...] = x
        xd = dd.from_zarr(str(tmp_path / "x.zarr"), chunks=chunks)
    else:
        z = _zarr(tmp_path / "x.zarr", x.shape, (1, 3, 4, 4), zarr.codecs.ZstdCodec(level=1))
        z[...] = x
        xd = da.from_zarr(z, chunks=chunks)
    w, b, d, p = _chain(rng, channels=(3, 4))[0]
    layers = _chain(rng)
    y = dd.conv2d(xd, w, b, dilation=d, padding=p)
    fused = dd.conv2d_chain(xd, layers)
    for result, stack in ((y, [(w, b, d, p)]), (fused, layers)):
        assert xd.name not in dict(result.__dask_graph__().layers)
        _within(result.compute(scheduler="threads"), *_chain_expected(x, stack, False))


def test_window_cost_alternates_then_keeps_the_cheaper(monkeypatch):
    """A process's first windows alternate between views and copies, WINDOW_TRIALS of
    each after each thread's first of each kind (which touches that kind's buffers, and
    is not counted); then the one with the lower cost per value is kept, and later costs
    change nothing. WINDOW_VIEWS decides instead where set."""
    monkeypatch.setattr(dd, "WINDOW_TRIALS", 2)
    for view_costs, copy_costs, kept in (((2.0, 3.0), (1.0, 1.5), False),
                                         ((0.5, 3.0), (1.0, 0.6), True)):
        cost, seen = dd._WindowCost(), []
        # Each kind's first: far dearer (views) or cheaper (copies) than the counted ones.
        left = {True: [10.0 * max(view_costs), *view_costs],
                False: [0.01 * min(copy_costs), *copy_costs]}
        while cost.choice is None:
            views = cost.views()
            seen.append(views)
            cost.record(views, left[views].pop(0) * 100, 100)
        assert seen == [True, True, False, False, True, False] and cost.choice is kept
        cost.record(not kept, 0.0, 100)
        assert cost.views() is kept
        monkeypatch.setattr(dd, "WINDOW_VIEWS", not kept)
        assert cost.views() is (not kept)
        monkeypatch.setattr(dd, "WINDOW_VIEWS", None)
    cost = dd._WindowCost()
    cost.record(True, 1.0, 100)                    # this thread's first: not counted
    thread = threading.Thread(target=cost.record, args=(True, 1.0, 100))
    thread.start()
    thread.join()                                  # nor another thread's first
    cost.record(True, 1.0, 100)
    assert cost.costs == {True: [0.01], False: []}


@pytest.mark.parametrize("striped", [False, True])
def test_npy_windows_as_views_or_copies_give_the_same_bits(tmp_path, rng, monkeypatch,
                                                           striped):
    """A forward's windows of a .npy file go to the kernels as views of the mapping (no
    pread) or as copies, with the same bits; undecided, the process times both."""
    x = rng.standard_normal((2, 3, 40, 36)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    if striped:
        monkeypatch.setattr(dd, "STRIPE_BYTES", 48)
        monkeypatch.setattr(dd, "_writer_helps", lambda tasks, threads: True)
    reads = []
    read_into = dd.MemmapArray.read_into
    monkeypatch.setattr(dd.MemmapArray, "read_into", lambda self, index, slot=None:
                        reads.append(index) or read_into(self, index, slot))
    results = {}
    for views in (True, False, None):
        monkeypatch.setattr(dd, "WINDOW_VIEWS", views)
        monkeypatch.setitem(dd._window_costs, "MemmapArray", dd._WindowCost())
        reads.clear()
        xd = dd.from_npy(tmp_path / "x.npy", chunks=(1, 3, 8, 36))
        out = dd.MemmapArray.create_npy(tmp_path / f"y{views}.npy", (2, 4, 40, 36),
                                        np.float32)
        dd.conv2d(xd, w, b, dilation=2, padding=2, out=out).compute(scheduler="sync")
        results[views] = np.load(tmp_path / f"y{views}.npy")
        assert (len(reads) == 0) if views else len(reads) > 0
        if views is None:
            cost = dd._window_costs["MemmapArray"]
            assert cost.choice is not None
            assert all(len(c) == dd.WINDOW_TRIALS for c in cost.costs.values())
    expected = dilconv.conv2d(x, w, b, dilation=2, padding=2)
    _within(results[True], expected, forward_bound(x, w, b, make_spec(
        x.shape, w.shape, 1, 2, 2, 1)))
    assert np.array_equal(results[True], results[False])
    assert np.array_equal(results[True], results[None])


def test_workers_beside_each_other_count_as_tasks(monkeypatch):
    """Workers of one machine keep its cores busy together: one worker beside another
    writes its blocks whole on two cores, alone it writes in stripes."""
    dd._sibling_workers.cache_clear()
    assert dd._sibling_workers() == 0          # not in a worker
    monkeypatch.setattr(dd, "_cores", lambda: 2)
    for siblings, helps in ((0, True), (1, False)):
        monkeypatch.setattr(dd, "_sibling_workers", lambda: siblings)
        assert dd._writer_helps(1, 1) is helps


def test_two_local_workers_see_each_other():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        counts = client.gather(client.map(lambda i: dd._sibling_workers(), range(4),
                                          pure=False))
    assert set(counts) == {1}


def test_raw_zarr_windows_mapped_or_read_give_the_same_bits(tmp_path, rng, monkeypatch):
    """A forward's windows of a raw zarr array, copied from the chunk files' mappings or
    read with pread, give the same bits; undecided, the process times both."""
    x = rng.standard_normal((1, 3, 40, 36)).astype(np.float32)
    _zarr(tmp_path / "x.zarr", x.shape, (1, 3, 8, 12))[...] = x
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    results = {}
    for views in (True, False, None):
        monkeypatch.setattr(dd, "WINDOW_VIEWS", views)
        monkeypatch.setitem(dd._window_costs, "RawZarrArray", dd._WindowCost())
        # 15 windows: enough for each kind's first and WINDOW_TRIALS of each.
        xd = dd.from_zarr(str(tmp_path / "x.zarr"), chunks=(1, 3, 8, 12))
        results[views] = dd.conv2d(xd, w, dilation=2, padding=2).compute(scheduler="sync")
        if views is None:
            assert dd._window_costs["RawZarrArray"].choice is not None
    _within(results[True], dilconv.conv2d(x, w, dilation=2, padding=2), forward_bound(
        x, w, None, make_spec(x.shape, w.shape, 1, 2, 2, 1)))
    assert np.array_equal(results[True], results[False])
    assert np.array_equal(results[True], results[None])


@pytest.mark.parametrize("mapped", [False, True])
def test_chunk_rows_kept_between_reads(tmp_path, rng, mapped):
    """Reads sharing a `_ChunkRows` give what zarr gives: a chunk first read for a few of
    its rows is read again where a later read takes more; chunks a read leaves behind are
    dropped, and their buffers reused."""
    x = rng.standard_normal((1, 2, 24, 20)).astype(np.float32)
    z = _zarr(tmp_path / "x.zarr", x.shape, (1, 2, 8, 8))
    z[...] = x
    raw, rows = dd.RawZarrArray.open(z), dd._ChunkRows()
    for index, buffers in [((0, slice(None), slice(6, 8), slice(0, 20)), 3),   # 2 rows each
                           ((0, slice(None), slice(0, 10), slice(3, 12)), 4),  # more rows
                           ((0, slice(None), slice(9, 24), slice(10, 20)), 4),  # 3 left behind
                           ((slice(None),) * 4, 9)]:
        np.testing.assert_array_equal(raw.read_into(index, mapped=mapped, rows=rows), x[index])
        assert set(rows.entries) == {chunk for _, chunk, _ in raw._pieces(index)[2]}
        assert rows.made == (0 if mapped else buffers)
