"""Run the measurements into a report (a JSON-ready dict).

Honesty rules: one process; every implementation gets the same arrays; every peer's output
is checked against ours before it is timed; each call is warmed up; the implementations of
one (layer, op, dtype, threads) group are timed round-robin, one call per sample, and
reported as median and interquartile range.
"""
from __future__ import annotations

import contextlib
import datetime
import sys
import time
from dataclasses import asdict, dataclass

from threadpoolctl import threadpool_limits

import dilconv
from dilconv import _cpu

from . import layers as layers_mod
from .impls import Case, Dilconv, check
from .machine import load_average, machine_info
from .timing import (MAX_REPEAT, extra_memory, gemm_peak, repeats_for, summarize,
                     time_interleaved)

SCHEMA = 2
# A first call longer than this is its own warm-up and timing estimate.
SLOW_CALL_S = 1.0


@dataclass
class Settings:
    repeat: int = 5
    min_time: float = 0.2
    max_repeat: int = MAX_REPEAT
    peak_size: int = 2048


class Progress:
    """One status line on stderr: rewritten in place on a terminal, else a line per step."""

    def __init__(self, total: int, enabled: bool = True, stream=None):
        self.total, self.done, self.enabled = total, 0, enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = time.perf_counter()

    def step(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        line = (f"[{self.done:>{len(str(self.total))}}/{self.total}] {label}  "
                f"({elapsed:.0f} s elapsed)")
        if self.tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()


@contextlib.contextmanager
def thread_scope(n: int, torch=None):
    """Every implementation on `n` threads: ours, BLAS/OpenMP (threadpoolctl), PyTorch."""
    torch_before = torch.get_num_threads() if torch is not None else None
    dilconv.set_num_threads(n)
    if torch is not None:
        torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        dilconv.set_num_threads(None)
        if torch is not None:
            torch.set_num_threads(torch_before)


def _warm_up(call, before) -> tuple:
    """Run twice untimed (first-call costs), return (result of the first, time estimate)."""
    if before is not None:
        before()
    t0 = time.perf_counter()
    result = call()
    first = time.perf_counter() - t0
    if first > SLOW_CALL_S:
        return result, first
    if before is not None:
        before()
    t0 = time.perf_counter()
    call()
    return result, time.perf_counter() - t0


def _output_bytes(result) -> int:
    items = result if isinstance(result, tuple) else (result,)
    return sum(a.nbytes for a in items if a is not None)


def measure_group(case, op: str, threads: int, impls: list, settings: Settings) -> list:
    """Rows for every implementation on one (layer, op, dtype, threads)."""
    layer = case.layer
    nominal, effective = layers_mod.flops(case.spec, op)
    rows, runners, counts, ours = {}, {}, {}, None
    for impl in impls:
        row = {"layer": layer.name, "op": op, "dtype": case.dtype, "threads": threads,
               "impl": impl.name, "status": "ok", "note": None, **impl.info(case, op)}
        rows[impl.name] = row
        reason = impl.skip(case, op)
        if reason is None and ours is None and not isinstance(impl, Dilconv):
            reason = "dilconv did not run, so this output cannot be checked"
        if reason is not None:
            row.update(status="skipped", note=reason)
            continue
        try:
            call, before = impl.runner(case, op, threads)
            result, estimate = _warm_up(call, before)
            outputs = impl.outputs(result)
            if isinstance(impl, Dilconv):
                ours = outputs
            else:
                row["check"] = check(case, op, outputs, ours)
                if not row["check"] <= 1.0:
                    row.update(status="mismatch",
                               note=f"output differs from dilconv's by {row['check']:.3g} x "
                                    f"the derived error bound; not timed")
                    continue
        except Exception as exc:  # a broken peer must not stop the whole run
            row.update(status="error", note=f"{type(exc).__name__}: {exc}")
            continue
        runners[impl.name] = (call, before)
        counts[impl.name] = repeats_for(estimate, settings.repeat, settings.min_time,
                                        settings.max_repeat)
    times = time_interleaved(runners, counts)
    for impl in impls:
        row = rows[impl.name]
        if impl.name not in runners:
            continue
        row.update(summarize(times[impl.name]))
        row.update(impl.measured(case, op, threads))
        median = row["median_s"]
        row["gflops_nominal"] = nominal / median / 1e9
        row["gflops_effective"] = effective / median / 1e9
        if impl.measures_memory:
            row["extra_mib"] = extra_memory(runners[impl.name][0], _output_bytes) / 2 ** 20
    _add_ratios(rows)
    return list(rows.values())


def _add_ratios(rows: dict) -> None:
    """ratio = peer time / dilconv time (> 1: dilconv is faster); on dilconv's row, the
    ratio to torch and to the fastest peer timed (`vs_best`, with its name)."""
    ours = rows.get("dilconv", {}).get("median_s")
    for name, row in rows.items():
        if name != "dilconv":
            peer = row.get("median_s")
            row["ratio"] = peer / ours if ours and peer else None
    if "dilconv" in rows:
        rows["dilconv"]["ratio_to_torch"] = rows.get("torch", {}).get("ratio")
        timed = [(row["ratio"], name) for name, row in rows.items()
                 if name != "dilconv" and row.get("ratio")]
        best = min(timed, default=(None, None))
        rows["dilconv"]["vs_best"], rows["dilconv"]["best_peer"] = best


def thread_scaling(results: list) -> list:
    """Speed-up of each implementation from the fewest threads measured to each larger count."""
    ok = {}
    for row in results:
        if row["status"] == "ok":
            ok[(row["layer"], row["op"], row["dtype"], row["impl"], row["threads"])] = row
    out = []
    counts = sorted({key[-1] for key in ok})
    for key, row in ok.items():
        base = counts[0]
        if key[-1] == base:
            continue
        base_row = ok.get(key[:-1] + (base,))
        if base_row is None:
            continue
        out.append({"layer": key[0], "op": key[1], "dtype": key[2], "impl": key[3],
                    "threads": key[4], "base_threads": base,
                    "speedup": base_row["median_s"] / row["median_s"]})
    return out


def _gemm_peaks(dtypes: list, thread_counts: list, size: int) -> dict:
    return {dtype: {str(n): gemm_peak(dtype, n, size) for n in thread_counts}
            for dtype in dtypes}


def _fma_peaks(dtypes: list, thread_counts: list) -> dict:
    """{dtype: {width: {threads: GFLOP/s}}} of the CPU's own multiply-add probe."""
    return {dtype: {str(w): {str(n): _cpu.fma_peak(dtype, n, w) for n in thread_counts}
                    for w in _cpu.vector_widths()}
            for dtype in dtypes}


def peak_notes(fma: dict, matmul: dict) -> list:
    """Notes where numpy's matmul ran faster than the multiply-add peak ({dtype: {threads:
    GFLOP/s}} each): no product beats the arithmetic it is made of, so the probe did not
    reach the peak there, and %peak reads high."""
    return [f"numpy's matmul ({matmul[dtype][n]:.1f} GFLOP/s, {dtype}, {n} thread(s)) "
            f"beat the FMA peak probe ({fma[dtype][n]:.1f}): %peak overstates"
            for dtype in fma for n in fma[dtype] if matmul[dtype][n] > 1.05 * fma[dtype][n]]


def _bandwidths(thread_counts: list) -> dict:
    return {str(n): _cpu.copy_bandwidth(n) for n in thread_counts}


def _best(runs: list):
    """Elementwise maximum of nested dicts of numbers (peaks: a busy moment only lowers
    a measurement)."""
    if isinstance(runs[0], dict):
        return {k: _best([r[k] for r in runs]) for k in runs[0]}
    return max(runs)


def layer_record(layer) -> dict:
    spec = layer.spec()
    record = {"name": layer.name, "what": layer.what, "input": list(layer.input),
              "weight": list(layer.weight), "args": layer.describe(),
              "stride": spec.stride, "padding": spec.padding, "dilation": spec.dilation,
              "groups": spec.groups, "output": list(spec.output_shape), "flops": {}}
    for op in layers_mod.OPS:
        nominal, effective = layers_mod.flops(spec, op)
        record["flops"][op] = {"nominal": nominal, "effective": effective}
    record["effective_fraction"] = spec.effective_taps / (spec.kh * spec.kw * spec.ho * spec.wo)
    return record


def run(layers: list, ops: list, dtypes: list, thread_counts: list, peers: list,
        settings: Settings, progress: bool = True, command=None) -> dict:
    """Measure everything; `peers` are Impl instances (dilconv is added first)."""
    notes, active = [], [Dilconv()]
    torch = None
    peer_info = {}
    for peer in peers:
        reason = peer.missing()
        peer_info[peer.name] = {"title": peer.title, "timed": peer.timed,
                                "status": "skipped" if reason else "ok", "note": reason}
        if reason:
            notes.append(f"{peer.name} skipped: {reason}")
        else:
            active.append(peer)
            torch = getattr(peer, "torch", None) or torch
    impl_info = {impl.name: {"title": impl.title, "timed": impl.timed} for impl in active}
    info = machine_info()
    usable = info["cores"]["usable"]
    if usable and max(thread_counts) > usable:
        notes.append(f"{max(thread_counts)} threads requested but only {usable} cores "
                     f"usable: those timings are oversubscribed")
    # Yardsticks, measured at the start and again at the end: a busy moment must not
    # lower a peak.
    def yardsticks():
        return {"matmul": _gemm_peaks(dtypes, thread_counts, settings.peak_size),
                "fma": _fma_peaks(dtypes, thread_counts),
                "copy": _bandwidths(thread_counts)}
    yard_runs = {"start": yardsticks()}
    bar = Progress(len(layers) * len(dtypes) * len(thread_counts) * len(ops), progress)
    results = []
    try:
        for layer in layers:
            for dtype in dtypes:
                case = Case.make(layer, dtype)
                for n in thread_counts:
                    with thread_scope(n, torch):
                        used = {"dilconv": dilconv.get_num_threads()}
                        if torch is not None:
                            used["torch"] = torch.get_num_threads()
                        for op in ops:
                            bar.step(f"{layer.name} {op} {dtype} {n} thread(s)")
                            rows = measure_group(case, op, n, active, settings)
                            for row in rows:
                                row["threads_used"] = used.get(row["impl"], n)
                            results.extend(rows)
    finally:
        for impl in active:
            impl.close()
    bar.finish()
    info["load_average_end"] = load_average()
    yard_runs["end"] = yardsticks()
    yard = _best(list(yard_runs.values()))
    widest = str(max(_cpu.vector_widths()))
    fma = {dtype: by_width[widest] for dtype, by_width in yard["fma"].items()}
    notes.extend(peak_notes(fma, yard["matmul"]))
    specs = {layer.name: layer.spec() for layer in layers}
    for row in results:
        if "gflops_effective" in row:
            threads, spec = str(row["threads"]), specs[row["layer"]]
            row["pct_peak"] = 100.0 * row["gflops_effective"] / fma[row["dtype"]][threads]
            row["pct_matmul"] = 100.0 * row["gflops_effective"] / yard["matmul"][
                row["dtype"]][threads]
            moved = layers_mod.min_bytes(spec, row["op"], row["dtype"])
            row["gbytes_per_s"] = moved / row["median_s"] / 1e9
            row["pct_copy_bw"] = 100.0 * row["gbytes_per_s"] / yard["copy"][threads]
        if row.get("warning"):
            notes.append(f"{row['impl']} on {row['layer']} {row['op']} {row['dtype']} "
                         f"{row['threads']} thread(s): {row['warning']}")
    memory_bound = {name: layers_mod.memory_bound(spec, fma, yard["copy"])
                    for name, spec in specs.items()}
    for row in results:
        if row["status"] != "ok":
            # Skip reasons repeat for every dtype and thread count: say each once.
            where = f"{row['layer']} {row['op']}"
            if row["status"] != "skipped":
                where += f" {row['dtype']} {row['threads']} thread(s)"
            note = f"{row['impl']} {row['status']} on {where}: {row['note']}"
            if note not in notes:
                notes.append(note)
    return {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "settings": {**asdict(settings), "ops": ops, "dtypes": dtypes,
                     "threads": thread_counts},
        "machine": info,
        # %peak divides by the CPU's own multiply-add peak at its widest vectors;
        # numpy's matmul (OpenBLAS, as it was told to run) is reported beside it.
        "fma_peak_gflops": fma,
        "fma_peak_width_bits": int(widest),
        "fma_peak_by_width_gflops": yard["fma"],
        "copy_bandwidth_gbs": yard["copy"],
        "gemm_peak_gflops": yard["matmul"],
        "yardstick_runs": yard_runs,
        "memory_bound": memory_bound,
        "implementations": impl_info,
        "peers": peer_info,
        "layers": [layer_record(layer) for layer in layers],
        "results": results,
        "thread_scaling": thread_scaling(results),
        "notes": notes,
    }
