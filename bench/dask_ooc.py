"""Out of core with dilconv.dask: convolve an image larger than a memory budget from a file
or zarr store into another, on dask's threaded scheduler and on dask.distributed, and
compare the CPU it costs with the in-memory call.

    python -m bench.dask_ooc --format memmap zarr          # 1x4x16384x16384 float32 (4.3 GB)
    python -m bench.dask_ooc --format zarr --compressor none zstd --size 4096   # quick look
    python -m bench.dask_ooc --chain                       # the 7-layer context module

The layer is C -> C channels, 3x3, dilation 2, padding 'same', float32 with bias. With
--chain it is a context module instead: 7 layers of 3x3 convolutions with dilations
1, 1, 2, 4, 8, 16, 1, 'same', C -> 16 -> ... -> 16 -> C channels, fused by
`dilconv.dask.conv2d_chain` (each task runs all layers on its tile's window, widened by the
chain's reach of 33 pixels; only the input and the output are on disk).

Steps:
1. write a random input in the format asked for, in a temporary directory: a ``.npy`` file
   (``--format memmap``) read with `dilconv.dask.from_npy` (views of the page cache, no
   copy), or a zarr store chunked in tiles of --zarr-chunk pixels as slides and satellite
   scenes are stored, uncompressed or with a compressor (--compressor);
2. in a fresh process each (so peak RSS is that run's alone):
   - the in-memory call on a size that fits (--fit-size), at 1 thread and all threads;
   - out of core: `dilconv.dask.conv2d(x, ..., out=target)` writes every output block
     straight into the output file / store, on the threaded scheduler and on a
     dask.distributed LocalCluster of 1 and 2 worker processes (1 thread each);
   - the same reads and writes without the convolution (``copy``: the storage's own cost);
3. check output tiles (corners, chunk seams) against the in-memory call within the
   derived error bound (dilconv.tolerance).
Blocks come from `dilconv.dask.block_chunks` for the memory budget (multiples of the zarr
chunks). CPU seconds and peak RSS are summed over all processes of a run (client,
scheduler, workers). Each task runs the kernels on one OpenMP thread, so dask's
threads/workers are the only parallelism. Disk space is checked first; the image is
scaled down (with a message) when input and output would not fit.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

MB = 1024 ** 2
KERNEL, DILATION = 3, 2
CHAIN_DILATIONS = (1, 1, 2, 4, 8, 16, 1)
CHAIN_HIDDEN = 16
COMPRESSORS = ("none", "zstd", "blosc")
# glibc: keep freed blocks for reuse instead of returning them to the OS (and mapping them
# afresh, a page fault per page, for the next block). dask.distributed's nanny sets
# MALLOC_TRIM_THRESHOLD_=65536 for its workers, the opposite; --malloc default keeps that.
MALLOC_TUNED = {"MALLOC_MMAP_THRESHOLD_": str(32 * MB), "MALLOC_TRIM_THRESHOLD_": str(64 * MB)}


# --- the layers --------------------------------------------------------------------------

def layers(cfg):
    """[(weight, bias, dilation)] of the run: one layer, or the context module."""
    rng = np.random.default_rng(1)
    c = cfg["channels"]
    if not cfg.get("chain"):
        sizes, dilations = [(c, c)], (DILATION,)
    else:
        h = CHAIN_HIDDEN
        sizes = [(c, h)] + [(h, h)] * (len(CHAIN_DILATIONS) - 2) + [(h, c)]
        dilations = CHAIN_DILATIONS
    out = []
    for (cin, cout), d in zip(sizes, dilations):
        # Variance-preserving weights, so activations neither vanish nor blow up.
        w = rng.standard_normal((cout, cin, KERNEL, KERNEL)) * np.sqrt(2 / (cin * KERNEL ** 2))
        out.append((w.astype(np.float32), (0.1 * rng.standard_normal(cout)).astype(np.float32),
                    d))
    return out


def reach(cfg) -> int:
    """Rows one output reads on each side of it, through all layers."""
    return sum(d * (KERNEL - 1) // 2 for _, _, d in layers(cfg))


def apply(conv, x, cfg, last_out=None):
    """The run's layers on x with `conv` (dilconv.conv2d or dilconv.dask.conv2d), no
    activation between them."""
    stack = layers(cfg)
    for i, (w, b, d) in enumerate(stack):
        last = i == len(stack) - 1
        kwargs = {"out": last_out} if last and last_out is not None else {}
        x = conv(x, w, b, dilation=d, padding="same", **kwargs)
    return x


def in_memory(x, cfg, absolute=False):
    """The in-memory result, or (absolute) the chain of |w| * |x| + |b| for the bound."""
    import dilconv
    if not absolute:
        return apply(dilconv.conv2d, x, cfg)
    x = np.abs(x).astype(np.float64)
    for w, b, d in layers(cfg):
        x = dilconv.conv2d(x, np.abs(w).astype(np.float64), np.abs(b).astype(np.float64),
                           dilation=d, padding="same")
    return x


def terms(cfg) -> int:
    """Sum over the layers of the terms of one output (the chain's error bound adds them)."""
    return sum(w.shape[1] * KERNEL * KERNEL + 1 for w, _, _ in layers(cfg))


# --- storage -----------------------------------------------------------------------------

def open_source(cfg, path):
    """The stored array at `path` (a MemmapArray or a zarr array)."""
    import dilconv.dask
    if cfg["format"] == "memmap":
        return dilconv.dask.MemmapArray.open_npy(path)
    import zarr
    return zarr.open_array(path, mode="r")


def create_target(cfg, path, shape):
    import dilconv.dask
    if cfg["format"] == "memmap":
        return dilconv.dask.MemmapArray.create_npy(path, shape, np.float32)
    import zarr
    if cfg.get("store") == "direct":
        path = dilconv.dask.DirectStore(path)
    if cfg.get("store") == "raw" and cfg["compressor"] != "none":
        sys.exit("--zarr-store raw reads and writes uncompressed chunks only: use "
                 "--compressor none")
    compressors = {"none": None,
                   "zstd": zarr.codecs.ZstdCodec(level=1),
                   "blosc": zarr.codecs.BloscCodec(cname="lz4", clevel=5,
                                                   shuffle="bitshuffle")}[cfg["compressor"]]
    zc = cfg["zarr_chunk"]
    # write_empty_chunks: dense data; zarr's check for chunks equal to the fill value
    # (a byte-string comparison of every chunk) cost 15% of a copy's CPU.
    z = zarr.create_array(path, shape=shape, dtype="float32", overwrite=True,
                          chunks=(1, shape[1], zc, zc), compressors=compressors,
                          config={"write_empty_chunks": True})
    return dilconv.dask.RawZarrArray.open(z) if cfg.get("store") == "raw" else z


def write_input(cfg, path, shape):
    # Through the page cache, so the runs read it from memory (a MemmapArray would write
    # past it, and the first run would read the file from the disk).
    target = create_target(dict(cfg, store="local"), path, shape)
    if cfg["format"] == "memmap":
        target = np.load(path, mmap_mode="r+")
    rng = np.random.default_rng(0)
    rows = cfg["zarr_chunk"]
    for r in range(0, shape[2], rows):
        band = rng.random((1, shape[1], min(rows, shape[2] - r), shape[3]), dtype=np.float32)
        target[:, :, r:r + band.shape[2], :] = band * 2 - 1


def dask_input(cfg, tasks):
    """The input as a dask array in blocks sized for the budget."""
    import dask.array as da
    import dilconv.dask
    source = open_source(cfg, cfg["input"])
    widest = max([cfg["channels"]] + [w.shape[0] for w, _, _ in layers(cfg)])
    shape = (1, widest) + tuple(source.shape[2:])
    storage = None if cfg["format"] == "memmap" else source.chunks
    # A chain is fused (conv2d_chain): tiles whose windows widened by its reach fit. One
    # layer's tasks read a file or raw zarr store and write `out` themselves (streamed);
    # a copy's blocks are dask arrays, and zarr's codec pipeline copies each block it
    # writes.
    streamed = cfg["kind"] != "copy" and (cfg["format"] == "memmap" or cfg["store"] == "raw")
    chunks = dilconv.dask.block_chunks(shape, np.float32, cfg["budget_mb"] * MB, tasks=tasks,
                                       storage_chunks=storage,
                                       halo=reach(cfg) if cfg.get("chain") else 0,
                                       streamed=streamed)
    chunks = (1, cfg["channels"]) + chunks[2:]
    if cfg["format"] == "memmap":
        return dilconv.dask.from_npy(cfg["input"], chunks=chunks)
    if cfg["store"] == "raw":
        return dilconv.dask.from_zarr(source, chunks=chunks)
    return da.from_zarr(source, chunks=chunks)


# --- runs, each in its own process ---------------------------------------------------

def usage():
    """(CPU seconds, peak RSS MiB) of this process so far.

    Peak RSS from /proc's VmHWM, which starts afresh at exec: getrusage's ru_maxrss keeps
    the parent's peak at fork on Linux, so a child would report at least that.
    """
    u = resource.getrusage(resource.RUSAGE_SELF)
    peak = u.ru_maxrss / 1024                      # KiB on Linux
    try:
        with open("/proc/self/status") as f:
            peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        pass
    return u.ru_utime + u.ru_stime, peak


def run_memory(cfg):
    import dilconv
    size = cfg["fit_size"]
    x = np.random.default_rng(0).random((1, cfg["channels"], size, size), dtype=np.float32)
    runs = []
    for threads in (None, 1):
        dilconv.set_num_threads(threads)
        best = None
        for _ in range(3):
            wall, cpu = time.perf_counter(), usage()[0]
            in_memory(x, cfg)
            run = (time.perf_counter() - wall, usage()[0] - cpu)
            best = run if best is None or run[0] < best[0] else best
        runs.append({"label": f"in memory {size}^2, {dilconv.get_num_threads()} thread(s)",
                     "seconds": best[0], "cpu": best[1], "pixels": size * size})
    return runs


def _graph(cfg, tasks):
    """The lazy job: the layers from the input into a new target (or a plain copy)."""
    import dask.array as da
    import dilconv.dask
    x = dask_input(cfg, tasks)
    target = create_target(cfg, cfg["output"], x.shape)
    if cfg["kind"] == "copy":
        return da.store(x, target, lock=False, compute=False), x.chunksize
    if cfg.get("chain"):        # fused: each task runs all layers on its block's window
        return dilconv.dask.conv2d_chain(x, layers(cfg), out=target), x.chunksize
    return apply(dilconv.dask.conv2d, x, cfg, target), x.chunksize


def _imports(cfg):
    """Import what a run uses before the clock starts."""
    import dask.array  # noqa: F401
    import dilconv.dask  # noqa: F401
    try:                        # dask.compute imports it where it is installed (0.2 s)
        import distributed  # noqa: F401
    except ImportError:
        pass
    if cfg["format"] == "zarr":
        import zarr  # noqa: F401


def run_threads(cfg):
    import dask
    _imports(cfg)
    idle_cpu, idle = usage()
    wall = time.perf_counter()
    job, block = _graph(cfg, cfg["threads"])
    dask.compute(job, scheduler="threads", num_workers=cfg["threads"])
    cpu, peak = usage()
    return {"seconds": time.perf_counter() - wall, "cpu": cpu - idle_cpu, "peak_rss_mb": peak,
            "processes": {"main": (peak, idle)}, "block": block}


def run_distributed(cfg):
    import dask
    from distributed import Client, LocalCluster
    if cfg["malloc"] == "tuned":
        environ = dask.config.get("distributed.nanny.pre-spawn-environ")
        dask.config.set({"distributed.nanny.pre-spawn-environ": dict(environ, **MALLOC_TUNED)})
    with LocalCluster(n_workers=cfg["workers"], threads_per_worker=1, processes=True,
                      host="127.0.0.1", dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.run(_imports, cfg)
        _imports(cfg)
        before = client.run(usage)              # also: workers are up before the clock
        idle_cpu, idle = usage()
        wall = time.perf_counter()
        job, block = _graph(cfg, cfg["workers"])
        dask.compute(job)
        seconds = time.perf_counter() - wall
        after = client.run(usage)
        cpu, peak = usage()
    cpu = cpu - idle_cpu + sum(after[w][0] - before[w][0] for w in after)
    processes = {"client+scheduler": (peak, idle)}
    processes.update({f"worker {i}": (after[w][1], before[w][1])
                      for i, w in enumerate(sorted(after))})
    return {"seconds": seconds, "cpu": cpu, "block": block,
            "peak_rss_mb": sum(p for p, _ in processes.values()), "processes": processes}


RUNS = {"memory": run_memory, "threads": run_threads, "distributed": run_distributed}


def in_child(kind, cfg):
    """Run one measurement in a fresh interpreter; its peak RSS is its own."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, **(MALLOC_TUNED if cfg["malloc"] == "tuned" else {}))
    out = subprocess.run([sys.executable, "-m", "bench.dask_ooc", "--child", kind,
                          json.dumps(cfg)], cwd=root, capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"{kind} run failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- checks and report --------------------------------------------------------------

def check_tiles(cfg, tile=96):
    """Output tiles at the corners, the middle and across block seams vs the in-memory
    layers on the window they read (which a tile at the border shares with the image)."""
    from dilconv import tolerance
    x, y = open_source(cfg, cfg["input"]), open_source(cfg, cfg["output"])
    size, r = cfg["size"], reach(cfg)
    tile = min(tile, size)
    seam_h, seam_w = (max(0, min(size - tile, block - tile // 2))
                      for block in cfg.get("block", (size, size)))
    worst = 0.0
    for top, left in ((0, 0), (size - tile, size - tile), (seam_h, seam_w),
                      ((size - tile) // 2, 0)):
        r0, r1 = max(0, top - r), min(size, top + tile + r)
        c0, c1 = max(0, left - r), min(size, left + tile + r)
        window = np.asarray(x[:, :, r0:r1, c0:c1])
        crop = (slice(None), slice(None), slice(top - r0, top - r0 + tile),
                slice(left - c0, left - c0 + tile))
        expected = in_memory(window, cfg)[crop]
        bound = tolerance.error_bound(in_memory(window, cfg, absolute=True)[crop],
                                      terms(cfg), np.float32)
        got = np.asarray(y[:, :, top:top + tile, left:left + tile])
        worst = max(worst, tolerance.worst_ratio(got, expected, bound))
    if worst > 1.0:
        sys.exit(f"output differs from the in-memory call: {worst:.3g} x the error bound")
    return worst


def fit_to_disk(size, channels, directory):
    """Largest size <= `size` (halving) whose input + output fit on the disk."""
    free = shutil.disk_usage(directory).free
    need = lambda s: 2 * channels * s * s * 4 * 1.05 + 256 * MB      # noqa: E731
    requested = size
    while size > 256 and need(size) > free:
        size //= 2
    if size != requested:
        print(f"note: {free / 1e9:.1f} GB free in {directory}: input + output of "
              f"{requested}^2 need {need(requested) / 1e9:.1f} GB; using {size}x{size}")
    return size


def _remove(path):
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.unlink(path)


def measure(cfg, args, memory):
    """Every out-of-core run of one storage format; prints a line each, returns rows."""
    label = cfg["format"] + ("" if cfg["format"] == "memmap" else
                             f" {cfg['compressor']} {cfg['store']}")
    suffix = ".npy" if cfg["format"] == "memmap" else ".zarr"
    cfg = dict(cfg, input=os.path.join(cfg["dir"], "input" + suffix),
               output=os.path.join(cfg["dir"], "output" + suffix))
    shape = (1, cfg["channels"], cfg["size"], cfg["size"])
    t0 = time.perf_counter()
    write_input(cfg, cfg["input"], shape)
    print(f"{label}: wrote the input in {time.perf_counter() - t0:.1f} s")
    plans = [("threads", dict(cfg, label=f"{label}, dask threads={cfg['threads']}"))]
    plans += [("distributed", dict(cfg, workers=n, label=f"{label}, {n} worker(s)"))
              for n in args.workers]
    if args.copy:
        plans.append(("threads", dict(cfg, kind="copy",
                                      label=f"{label}, copy only, threads={cfg['threads']}")))
    rows = []
    try:
        for kind, run_cfg in plans:
            res = in_child(kind, run_cfg)
            res["label"], res["pixels"] = run_cfg["label"], cfg["size"] ** 2
            res["reference"] = memory
            if run_cfg.get("kind") != "copy":
                res["worst"] = check_tiles(dict(run_cfg, block=res["block"][2:]))
            _remove(cfg["output"])
            detail = ", ".join(f"{k} {peak:.0f}" + (f" (idle {idle:.0f})" if idle else "")
                               for k, (peak, idle) in res["processes"].items())
            check = (f"; output tiles within {res['worst']:.2g} x the error bound"
                     if "worst" in res else "")
            print(f"  {res['label']}: blocks {tuple(res['block'])}, peak RSS MiB "
                  f"{detail}{check}")
            rows.append(res)
    finally:
        _remove(cfg["input"])
        _remove(cfg["output"])
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--format", nargs="+", choices=("memmap", "zarr"), default=["memmap"],
                        help="storage of input and output (several: one after the other)")
    parser.add_argument("--compressor", nargs="+", choices=COMPRESSORS, default=["none"],
                        help="zarr compressor(s) (--format zarr)")
    parser.add_argument("--zarr-chunk", type=int, default=512,
                        help="zarr chunks of (1, C, n, n) pixels")
    parser.add_argument("--zarr-store", nargs="+", choices=("local", "direct", "raw"),
                        default=["local"],
                        help="output store: zarr's LocalStore, or dilconv.dask.DirectStore "
                             "(chunks written past the page cache); raw: input and output "
                             "read and written chunk file by chunk file "
                             "(dilconv.dask.from_zarr, RawZarrArray; --compressor none)")
    parser.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                        help="tuned: glibc keeps freed blocks for reuse (MALLOC_* variables "
                             "for every process of a run); default: as glibc and dask set it")
    parser.add_argument("--size", type=int, default=16384, help="image height = width")
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--chain", action="store_true",
                        help="the 7-layer context module instead of one layer")
    parser.add_argument("--budget-mb", type=float, default=1024,
                        help="memory budget the out-of-core runs must stay under (sum of "
                             "the processes' peak RSS)")
    parser.add_argument("--fit-size", type=int, default=None,
                        help="image edge for the in-memory comparison (default 4096, with "
                             "--chain 2048)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="threads of dask's threaded scheduler")
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2],
                        help="worker-process counts for dask.distributed")
    parser.add_argument("--copy", action="store_true",
                        help="also time reading and writing the data without convolving")
    parser.add_argument("--dir", default=None, help="where the temporary files go")
    parser.add_argument("--json", default=None, help="write the results to this file")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, cfg = args.child
        print(json.dumps(RUNS[kind](json.loads(cfg))))
        return
    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
    directory = tempfile.mkdtemp(prefix="dilconv-ooc-", dir=args.dir)
    try:
        size = fit_to_disk(args.size, args.channels, directory)
        fit = min(args.fit_size or (2048 if args.chain else 4096), size)
        cfg = dict(size=size, channels=args.channels, chain=args.chain,
                   budget_mb=args.budget_mb, fit_size=fit, threads=args.threads,
                   zarr_chunk=args.zarr_chunk, dir=directory, kind="conv",
                   malloc=args.malloc)
        nbytes = args.channels * size * size * 4
        what = (f"context module {args.channels}->{CHAIN_HIDDEN}->{args.channels} channels, "
                f"3x3, dilations {CHAIN_DILATIONS}" if args.chain else
                f"layer {args.channels}->{args.channels} 3x3 dilation {DILATION}")
        print(f"input 1x{args.channels}x{size}x{size} float32 = {nbytes / 1e9:.2f} GB, memory "
              f"budget {args.budget_mb:.0f} MiB; {what}, padding 'same'; load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        if nbytes <= args.budget_mb * MB:
            print("note: the input fits in the budget: this run is not out of core")
        memory = in_child("memory", cfg)
        reference = memory[-1]["pixels"] / memory[-1]["cpu"]
        results = []
        for fmt in args.format:
            for comp in (args.compressor if fmt == "zarr" else ["none"]):
                for store in (args.zarr_store if fmt == "zarr" else ["-"]):
                    results += measure(dict(cfg, format=fmt, compressor=comp, store=store),
                                       args, reference)
        report(memory, results, args)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def report(memory, results, args):
    reference = memory[-1]["pixels"] / memory[-1]["cpu"]
    print(f"\n{'run':44s} {'seconds':>8s} {'Mpix/s':>7s} {'CPU s':>7s} {'Mpix/CPU s':>10s} "
          f"{'vs memory':>9s} {'peak RSS':>9s}")
    for res in memory + results:
        mpix = res["pixels"] / 1e6
        rss = res.get("peak_rss_mb")
        rss_text = f"{rss:.0f} MiB" if rss is not None else "-"
        print(f"{res['label']:44s} {res['seconds']:8.2f} {mpix / res['seconds']:7.1f} "
              f"{res['cpu']:7.1f} {mpix / res['cpu']:10.1f} "
              f"{res['pixels'] / res['cpu'] / reference:9.0%} {rss_text:>9s}")
    by_label = {r["label"]: r for r in results}
    for res in results:
        if res["label"].endswith(", 2 worker(s)"):
            one = by_label.get(res["label"].replace("2 worker(s)", "1 worker(s)"))
            if one:
                print(f"{res['label']}: {one['seconds'] / res['seconds']:.2f}x one worker "
                      f"(wall time)")
    print(f"(vs memory: Mpix per CPU second over the in-memory call's at 1 thread; "
          f"load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    over = [r["label"] for r in results if r["peak_rss_mb"] > args.budget_mb]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"memory": memory, "out_of_core": results,
                       "load_average": os.getloadavg()}, f, indent=1)
    if over:
        sys.exit(f"peak RSS over the {args.budget_mb:.0f} MiB budget: {', '.join(over)}")


if __name__ == "__main__":
    main()
