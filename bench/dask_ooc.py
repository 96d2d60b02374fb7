"""Out-of-core proof for dilconv.dask: convolve a memory-mapped image larger than a memory
budget, with bounded peak memory, on dask's threaded scheduler and on dask.distributed.

    python -m bench.dask_ooc                       # 1x4x16384x16384 float32 (4.3 GB)
    python -m bench.dask_ooc --size 4096 --fit-size 1024   # quick look

The layer is C -> C channels, 3x3, dilation 2, padding 'same', float32 with bias. Steps:
1. write a random input file (raw float32, C order) in a temporary directory, in bands;
2. in a fresh process each (so peak RSS is that run's alone):
   - the in-memory call `dilconv.conv2d` on a size that fits (--fit-size), all threads;
   - dilconv.dask on that same in-memory array (threaded scheduler);
   - out of core, threaded scheduler: a dask array over the memory-mapped file ->
     dilconv.dask.conv2d -> `da.store` into a memory-mapped output file;
   - the same on a dask.distributed LocalCluster with 1 and with 2 worker processes
     (1 thread each); peak RSS is the sum over the workers and the client/scheduler process;
3. check a few output tiles (corners, chunk seams) against the in-memory call within the
   derived error bound (dilconv.tolerance).
Each task runs the kernels on one OpenMP thread (dilconv.dask's default), so dask's
threads/workers are the only parallelism. Disk space is checked first; the image is scaled
down (with a message) when the two files would not fit.
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
PAD = DILATION * (KERNEL - 1) // 2          # 'same' for an odd kernel


class MemmapArray:
    """A raw C-order file seen as an array by dask; small and picklable.

    Every read or write maps the file, copies, and unmaps again, so no process keeps more
    than the blocks it is working on resident.
    """

    def __init__(self, path, shape, dtype=np.float32):
        self.path, self.shape, self.dtype = str(path), tuple(shape), np.dtype(dtype)
        self.ndim = len(self.shape)

    def _map(self, mode):
        return np.memmap(self.path, self.dtype, mode, shape=self.shape)

    def __getitem__(self, index):
        return np.array(self._map("r")[index])

    def __setitem__(self, index, value):
        self._map("r+")[index] = value


def layer(channels, seed=1):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((channels, channels, KERNEL, KERNEL)) / (3 * channels)).astype(
        np.float32)
    return w, rng.standard_normal(channels).astype(np.float32)


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_input(path, shape, band_rows=256):
    rng = np.random.default_rng(0)
    mm = MemmapArray(path, shape)
    np.memmap(path, np.float32, "w+", shape=shape).flush()
    for n in range(shape[0]):
        for r in range(0, shape[2], band_rows):
            rows = min(band_rows, shape[2] - r)
            band = rng.random((shape[1], rows, shape[3]), dtype=np.float32) * 2 - 1
            mm[n, :, r:r + rows] = band


# --- runs, each in its own process --------------------------------------------------

def run_memory(cfg):
    import dilconv
    w, b = layer(cfg["channels"])
    size = cfg["fit_size"]
    x = np.random.default_rng(0).random((1, cfg["channels"], size, size), dtype=np.float32)
    result = {}
    for threads in (None, 1):
        dilconv.set_num_threads(threads)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            dilconv.conv2d(x, w, b, dilation=DILATION, padding="same")
            times.append(time.perf_counter() - t0)
        result[f"seconds_threads_{threads or dilconv.get_num_threads()}"] = min(times)
    dilconv.set_num_threads(None)
    result["pixels"] = size * size
    return result


def run_dask_memory(cfg):
    import dask.array as da
    import dilconv.dask
    w, b = layer(cfg["channels"])
    size, chunk = cfg["fit_size"], min(cfg["chunk"], cfg["fit_size"])
    x = np.random.default_rng(0).random((1, cfg["channels"], size, size), dtype=np.float32)
    xd = da.from_array(x, chunks=(1, -1, chunk, chunk))
    y = dilconv.dask.conv2d(xd, w, b, dilation=DILATION, padding="same")
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        y.compute(scheduler="threads", num_workers=cfg["threads"])
        times.append(time.perf_counter() - t0)
    return {"seconds": min(times), "pixels": size * size}


def _ooc_graph(cfg):
    import dask.array as da
    import dilconv.dask
    shape = (1, cfg["channels"], cfg["size"], cfg["size"])
    w, b = layer(cfg["channels"])
    x = da.from_array(MemmapArray(cfg["input"], shape), lock=False,
                      chunks=(1, -1, cfg["chunk"], cfg["chunk"]))
    y = dilconv.dask.conv2d(x, w, b, dilation=DILATION, padding="same")
    return y, MemmapArray(cfg["output"], shape)


def run_ooc_threads(cfg):
    import dask.array as da
    y, target = _ooc_graph(cfg)
    t0 = time.perf_counter()
    da.store(y, target, lock=False, scheduler="threads", num_workers=cfg["threads"])
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "pixels": cfg["size"] ** 2, "peak_rss_mb": peak_rss_mb(),
            "processes": {"main": peak_rss_mb()}}


def run_ooc_distributed(cfg):
    import dask.array as da
    from distributed import Client, LocalCluster
    y, target = _ooc_graph(cfg)
    with LocalCluster(n_workers=cfg["workers"], threads_per_worker=1, processes=True,
                      host="127.0.0.1", dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.run(lambda: None)          # workers up before the clock starts
        t0 = time.perf_counter()
        da.store(y, target, lock=False)
        seconds = time.perf_counter() - t0
        workers = client.run(peak_rss_mb)
    processes = {"client+scheduler": peak_rss_mb()}
    processes.update({f"worker {i}": rss for i, rss in enumerate(workers.values())})
    return {"seconds": seconds, "pixels": cfg["size"] ** 2,
            "peak_rss_mb": sum(processes.values()), "processes": processes}


RUNS = {"memory": run_memory, "dask-memory": run_dask_memory, "ooc-threads": run_ooc_threads,
        "ooc-distributed": run_ooc_distributed}


def in_child(kind, cfg):
    """Run one measurement in a fresh interpreter; its peak RSS is its own."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "bench.dask_ooc", "--child", kind,
                          json.dumps(cfg)], cwd=root, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{kind} run failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- checks and report --------------------------------------------------------------

def check_tiles(cfg, tile=192):
    """Output tiles at the corners and across chunk seams vs the in-memory call."""
    import dilconv
    from dilconv import tolerance
    c, size, chunk = cfg["channels"], cfg["size"], cfg["chunk"]
    shape = (1, c, size, size)
    x, y = MemmapArray(cfg["input"], shape), MemmapArray(cfg["output"], shape)
    w, b = layer(c)
    seam = max(0, min(size - tile, chunk - tile // 2))
    worst = 0.0
    for r, s in ((0, 0), (size - tile, size - tile), (seam, seam), (0, seam)):
        lo_r, hi_r = max(0, r - PAD), min(size, r + tile + PAD)
        lo_s, hi_s = max(0, s - PAD), min(size, s + tile + PAD)
        pads = ((lo_r - (r - PAD), r + tile + PAD - hi_r),
                (lo_s - (s - PAD), s + tile + PAD - hi_s))
        window = x[:, :, lo_r:hi_r, lo_s:hi_s]
        expected = dilconv.conv2d(window, w, b, dilation=DILATION, padding=pads)
        abs_sum = dilconv.conv2d(np.abs(window), np.abs(w), np.abs(b), dilation=DILATION,
                                 padding=pads)
        bound = tolerance.error_bound(abs_sum, c * KERNEL * KERNEL + 1, np.float32)
        worst = max(worst, tolerance.worst_ratio(y[:, :, r:r + tile, s:s + tile], expected,
                                                 bound))
    if worst > 1.0:
        sys.exit(f"output differs from the in-memory call: {worst:.3g} x the error bound")
    return worst


def fit_to_disk(size, channels, directory):
    """Largest size <= `size` (halving) whose input + output files fit on the disk."""
    free = shutil.disk_usage(directory).free
    need = lambda s: 2 * channels * s * s * 4 * 1.05 + 256 * MB      # noqa: E731
    requested = size
    while size > 256 and need(size) > free:
        size //= 2
    if size != requested:
        print(f"note: {free / 1e9:.1f} GB free in {directory}: input + output of "
              f"{requested}^2 need {need(requested) / 1e9:.1f} GB; using {size}x{size}")
    return size


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=16384, help="image height = width")
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=2048, help="spatial chunk edge")
    parser.add_argument("--budget-mb", type=float, default=1024,
                        help="memory budget the out-of-core runs must stay under (sum of "
                             "the processes' peak RSS)")
    parser.add_argument("--fit-size", type=int, default=4096,
                        help="image edge for the in-memory comparison")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="threads of dask's threaded scheduler")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="worker-process counts for dask.distributed")
    parser.add_argument("--dir", default=None, help="where the temporary files go")
    parser.add_argument("--keep", action="store_true", help="keep the files")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, cfg = args.child
        print(json.dumps(RUNS[kind](json.loads(cfg))))
        return

    directory = tempfile.mkdtemp(prefix="dilconv-ooc-", dir=args.dir)
    try:
        size = fit_to_disk(args.size, args.channels, directory)
        cfg = dict(size=size, channels=args.channels, chunk=min(args.chunk, size),
                   fit_size=args.fit_size, threads=args.threads,
                   input=os.path.join(directory, "input.f32"),
                   output=os.path.join(directory, "output.f32"))
        nbytes = args.channels * size * size * 4
        print(f"input 1x{args.channels}x{size}x{size} float32 = {nbytes / 1e9:.2f} GB, "
              f"chunks {cfg['chunk']}x{cfg['chunk']} "
              f"({args.channels * cfg['chunk'] ** 2 * 4 / MB:.0f} MiB), memory budget "
              f"{args.budget_mb:.0f} MiB; layer {args.channels}->{args.channels} 3x3 "
              f"dilation {DILATION} padding 'same'")
        if nbytes <= args.budget_mb * MB:
            print("note: the input fits in the budget: this run is not out of core")
        t0 = time.perf_counter()
        write_input(cfg["input"], (1, args.channels, size, size))
        np.memmap(cfg["output"], np.float32, "w+", shape=(1, args.channels, size, size))
        print(f"wrote the input in {time.perf_counter() - t0:.1f} s")

        rows = []
        mem = in_child("memory", cfg)
        for key, seconds in mem.items():
            if key.startswith("seconds_threads_"):
                rows.append((f"in memory {args.fit_size}^2, {key.rsplit('_', 1)[1]} "
                             f"OpenMP threads", seconds, mem["pixels"], None))
        dm = in_child("dask-memory", cfg)
        rows.append((f"dask threads={args.threads}, in memory {args.fit_size}^2",
                     dm["seconds"], dm["pixels"], None))
        runs = [("ooc-threads", f"out of core, dask threads={args.threads}", cfg)]
        runs += [("ooc-distributed", f"out of core, distributed {n} worker(s) x 1 thread",
                  dict(cfg, workers=n)) for n in args.workers]
        over = []
        for kind, label, run_cfg in runs:
            res = in_child(kind, run_cfg)
            worst = check_tiles(cfg)
            rows.append((label, res["seconds"], res["pixels"], res["peak_rss_mb"]))
            detail = ", ".join(f"{k} {v:.0f}" for k, v in res["processes"].items())
            print(f"  {label}: peak RSS MiB {detail}; tiles within "
                  f"{worst:.2g} x error bound")
            if res["peak_rss_mb"] > args.budget_mb:
                over.append(label)

        print(f"\n{'run':58s} {'seconds':>8s} {'Mpix/s':>8s} {'MB/s in':>8s} "
              f"{'peak RSS':>9s}")
        for label, seconds, pixels, rss in rows:
            mbs = pixels * args.channels * 4 / 1e6 / seconds
            rss_text = f"{rss:.0f} MiB" if rss is not None else "-"
            print(f"{label:58s} {seconds:8.2f} {pixels / 1e6 / seconds:8.1f} {mbs:8.1f} "
                  f"{rss_text:>9s}")
        if over:
            sys.exit(f"peak RSS over the {args.budget_mb:.0f} MiB budget: {', '.join(over)}")
    finally:
        if args.keep:
            print(f"files kept in {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
