"""Render a report (see bench.run) as text tables."""
from __future__ import annotations

import math

SHORT = {"float32": "f32", "float64": "f64", "forward": "fwd", "backward": "bwd"}
KEY_ISA = ("sse2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl",
           "avx512_bf16", "amx_tile", "asimd", "sve")


def text_table(headers: list, rows: list, left: int = 1) -> str:
    """Columns padded to their widest cell; the first `left` columns left-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row):
        return "  ".join(c.ljust(w) if i < left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths))).rstrip()
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def _num(value, fmt="{:.3g}", missing="-"):
    return missing if value is None else fmt.format(value)


def _ms(row) -> str:
    if row is None:
        return "-"
    if row["status"] != "ok":
        return {"skipped": "skip", "mismatch": "WRONG", "error": "error"}[row["status"]]
    return _num(1e3 * row["median_s"])


def _ratio(row) -> str:
    return "-" if row is None or row.get("ratio") is None else f"{row['ratio']:.2f}x"


def machine_summary(report: dict) -> str:
    m = report["machine"]
    isa = [f for f in KEY_ISA if f in m["cpu"]["isa"]]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    build = m["dilconv_build"]
    lines = [f"CPU: {m['cpu']['model']} ({m['cores']['usable']} usable cores; "
             f"{' '.join(isa) or 'no AVX2/AVX-512'})",
             f"versions: {versions}; dilconv OpenMP {'on' if build['openmp'] else 'OFF'}, "
             f"CPU tier {build.get('tier', '?')}"]
    load = [v for v in (m.get("load_average"), m.get("load_average_end")) if v is not None]
    if load:
        cores = m["cores"]["logical"] or 1
        busy = "; other processes were using the CPU: timings are noisy" \
            if max(load) > 0.5 * cores else ""
        lines.append("load average (1 min) at start, end: "
                     + ", ".join(f"{v:.2f}" for v in load) + f" on {cores} cores" + busy)
    if build["env"]:
        lines.append("environment: " + " ".join(f"{k}={v}" for k, v in build["env"].items()))
    for key, value in sorted(m.get("openblas_env", {}).items()):
        lines.append(f"WARNING: {key}={value} is set: it forces numpy's OpenBLAS onto an "
                     f"older kernel, so the numpy matmul figure below understates the machine "
                     f"(unset it in the benchmark command)")

    def per_threads(by_threads, fmt="{:.1f}"):
        return ", ".join(f"{n} thr {fmt.format(v)}" for n, v in by_threads.items())
    widths = report["fma_peak_by_width_gflops"]
    for dtype, by_width in widths.items():
        lines.append(f"FMA peak {dtype} (GFLOP/s, the CPU's own multiply-add loop): "
                     + "; ".join(f"{w}-bit {per_threads(v)}" for w, v in by_width.items()))
    lines.append("copy bandwidth (GB/s read + written): "
                 + per_threads(report["copy_bandwidth_gbs"]))
    peaks = "; ".join(f"{dtype} {per_threads(by_threads)}"
                      for dtype, by_threads in report["gemm_peak_gflops"].items())
    lines.append(f"numpy matmul (OpenBLAS, GFLOP/s), for comparison only: {peaks}")
    lines.append(f"%peak: of the {report['fma_peak_width_bits']}-bit FMA peak at the same "
                 f"dtype and threads; best of the start and the end of the run")
    return "\n".join(lines)


def layer_table(report: dict) -> str:
    rows = []
    for rec in report["layers"]:
        rows.append([rec["name"], "x".join(map(str, rec["input"])),
                     "x".join(map(str, rec["weight"])), rec["args"],
                     _num(rec["flops"]["forward"]["nominal"] / 1e9, "{:.4g}"),
                     f"{100 * rec['effective_fraction']:.0f}%"])
    return text_table(["layer", "input", "weight", "args", "fwd GFLOP", "taps in image"],
                      rows, left=4)


def _peers(report: dict) -> list:
    return [name for name in report["implementations"] if name != "dilconv"]


def results_table(report: dict) -> str:
    """One line per (layer, op, dtype, threads): dilconv's numbers, then each peer's."""
    peers = _peers(report)
    groups = {}
    for row in report["results"]:
        key = (row["layer"], row["op"], row["dtype"], row["threads"])
        groups.setdefault(key, {})[row["impl"]] = row
    headers = ["layer", "op", "dtype", "thr", "path", "dilconv ms", "iqr", "GF/s", "%peak",
               "%bw", "MiB"]
    for peer in peers:
        headers += [f"{peer} ms", "%peak", f"vs {peer}"]
    headers.append("vs best")
    memory_bound = report.get("memory_bound", {})
    rows = []
    for (layer, op, dtype, threads), by_impl in groups.items():
        ours = by_impl["dilconv"]
        ok = ours["status"] == "ok"
        line = [layer, SHORT[op], SHORT.get(dtype, dtype),
                threads, ours.get("path", "-"), _ms(ours),
                f"{100 * ours['iqr_s'] / ours['median_s']:.0f}%" if ok else "-",
                _num(ours.get("gflops_effective")), _num(ours.get("pct_peak"), "{:.0f}"),
                _num(ours.get("pct_copy_bw") if memory_bound.get(layer) else None,
                     "{:.0f}"),
                _num(ours.get("extra_mib"), "{:.2g}")]
        for peer in peers:
            row = by_impl.get(peer)
            line += [_ms(row), _num(row and row.get("pct_peak"), "{:.0f}"), _ratio(row)]
        best = ours.get("vs_best")
        line.append("-" if best is None else f"{best:.2f}x {ours['best_peer']}")
        rows.append(line)
    return text_table(headers, rows, left=5)


def summary_table(report: dict) -> str:
    """Per (op, dtype, threads): geometric mean and minimum over layers of `vs best`."""
    groups = {}
    for row in report["results"]:
        if row["impl"] == "dilconv" and row.get("vs_best"):
            key = (row["op"], row["dtype"], row["threads"])
            groups.setdefault(key, []).append((row["vs_best"], row["layer"],
                                               row["best_peer"]))
    rows = []
    for (op, dtype, threads), values in groups.items():
        geomean = math.exp(sum(math.log(v) for v, _, _ in values) / len(values))
        worst = min(values)
        rows.append([SHORT[op], SHORT.get(dtype, dtype), threads, len(values),
                     f"{geomean:.2f}x", f"{worst[0]:.2f}x", f"{worst[1]} (vs {worst[2]})"])
    return text_table(["op", "dtype", "thr", "layers", "geomean vs best", "min vs best",
                       "where"], rows, left=3)


def long_table(report: dict) -> str:
    """One line per measurement, every number (what --json holds, minus the raw times)."""
    rows = []
    for r in report["results"]:
        ok = r["status"] == "ok"
        ratio = r.get("ratio_to_torch") if r["impl"] == "dilconv" else r.get("ratio")
        rows.append([r["layer"], SHORT[r["op"]], SHORT.get(r["dtype"], r["dtype"]),
                     r["threads"], r["impl"], _ms(r),
                     f"{100 * r['iqr_s'] / r['median_s']:.0f}%" if ok else "-",
                     r.get("repeats", "-"), _num(r.get("gflops_nominal")),
                     _num(r.get("gflops_effective")), _num(r.get("pct_peak"), "{:.0f}"),
                     _num(r.get("extra_mib"), "{:.2g}"),
                     "-" if ratio is None else f"{ratio:.2f}x"])
    return text_table(["layer", "op", "dtype", "thr", "impl", "ms", "iqr", "calls",
                       "nominal GF/s", "GF/s", "%peak", "MiB", "ratio"], rows, left=5)


def scaling_table(report: dict) -> str:
    impls = list(report["implementations"])
    cells = {}
    for s in report["thread_scaling"]:
        key = (s["layer"], s["op"], s["dtype"], f"{s['base_threads']}->{s['threads']}")
        cells.setdefault(key, {})[s["impl"]] = f"{s['speedup']:.2f}x"
    rows = [[key[0], SHORT[key[1]], SHORT.get(key[2], key[2]), key[3]]
            + [by.get(name, "-") for name in impls] for key, by in cells.items()]
    return text_table(["layer", "op", "dtype", "threads"] + impls, rows, left=4)


LEGEND = ("ms: median time of one call; iqr: interquartile range / median; GF/s: effective "
          "GFLOP/s (taps that read the image, 2 per multiply-add; backward = grad input + "
          "grad weight + grad bias); %peak: of the CPU's FMA peak (widest vectors) at the "
          "same dtype and threads; %bw (memory-bound layers only): bytes every call must "
          "move (each input read and each output written once) per second, as % of the "
          "copy bandwidth; MiB: peak extra numpy memory of one dilconv call beyond its "
          "outputs; vs <peer>: peer time / dilconv time (> 1: dilconv is faster; with "
          "--long, ratio is that for each peer and torch's time / dilconv's on dilconv's "
          "line); vs best: the fastest peer timed's time / dilconv's, and which peer. "
          "fwd = forward, bwd = backward.")


def render(report: dict, long: bool = False) -> str:
    table = long_table(report) if long else results_table(report)
    parts = [machine_summary(report), "", layer_table(report), "", table]
    if report["thread_scaling"]:
        parts += ["", "thread scaling (time at fewer threads / time at more):",
                  scaling_table(report)]
    if any(row.get("vs_best") for row in report["results"]):
        parts += ["", "summary (vs best: the fastest peer's time / dilconv's, per layer):",
                  summary_table(report)]
    parts += ["", LEGEND]
    if report["notes"]:
        parts += ["", "notes:"] + [f"- {note}" for note in report["notes"]]
    return "\n".join(parts)
