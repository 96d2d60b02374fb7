"""dilconv.dask on data on disk: files read in place, blocks written straight into zarr
arrays and files, block sizes from a memory budget."""
import os

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


# --- reading files in place -----------------------------------------------------------

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


@pytest.mark.parametrize("target, padding", [
    ("numpy", WIDE), ("memmap", WIDE), ("memmap", "same"), ("zarr", "same"),
    ("zarr-zstd", "same")])
def test_conv2d_out_writes_every_block(tmp_path, rng, target, padding):
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
        out = _zarr(tmp_path / "y.zarr", shape, (1, 4, 8, 16), compressors)
    xd = da.from_array(x, chunks=(1, 3, 8, 16))
    job = dd.conv2d(xd, w, b, dilation=2, padding=padding, out=out)
    assert isinstance(job, Delayed)
    assert job.compute(scheduler="threads") is out
    _within(out[...], expected, bound)


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
def test_block_chunks_fit_the_budget(shape, budget, tasks, layers, storage):
    n, c, rows, cols = dd.block_chunks(shape, np.float32, budget, tasks=tasks, layers=layers,
                                       storage_chunks=storage)
    assert (n, c) == (1, shape[1]) and 1 <= rows <= shape[2] and 1 <= cols <= shape[3]
    block = c * rows * cols * 4
    alive = tasks * dd.BLOCKS_PER_TASK + (layers - 1) * dd.BLOCKS_PER_LAYER
    assert block <= min(budget // 2 // alive, dd.MAX_BLOCK_BYTES) or (rows, cols) == shape[2:]
    if storage is not None:
        assert rows % storage[2] == 0 and (cols % storage[3] == 0 or cols == shape[3])
    if cols < shape[3]:        # tiles only where not one band of stored rows fits
        assert storage is not None and shape[1] * storage[2] * shape[3] * 4 > block
