"""Plot a report: per-layer speed ratios of dilconv against each peer (needs matplotlib)."""
from __future__ import annotations

import math

import numpy as np

COLORS = {"torch": "#1f77b4", "ort": "#d62728", "jax": "#9467bd", "numpy": "#ff7f0e",
          "scipy": "#2ca02c"}
OTHER_COLORS = ["#8c564b", "#e377c2", "#7f7f7f"]


def matplotlib_missing():
    """None if matplotlib can be imported, else why not."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib, or the [bench] extra)"
    return None


def _ratios(report: dict) -> dict:
    """{(op, dtype): {(peer, threads): {layer: ratio}}} for every timed peer."""
    out = {}
    for row in report["results"]:
        if row["impl"] != "dilconv" and row.get("ratio"):
            panel = out.setdefault((row["op"], row["dtype"]), {})
            panel.setdefault((row["impl"], row["threads"]), {})[row["layer"]] = row["ratio"]
    return out


def _label(ratio: float) -> str:
    if ratio != ratio:      # NaN: no bar
        return ""
    return f"{ratio:.0f}" if ratio >= 10 else f"{ratio:.2g}"


def _log_ticks(lo: float, hi: float) -> list:
    ticks = []
    for decade in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        ticks += [m * 10.0 ** decade for m in (1, 2, 5)]
    return [t for t in ticks if lo <= t <= hi]


def plot(report: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ratios = _ratios(report)
    layers = [rec["name"] for rec in report["layers"]]
    ops = [op for op in report["settings"]["ops"]]
    dtypes = report["settings"]["dtypes"]
    peers = [p for p in report["implementations"] if p != "dilconv"]
    threads = report["settings"]["threads"]
    colors = {p: COLORS.get(p, OTHER_COLORS[i % len(OTHER_COLORS)])
              for i, p in enumerate(peers)}
    values = [v for panel in ratios.values() for series in panel.values()
              for v in series.values()]
    lo = min(values + [1.0]) / 1.6
    hi = max(values + [1.0]) * 3.0      # room for the value labels above the bars

    # One panel per (op, dtype), stacked, so layer names stay on one shared-width axis.
    panels = [(op, dtype) for op in ops for dtype in dtypes]
    fig, axes = plt.subplots(len(panels), 1, squeeze=False, sharey=True,
                             figsize=(max(7.0, 1.5 * len(layers) + 2), 3.4 * len(panels) + 1.3))
    series = [(p, t) for p in peers for t in threads]
    width = 0.8 / max(1, len(series))
    x = np.arange(len(layers))
    for ax, (op, dtype) in zip(axes[:, 0], panels):
        panel = ratios.get((op, dtype), {})
        for k, (peer, t) in enumerate(series):
            data = panel.get((peer, t), {})
            heights = [data.get(name, np.nan) for name in layers]
            # Bars grow from parity (1) up when dilconv is faster, down when slower.
            bars = ax.bar(x + (k - (len(series) - 1) / 2) * width,
                          [h - 1 if h == h else np.nan for h in heights], width, bottom=1,
                          color=colors[peer], alpha=1.0 if t == max(threads) else 0.55,
                          hatch=None if t == max(threads) else "//", edgecolor="white",
                          linewidth=0.5)
            labels = [_label(h) for h in heights]
            ax.bar_label(bars, labels=labels, fontsize=6, padding=1, rotation=90)
        ax.axhline(1.0, color="black", linewidth=1)
        ax.set_yscale("log")
        ax.set_ylim(lo, hi)
        ticks = _log_ticks(lo, hi)
        ax.set_yticks(ticks, [f"{t:g}x" for t in ticks])
        ax.minorticks_off()
        ax.grid(axis="y", alpha=0.3)
        ax.set_xticks(x, layers, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{op}, {dtype}", fontsize=10)
        ax.set_ylabel("peer time / dilconv time\n(> 1: dilconv faster)", fontsize=9)
    handles = [Patch(facecolor=colors[p], alpha=1.0 if t == max(threads) else 0.55,
                     hatch=None if t == max(threads) else "//", edgecolor="white",
                     label=f"vs {p}, {t} thread{'s' if t > 1 else ''}")
               for p, t in series]
    cpu = report["machine"]["cpu"]["model"]
    fig.suptitle(f"dilconv speed ratio vs peers per layer  ({cpu}, "
                 f"{report['created'][:10]})", fontsize=11)
    if handles:
        # One legend column per peer: its 1-thread and n-thread entries stacked.
        fig.legend(handles=handles, loc="lower center", ncol=len(peers),
                   fontsize=8, frameon=False)
    missing = [n for n in layers for p in peers
               if not any(n in ratios.get((op, d), {}).get((p, t), {})
                          for op in ops for d in dtypes for t in threads)]
    if missing:
        fig.text(0.99, 0.005, "no bar: peer skipped (see the table's notes)", ha="right",
                 fontsize=7, color="dimgray")
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    fig.savefig(path, dpi=130)
    plt.close(fig)
