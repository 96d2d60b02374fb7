"""dilconv.show_config(): what this process runs on (CPU tier, OpenMP, threads, BLAS)."""
from __future__ import annotations

import sys
from typing import Any, Dict, Optional, TextIO

from . import _cpu, _openmp_helpers, _threads, _tiers


def config() -> Dict[str, Any]:
    """The facts show_config() prints, as a dict (for reports and bug reports)."""
    import threadpoolctl

    return {
        "tier": _tiers.current(),
        "tier_reason": (_tiers.REASON if _tiers.current() == _tiers.DEFAULT
                        else "set in this thread by the tuning tier knob"),
        "tiers_built": list(_tiers.BUILT),
        "tiers_supported": list(_tiers.SUPPORTED),
        "tiers_unsupported": {t: _tiers.missing_features(t) for t in _tiers.BUILT
                              if t not in _tiers.SUPPORTED},
        "cpu_features": sorted(f for f, on in _tiers.FEATURES.items() if on),
        "cpu_vendor": _cpu.cpu_vendor() or "other",
        "panel_block": (_tiers._panel.MR, _tiers._panel.BLOCK_NBYTES),
        "panel_lanes": (_tiers._panel.LANES_DEFAULT, _tiers._panel.LANES_PIXELS),
        "openmp": bool(_openmp_helpers.OPENMP_ENABLED),
        "threads": _threads.get_num_threads(),
        "threads_set": _threads._requested,
        "blas": [{k: info.get(k) for k in ("internal_api", "version", "num_threads",
                                           "threading_layer", "architecture", "filepath")}
                 for info in threadpoolctl.threadpool_info() if info.get("user_api") == "blas"],
    }


def show_config(file: Optional[TextIO] = None) -> None:
    """Print the CPU tier the kernels run on and why, the tiers this CPU supports, OpenMP,
    the thread count and the BLAS libraries loaded (threadpoolctl).

    >>> import dilconv
    >>> dilconv.show_config()   # doctest: +ELLIPSIS
    dilconv ...
    CPU tier: ...
    """
    from . import __version__

    c = config()
    out = sys.stdout if file is None else file
    lines = [
        f"dilconv {__version__}",
        f"CPU tier: {c['tier']} ({c['tier_reason']})",
        f"tiers built: {', '.join(c['tiers_built'])}; supported by this CPU: "
        f"{', '.join(c['tiers_supported'])}"
        + "".join(f"; {t} needs {', '.join(m)}" for t, m in c["tiers_unsupported"].items()),
        f"CPU features: {' '.join(c['cpu_features']) or 'none detected'} "
        f"(vendor: {c['cpu_vendor']})",
        f"panel micro-kernel block: {c['panel_block'][0]} output channels x "
        f"{c['panel_block'][1]} bytes of pixels; "
        + (f"forward of long sums with output channels in vector lanes (2 vectors x "
           f"{c['panel_lanes'][1]} pixels)" if c["panel_lanes"][0]
           else "output channels in vector lanes only when tuned"),
        f"OpenMP: {'on' if c['openmp'] else 'off (serial kernels)'}",
        f"threads: {c['threads']} ("
        + ("following OpenMP" if c["threads_set"] is None
           else f"dilconv.set_num_threads({c['threads_set']})") + ")",
    ]
    if not c["blas"]:
        lines.append("BLAS: none loaded yet")
    for blas in c["blas"]:
        lines.append(f"BLAS: {blas['internal_api']} {blas['version']}, "
                     f"{blas['num_threads']} threads"
                     + (f", {blas['threading_layer']}" if blas.get("threading_layer") else "")
                     + (f", {blas['architecture']}" if blas.get("architecture") else "")
                     + f" ({blas['filepath']})")
    print("\n".join(lines), file=out)
