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

The arrays are chunked in bands of full rows (--rows, by default 1/64 of the budget
per block): a band is one contiguous range of a row-major file, and its halo comes from the
next band only, so a few blocks are alive at a time. (With a 2-D grid of chunks, the blocks
waiting for their neighbours' halos make a front about two block-rows deep, and reading a
narrow tile of a wide memory-mapped file maps whole pages of the neighbouring columns.)
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


def band_rows(cfg, width) -> int:
    """Rows per chunk: --rows, or a block of about budget/64."""
    if cfg["rows"]:
        return cfg["rows"]
    return max(1, int(cfg["budget_mb"] * MB / 64 / (cfg["channels"] * width * 4)))


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def allocate(path, shape):
    """A file for a float32 array of `shape`; its blocks are reserved up front where the
    OS can (writing through a memory map into a sparse file costs a block allocation per
    page fault)."""
    nbytes = int(np.prod(shape)) * 4
    with open(path, "wb") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, nbytes)
        except (AttributeError, OSError):
            f.truncate(nbytes)


def write_input(path, shape, band_rows=256):
    rng = np.random.default_rng(0)
    mm = MemmapArray(path, shape)
    allocate(path, shape)
    for n in range(shape[0]):
        for r in range(0, shape[2], band_rows):
            rows = min(band_rows, shape[2] - r)
            band = rng.random((shape[1], rows, shape[3]), dtype=np.float32) * 2 - 1
            mm[n, :, r:r + rows] = band


# --- runs, each in its own process --------------------------------------------------

def cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads) so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(function, repeat=1):
    """(wall seconds, CPU seconds) of the fastest of `repeat` calls."""
    best = None
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), cpu_seconds()
        function()
        run = (time.perf_counter() - wall, cpu_seconds() - cpu)
        best = run if best is None or run[0] < best[0] else best
    return best


def run_memory(cfg):
    import dilconv
    w, b = layer(cfg["channels"])
    size = cfg["fit_size"]
    x = np.random.default_rng(0).random((1, cfg["channels"], size, size), dtype=np.float32)
    runs = []
    for threads in (None, 1):
        dilconv.set_num_threads(threads)
        seconds, cpu = timed(lambda: dilconv.conv2d(x, w, b, dilation=DILATION,
                                                    padding="same"), repeat=3)
        runs.append({"label": f"in memory {size}^2, {dilconv.get_num_threads()} OpenMP "
                              f"threads", "seconds": seconds, "cpu": cpu,
                     "pixels": size * size})
    dilconv.set_num_threads(None)
    return runs


def run_dask_memory(cfg):
    import dask.array as da
    import dilconv.dask
    w, b = layer(cfg["channels"])
    size = cfg["fit_size"]
    x = np.random.default_rng(0).random((1, cfg["channels"], size, size), dtype=np.float32)
    xd = da.from_array(x, chunks=(1, -1, band_rows(cfg, size), -1))
    y = dilconv.dask.conv2d(xd, w, b, dilation=DILATION, padding="same")
    seconds, cpu = timed(lambda: y.compute(scheduler="threads", num_workers=cfg["threads"]),
                         repeat=3)
    return [{"label": f"dask threads={cfg['threads']}, in memory {size}^2",
             "seconds": seconds, "cpu": cpu, "pixels": size * size}]


def _ooc_graph(cfg):
    import dask.array as da
    import dilconv.dask
    shape = (1, cfg["channels"], cfg["size"], cfg["size"])
    w, b = layer(cfg["channels"])
    x = da.from_array(MemmapArray(cfg["input"], shape), lock=False,
                      chunks=(1, -1, band_rows(cfg, cfg["size"]), -1))
    y = dilconv.dask.conv2d(x, w, b, dilation=DILATION, padding="same")
    return y, MemmapArray(cfg["output"], shape)


def run_ooc_threads(cfg):
    import dask.array as da
    y, target = _ooc_graph(cfg)
    idle = peak_rss_mb()
    seconds, cpu = timed(lambda: da.store(y, target, lock=False, scheduler="threads",
                                          num_workers=cfg["threads"]))
    return [{"label": f"out of core, dask threads={cfg['threads']}", "seconds": seconds,
             "cpu": cpu, "pixels": cfg["size"] ** 2, "peak_rss_mb": peak_rss_mb(),
             "processes": {"main": (peak_rss_mb(), idle)}}]


def _usage():
    return cpu_seconds(), peak_rss_mb()


def run_ooc_distributed(cfg):
    import dask.array as da
    from distributed import Client, LocalCluster
    y, target = _ooc_graph(cfg)
    with LocalCluster(n_workers=cfg["workers"], threads_per_worker=1, processes=True,
                      host="127.0.0.1", dashboard_address=None) as cluster, \
            Client(cluster) as client:
        before = client.run(_usage)             # also: workers are up before the clock
        seconds, cpu = timed(lambda: da.store(y, target, lock=False))
        after = client.run(_usage)
    cpu += sum(after[w][0] - before[w][0] for w in after)
    processes = {"client+scheduler": (peak_rss_mb(), None)}
    processes.update({f"worker {i}": (after[w][1], before[w][1])
                      for i, w in enumerate(sorted(after))})
    return [{"label": f"out of core, distributed {cfg['workers']} worker(s) x 1 thread",
             "seconds": seconds, "cpu": cpu, "pixels": cfg["size"] ** 2,
             "peak_rss_mb": sum(peak for peak, _ in processes.values()),
             "processes": processes}]


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
    c, size, rows = cfg["channels"], cfg["size"], band_rows(cfg, cfg["size"])
    shape = (1, c, size, size)
    x, y = MemmapArray(cfg["input"], shape), MemmapArray(cfg["output"], shape)
    w, b = layer(c)
    seam = max(0, min(size - tile, rows - tile // 2))
    worst = 0.0
    for r, s in ((0, 0), (size - tile, size - tile), (seam, 0), (seam, size // 2)):
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
    parser.add_argument("--rows", type=int, default=None,
                        help="rows per chunk (default: blocks of about budget/64)")
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
        cfg = dict(size=size, channels=args.channels, rows=args.rows,
                   budget_mb=args.budget_mb, fit_size=args.fit_size, threads=args.threads,
                   input=os.path.join(directory, "input.f32"),
                   output=os.path.join(directory, "output.f32"))
        nbytes = args.channels * size * size * 4
        rows = band_rows(cfg, size)
        print(f"input 1x{args.channels}x{size}x{size} float32 = {nbytes / 1e9:.2f} GB, "
              f"chunks of {rows} rows x {size} "
              f"({args.channels * rows * size * 4 / MB:.0f} MiB), memory budget "
              f"{args.budget_mb:.0f} MiB; layer {args.channels}->{args.channels} 3x3 "
              f"dilation {DILATION} padding 'same'")
        if nbytes <= args.budget_mb * MB:
            print("note: the input fits in the budget: this run is not out of core")
        t0 = time.perf_counter()
        write_input(cfg["input"], (1, args.channels, size, size))
        allocate(cfg["output"], (1, args.channels, size, size))
        print(f"wrote the input in {time.perf_counter() - t0:.1f} s")

        results = in_child("memory", cfg) + in_child("dask-memory", cfg)
        runs = [("ooc-threads", cfg)]
        runs += [("ooc-distributed", dict(cfg, workers=n)) for n in args.workers]
        over = []
        for kind, run_cfg in runs:
            res = in_child(kind, run_cfg)[0]
            worst = check_tiles(cfg)
            results.append(res)
            detail = ", ".join(f"{k} {peak:.0f}" + (f" (idle {idle:.0f})" if idle else "")
                               for k, (peak, idle) in res["processes"].items())
            print(f"  {res['label']}: peak RSS MiB {detail}; output tiles within "
                  f"{worst:.2g} x the error bound")
            if res["peak_rss_mb"] > args.budget_mb:
                over.append(res["label"])

        print(f"\n{'run':52s} {'seconds':>8s} {'Mpix/s':>7s} {'MB/s in':>8s} "
              f"{'CPU s':>7s} {'Mpix/CPU s':>10s} {'peak RSS':>9s}")
        for res in results:
            mpix = res["pixels"] / 1e6
            rss = res.get("peak_rss_mb")
            rss_text = f"{rss:.0f} MiB" if rss is not None else "-"
            print(f"{res['label']:52s} {res['seconds']:8.2f} {mpix / res['seconds']:7.1f} "
                  f"{mpix * args.channels * 4 / res['seconds']:8.1f} {res['cpu']:7.1f} "
                  f"{mpix / res['cpu']:10.1f} {rss_text:>9s}")
        print(f"(load average during the runs: {os.getloadavg()[0]:.1f} on "
              f"{os.cpu_count()} cores)")
        if over:
            sys.exit(f"peak RSS over the {args.budget_mb:.0f} MiB budget: {', '.join(over)}")
    finally:
        if args.keep:
            print(f"files kept in {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
