"""What the numbers were measured on: CPU, ISA, cores, library versions, dilconv's build."""
from __future__ import annotations

import importlib
import os
import platform
import re
import subprocess
import sys

# ISA extensions that decide how fast a convolution kernel can be.
ISA_PATTERN = re.compile(r"^(sse\d.*|ssse3|avx.*|fma.*|f16c|amx.*|bmi\d|asimd.*|sve.*|neon)$")


def cpu_info(path: str = "/proc/cpuinfo") -> dict:
    """CPU model and ISA flags from /proc/cpuinfo, falling back to `platform`."""
    model, flags = None, []
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model", "cpu model") and model is None:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = value.split()
    except OSError:
        pass
    return {"model": model or platform.processor() or platform.machine(),
            "isa": sorted(f for f in flags if ISA_PATTERN.match(f)),
            "machine": platform.machine()}


def _version(module: str):
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except ImportError:
        return None


def _git_commit(directory: str):
    try:
        done = subprocess.run(["git", "-C", directory, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def dilconv_build() -> dict:
    import dilconv
    from dilconv import _openmp_helpers, _tiers
    package = os.path.dirname(dilconv.__file__)
    return {
        "tier": _tiers.current(),
        "tiers_supported": list(_tiers.SUPPORTED),
        "openmp": bool(_openmp_helpers.OPENMP_ENABLED),
        "openmp_max_threads": _openmp_helpers.max_threads(),
        "extensions": sorted(os.path.relpath(os.path.join(d, f), package)
                             for d, _, files in os.walk(package) for f in files
                             if f.endswith((".so", ".pyd"))),
        "git_commit": _git_commit(package),
        # DILCONV_PATH changes the kernel choice; record every DILCONV_* switch.
        "env": {k: v for k, v in os.environ.items()
                if k.startswith(("DILCONV_", "OMP_", "OPENBLAS_THREAD"))},
    }


def _threadpools() -> list:
    from threadpoolctl import threadpool_info
    keep = ("user_api", "internal_api", "version", "architecture", "threading_layer",
            "num_threads", "prefix")
    return [{k: pool.get(k) for k in keep} for pool in threadpool_info()]


def _torch_info() -> dict:
    try:
        import torch
    except ImportError:
        return {}
    info = {"cpu_capability": None, "parallel_info": None}
    try:
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        info["parallel_info"] = torch.__config__.parallel_info()
    except (AttributeError, RuntimeError):
        pass
    return info


def load_average():
    """1-minute load average: other processes' share of the cores while we measure."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def machine_info() -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu": cpu_info(),
        "cores": {"logical": os.cpu_count(), "usable": usable},
        "load_average": load_average(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": {name: _version(name) for name in
                     ("dilconv", "numpy", "scipy", "torch", "onnxruntime", "jax",
                      "threadpoolctl", "matplotlib")},
        "dilconv_build": dilconv_build(),
        "threadpools": _threadpools(),
        "torch": _torch_info(),
        # They force OpenBLAS (numpy's and scipy's BLAS) onto an older kernel.
        "openblas_env": {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
                         if k in os.environ},
    }
