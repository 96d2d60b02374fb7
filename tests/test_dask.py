"""dilconv.dask against the in-memory calls: every chunking, forward and backward, threads
and dask.distributed."""
import pathlib
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")

import dilconv                                   # noqa: E402
import dilconv.dask as dd                        # noqa: E402
from dilconv import testing, tolerance           # noqa: E402
from dilconv._validate import make_spec          # noqa: E402

from _helpers import backward_bounds, forward_bound, random_case   # noqa: E402
from test_validation import BAD_BACKWARD, BAD_CONV2D                # noqa: E402

CASES = [
    # (n, c, h, w, o, kh, kw, stride, padding, dilation, groups)
    (2, 3, 17, 13, 4, 3, 3, 1, 0, 2, 1),
    (1, 4, 16, 15, 6, 3, 2, (2, 3), ((3, 1), (0, 4)), (2, 3), 2),
    (3, 2, 12, 11, 2, 1, 2, 3, 4, 1, 1),            # border blocks read only padding
    (1, 4, 11, 14, 4, 3, 3, 1, "same", 3, 4),       # depthwise, halo wider than chunks
    (2, 2, 9, 20, 3, 2, 3, (1, 2), 2, (4, 5), 1),   # dilated kernel == padded image rows
    (1, 8, 1, 40, 8, 1, 2, 1, 0, (1, 16), 1),       # wavenet-like
]

# Chunk sizes along (N, H, W); -1 is one chunk; a tuple is explicit (irregular) chunks.
CHUNKINGS = [(-1, -1, -1), (1, 1, 1), (1, 4, 5), (2, 7, 3), (1, "irregular", "irregular")]


def _irregular(size):
    """Chunks of sizes 3, 1, 5, 2, 3, 1, ... covering `size`."""
    chunks, pattern, i = [], (3, 1, 5, 2), 0
    while sum(chunks) < size:
        chunks.append(min(pattern[i % 4], size - sum(chunks)))
        i += 1
    return tuple(chunks)


def _chunked(x, chunking):
    n, h, w = (_irregular(size) if c == "irregular" else c
               for c, size in zip(chunking, (x.shape[0], x.shape[2], x.shape[3])))
    return da.from_array(x, chunks=(n, -1, h, w))


def _assert_within(got, expected, bound, what):
    assert got.shape == expected.shape and got.dtype == expected.dtype, what
    ratio = tolerance.worst_ratio(got, expected, bound)
    assert ratio <= 1.0, f"{what}: off by {ratio:.3g} x bound"


def _case(case, rng, dtype=np.float32):
    n, c, h, w, o, kh, kw, stride, padding, dilation, groups = case
    x, wt, b = random_case(rng, n, c, h, w, o, kh, kw, groups, dtype)
    args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return x, wt, b, args, make_spec(x.shape, wt.shape, stride, padding, dilation, groups)


@pytest.mark.parametrize("case", CASES)
def test_forward_equals_in_memory_for_every_chunking(case, rng):
    x, w, b, args, spec = _case(case, rng)
    expected = dilconv.conv2d(x, w, b, **args)
    bound = forward_bound(x, w, b, spec)
    for chunking in CHUNKINGS:
        y = dd.conv2d(_chunked(x, chunking), w, b, **args)
        assert y.shape == expected.shape and y.dtype == expected.dtype
        _assert_within(y.compute(scheduler="threads"), expected, bound, f"chunks {chunking}")


def test_same_padding_keeps_the_input_chunks():
    x = da.zeros((3, 2, 20, 17), chunks=((1, 2), 2, _irregular(20), (6, 11)))
    for dilation in (1, 3):
        y = dd.conv2d(x, np.zeros((4, 2, 3, 3)), padding="same", dilation=dilation)
        assert y.chunks == x.chunks[:1] + ((4,),) + x.chunks[2:]


@pytest.mark.parametrize("case", CASES)
def test_backward_equals_in_memory_for_every_chunking(case, rng):
    x, w, _, args, spec = _case(case, rng)
    gy = rng.standard_normal(spec.output_shape).astype(x.dtype)
    expected = dilconv.conv2d_backward(gy, x, w, **args)
    bounds = backward_bounds(gy, x, w, spec)
    for chunking in CHUNKINGS:
        # grad_output chunked independently of the input, once like it.
        for gy_chunking in ((1, 3, 2), chunking):
            grads = dd.conv2d_backward(_chunked(gy, gy_chunking), _chunked(x, chunking), w,
                                       **args, split_every=3)
            for name, got, exp, bound in zip(("input", "weight", "bias"),
                                             dask.compute(*grads, scheduler="threads"),
                                             expected, bounds):
                _assert_within(got, exp, bound, f"grad {name}, chunks {chunking}, grad "
                                                f"chunks {gy_chunking}")


def test_float64_and_needs(rng):
    x, w, b, args, spec = _case(CASES[1], rng, np.float64)
    gy = rng.standard_normal(spec.output_shape)
    xd = _chunked(x, (1, 5, 4))
    _assert_within(dd.conv2d(xd, w, b, **args).compute(), dilconv.conv2d(x, w, b, **args),
                   forward_bound(x, w, b, spec), "forward")
    grads = dd.conv2d_backward(da.from_array(gy, chunks=(1, -1, 3, 3)), xd, w, **args,
                               needs=("weight",))
    assert grads.input is None and grads.bias is None
    _assert_within(grads.weight.compute(),
                   dilconv.conv2d_backward(gy, x, w, **args, needs=("weight",)).weight,
                   backward_bounds(gy, x, w, spec)[1], "grad weight")


def test_grad_params_are_deterministic(rng):
    x, w, _, args, spec = _case(CASES[0], rng)
    gy = rng.standard_normal(spec.output_shape).astype(x.dtype)
    runs = []
    for scheduler, threads in (("threads", 1), ("threads", 2), ("synchronous", None)):
        grads = dd.conv2d_backward(_chunked(gy, (1, 2, 3)), _chunked(x, (1, 3, 4)), w, **args,
                                   threads_per_task=threads)
        runs.append(dask.compute(*grads, scheduler=scheduler))
    for run in runs[1:]:
        for got, first in zip(run, runs[0]):
            np.testing.assert_array_equal(got, first)


def test_tasks_use_threads_per_task(rng, monkeypatch):
    seen = []
    real = dd._api.conv2d

    def spy(*a, **k):
        seen.append(dilconv.get_num_threads())
        return real(*a, **k)

    monkeypatch.setattr(dd._api, "conv2d", spy)
    x, w, b, args, _ = _case(CASES[0], rng)
    dd.conv2d(_chunked(x, (1, 5, 5)), w, b, **args).compute(scheduler="threads")
    assert seen and set(seen) == {1}
    seen.clear()
    dd.conv2d(_chunked(x, (1, 5, 5)), w, b, **args,
              threads_per_task=None).compute(scheduler="sync")
    assert set(seen) == {dilconv.get_num_threads()}


def _in_new_thread(function):
    result = []
    thread = threading.Thread(target=lambda: result.append(function()))
    thread.start()
    thread.join()
    return result[0]


def test_limited_threads_is_per_thread_and_restored():
    before = dilconv.get_num_threads()
    default = _in_new_thread(dilconv.get_num_threads)     # what an unlimited thread sees
    barrier, seen = threading.Barrier(2), {}

    def limited():
        with dd.limited_threads(1):
            barrier.wait()
            seen["limited"] = dilconv.get_num_threads()
            barrier.wait()

    def free():
        barrier.wait()        # while the other thread holds its limit
        seen["free"] = dilconv.get_num_threads()
        barrier.wait()

    threads = [threading.Thread(target=f) for f in (limited, free)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"limited": 1, "free": default}
    with dd.limited_threads(1):
        assert dilconv.get_num_threads() == 1
    assert dilconv.get_num_threads() == before


def test_unbatched_int_numpy_and_empty_inputs(rng):
    x = rng.integers(-3, 4, (3, 10, 9))
    w = rng.standard_normal((2, 3, 3, 3))
    y = dd.conv2d(da.from_array(x, chunks=(3, 4, 4)), w, padding=1, dilation=2)
    assert y.dtype == np.float64 and y.ndim == 3
    expected = dilconv.conv2d(x, w, padding=1, dilation=2)
    np.testing.assert_array_equal(y.compute(), expected)   # integer data: exact sums
    np.testing.assert_array_equal(dd.conv2d(x, w, padding=1, dilation=2).compute(), expected)
    gx = dd.conv2d_backward(np.ones(expected.shape), x, w, padding=1, dilation=2).input
    np.testing.assert_array_equal(
        gx.compute(), dilconv.conv2d_backward(np.ones(expected.shape), x, w, padding=1,
                                              dilation=2).input)
    empty = da.zeros((0, 3, 10, 9), chunks=(1, 3, 5, 5))
    assert dd.conv2d(empty, w).compute().shape == (0, 2, 8, 7)
    grads = dask.compute(*dd.conv2d_backward(da.zeros((0, 2, 8, 7)), empty, w))
    assert grads[0].shape == (0, 3, 10, 9) and not grads[1].any() and not grads[2].any()


def test_channel_chunks_are_merged_with_a_warning(rng):
    x, w, b, args, spec = _case(CASES[1], rng)
    xd = da.from_array(x, chunks=(1, 1, 8, 8))
    with pytest.warns(dask.array.core.PerformanceWarning, match="chunked along channels"):
        y = dd.conv2d(xd, w, b, **args)
    _assert_within(y.compute(), dilconv.conv2d(x, w, b, **args), forward_bound(x, w, b, spec),
                   "forward")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dd.conv2d(xd.rechunk({1: -1}), w, b, **args)


def _assert_rejects_like_in_memory(function, lazy_function, call, exc):
    """The call raises `exc` in memory, and the same message with dask operands."""
    with pytest.raises(exc) as in_memory:
        function(**call)
    # The same bad call with its ndarray operands as dask arrays.
    lazy_call = {name: da.from_array(v, chunks=3) if isinstance(v, np.ndarray) and
                 name in ("input", "grad_output") else v for name, v in call.items()}
    with pytest.raises(exc) as lazy:
        lazy_function(**lazy_call)
    assert str(lazy.value) == str(in_memory.value)


@pytest.mark.filterwarnings("ignore:.*chunked along channels")
@pytest.mark.parametrize("kwargs, exc, words",
                         [c for c in BAD_CONV2D if "out" not in c[0]],
                         ids=lambda v: repr(v)[:40])
def test_conv2d_rejects_like_in_memory(kwargs, exc, words):
    call = dict(input=np.zeros((2, 4, 8, 8), np.float32), weight=np.zeros((6, 2, 3, 3),
                np.float32), bias=np.zeros(6, np.float32), groups=2)
    _assert_rejects_like_in_memory(dilconv.conv2d, dd.conv2d, {**call, **kwargs}, exc)


@pytest.mark.filterwarnings("ignore:.*chunked along channels")
@pytest.mark.parametrize("kwargs, exc, words", BAD_BACKWARD, ids=lambda v: repr(v)[:40])
def test_conv2d_backward_rejects_like_in_memory(kwargs, exc, words):
    call = dict(grad_output=np.zeros((2, 6, 6, 6), np.float32),
                input=np.zeros((2, 4, 8, 8), np.float32),
                weight=np.zeros((6, 2, 3, 3), np.float32), groups=2)
    _assert_rejects_like_in_memory(dilconv.conv2d_backward, dd.conv2d_backward,
                                   {**call, **kwargs}, exc)


@pytest.mark.parametrize("mode, padding", [("reflect", 4), ("reflect", ((0, 0), (1, 5))),
                                           ("circular", 5)])
def test_mode_padding_limits_like_in_memory(mode, padding):
    call = dict(input=np.zeros((1, 2, 4, 5)), weight=np.zeros((3, 2, 3, 3)), padding=padding,
                padding_mode=mode)
    _assert_rejects_like_in_memory(dilconv.conv2d, dd.conv2d, call, ValueError)
    call["grad_output"] = np.zeros(dilconv.output_shape((1, 2, 4, 5), (3, 2, 3, 3), 1,
                                                        padding))
    _assert_rejects_like_in_memory(dilconv.conv2d_backward, dd.conv2d_backward, call,
                                   ValueError)


@pytest.mark.parametrize("kwargs, exc", [
    (dict(threads_per_task=0), ValueError), (dict(threads_per_task=1.0), TypeError),
    (dict(threads_per_task=True), TypeError)])
def test_threads_per_task_rejects(kwargs, exc):
    with pytest.raises(exc, match="threads_per_task"):
        dd.conv2d(da.zeros((1, 1, 4, 4)), np.zeros((1, 1, 2, 2)), **kwargs)


def test_split_every_rejects():
    with pytest.raises(ValueError, match="split_every"):
        dd.conv2d_backward(da.zeros((1, 1, 3, 3)), da.zeros((1, 1, 4, 4)),
                           np.zeros((1, 1, 2, 2)), split_every=1)


def test_unknown_chunk_sizes_rejected():
    x = da.zeros((1, 1, 8, 8), chunks=4)
    x = x[:, :, x[0, 0, :, 0] >= 0]         # boolean indexing: chunk sizes unknown
    with pytest.raises(ValueError, match="compute_chunk_sizes"):
        dd.conv2d(x, np.zeros((1, 1, 2, 2)))


def test_import_dilconv_does_not_import_dask():
    code = "import sys, dilconv; print('dask' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


# --- non-zero padding modes -----------------------------------------------------------

def _np_fold(g, pads, mode):
    """Adjoint of numpy.pad on the spatial axes (the oracle's fold)."""
    size = tuple(g.shape[axis] - sum(p) for axis, p in zip((2, 3), pads))
    return testing.fold(g, size, pads, mode)[0].astype(g.dtype)


@pytest.mark.parametrize("mode", sorted(dd.PAD_MODES))
@pytest.mark.parametrize("pads", [((2, 1), (0, 3)), ((1, 0), (4, 4))])
def test_pad_and_fold_match_numpy(mode, pads, rng):
    x = rng.standard_normal((1, 2, 6, 5))
    chunks = (1, 2, (2, 4), (3, 2))
    padded = dd._pad_spatial(da.from_array(x, chunks=chunks), pads, mode)
    np.testing.assert_array_equal(padded.compute(), testing.pad(x, pads, mode))
    g = rng.standard_normal(padded.shape)
    folded = dd._fold_spatial(da.from_array(g, chunks=3), pads, mode, chunks)
    assert folded.chunks[2:] == chunks[2:]
    most = (sum(pads[0]) + 1) * (sum(pads[1]) + 1)      # padded pixels per source, at most
    _assert_within(folded.compute(), _np_fold(g, pads, mode),
                   tolerance.error_bound(_np_fold(np.abs(g), pads, mode), most, g.dtype),
                   "fold")


def _check_mode(mode, rng, forward, backward):
    """dilconv.dask with `padding_mode` against `forward(x, w, b, **args)` and
    `backward(gy, x, w, **args)`, within the bounds of the pad-then-convolve computation."""
    x, w, b, args, _ = _case(CASES[1], rng)
    args.update(padding=((2, 1), (3, 2)), padding_mode=mode)
    pads = args["padding"]
    xp = testing.pad(x, pads, mode)
    spec = make_spec(xp.shape, w.shape, args["stride"], 0, args["dilation"], args["groups"])
    xd = _chunked(x, (1, 5, 4))
    _assert_within(dd.conv2d(xd, w, b, **args).compute(), forward(x, w, b, **args),
                   forward_bound(xp, w, b, spec), "forward")
    gy = rng.standard_normal(spec.output_shape).astype(x.dtype)
    bounds = list(backward_bounds(gy, xp, w, spec))
    bounds[0] = _np_fold(bounds[0], pads, mode)
    grads = dask.compute(*dd.conv2d_backward(_chunked(gy, (1, 3, 2)), xd, w, **args))
    for name, got, exp, bound in zip(("input", "weight", "bias"), grads,
                                     backward(gy, x, w, **args), bounds):
        _assert_within(got, exp, bound, f"grad {name}")


@pytest.mark.parametrize("mode", sorted(dd.PAD_MODES))
def test_padding_modes_pad_then_convolve(mode, rng):
    # The oracle's way: numpy.pad, then the zero-padding in-memory calls.
    def padded(x, args):
        pads = args.pop("padding")
        return testing.pad(x, pads, args.pop("padding_mode")), pads

    def forward(x, w, b, **args):
        xp, _ = padded(x, args)
        return dilconv.conv2d(xp, w, b, **args)

    def backward(gy, x, w, **args):
        xp, pads = padded(x, args)
        g = dilconv.conv2d_backward(gy, xp, w, **args)
        return _np_fold(g.input, pads, mode), g.weight, g.bias

    _check_mode(mode, rng, forward, backward)


@pytest.mark.parametrize("mode", sorted(dd.PAD_MODES))
def test_padding_modes_follow_in_memory(mode, rng):
    _check_mode(mode, rng, dilconv.conv2d, dilconv.conv2d_backward)


# --- dask.distributed -----------------------------------------------------------------

@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=None) as cluster, \
            distributed.Client(cluster) as c:
        yield c


@pytest.mark.parametrize("case", [CASES[1], CASES[2]])
def test_distributed_matches_threads_bitwise(case, client, rng):
    x, w, b, args, spec = _case(case, rng)
    gy = rng.standard_normal(spec.output_shape).astype(x.dtype)
    xd, gyd = _chunked(x, (1, 4, 5)), _chunked(gy, (1, 3, 2))
    y = dd.conv2d(xd, w, b, **args)
    grads = dd.conv2d_backward(gyd, xd, w, **args)
    on_cluster = client.compute([y, *grads], sync=True)
    on_threads = dask.compute(y, *grads, scheduler="threads")
    for got, exp in zip(on_cluster, on_threads):
        np.testing.assert_array_equal(got, exp)
    _assert_within(on_cluster[0], dilconv.conv2d(x, w, b, **args),
                   forward_bound(x, w, b, spec), "forward")


@pytest.mark.parametrize("target", ["zarr", "memmap"])
def test_chain_from_zarr_into_storage_on_two_workers(target, client, rng, tmp_path):
    """Two layers (a ReLU between) in one graph, every block written by the workers."""
    zarr = pytest.importorskip("zarr")
    x = rng.standard_normal((1, 3, 40, 44)).astype(np.float32)
    layers = [(rng.standard_normal((5, 3, 3, 3)).astype(np.float32),
               rng.standard_normal(5).astype(np.float32), 2),
              (rng.standard_normal((3, 5, 3, 3)).astype(np.float32),
               rng.standard_normal(3).astype(np.float32), 3)]
    source = zarr.create_array(str(tmp_path / "x.zarr"), shape=x.shape, dtype="float32",
                               chunks=(1, 3, 16, 16))
    source[...] = x
    if target == "zarr":
        out = zarr.create_array(str(tmp_path / "y.zarr"), shape=x.shape, dtype="float32",
                                chunks=(1, 3, 16, 16))
    else:
        out = dd.MemmapArray.create_npy(tmp_path / "y.npy", x.shape, np.float32)
    y = da.from_zarr(source)
    for i, (w, b, d) in enumerate(layers):
        last = i == len(layers) - 1
        y = dd.conv2d(y, w, b, dilation=d, padding="same", **({"out": out} if last else {}))
        if not last:
            y = da.maximum(y, 0)
    client.compute(y, sync=True)
    # In memory, and the error bound of the chain: the terms of both layers over the
    # chain of absolute values (ReLU does not increase an error).
    expected, bound_sum = x, np.abs(x).astype(np.float64)
    for i, (w, b, d) in enumerate(layers):
        expected = dilconv.conv2d(expected, w, b, dilation=d, padding="same")
        if i < len(layers) - 1:
            expected = np.maximum(expected, 0)
        bound_sum = dilconv.conv2d(bound_sum, np.abs(w).astype(np.float64),
                                   np.abs(b).astype(np.float64), dilation=d, padding="same")
    terms = sum(w.shape[1] * 9 + 1 for w, _, _ in layers)
    _assert_within(np.asarray(out[...]), expected,
                   tolerance.error_bound(bound_sum, terms, np.float32), "chain")


@pytest.mark.slow
def test_out_of_core_benchmark_runs(tmp_path):
    pytest.importorskip("distributed")
    pytest.importorskip("zarr")
    root = pathlib.Path(__file__).resolve().parents[1]
    for extra in (["--format", "memmap", "zarr", "--compressor", "none", "zstd",
                   "--zarr-chunk", "128", "--copy"],
                  ["--chain", "--format", "zarr", "--zarr-chunk", "128", "--workers", "2"]):
        out = subprocess.run([sys.executable, "-m", "bench.dask_ooc", "--size", "768",
                              "--fit-size", "256", "--budget-mb", "2048",
                              "--dir", str(tmp_path)] + extra,
                             cwd=root, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        # Every out-of-core run (threads, and 1 and 2 workers unless told) checked.
        convs = 3 * 3 if "--copy" in extra else 2
        assert out.stdout.count("x the error bound") == convs, out.stdout
        assert not list(tmp_path.iterdir())       # temporary files removed
