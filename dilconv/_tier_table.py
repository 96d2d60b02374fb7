"""The CPU tiers the kernels are built for, lowest first: setup.py reads the compiler flags,
dilconv._tiers the CPU features a tier needs (keys of dilconv._cpu.cpu_features()).

Plain data, no imports: setup.py loads this file by path before anything is built. The
flags enable exactly the features the loader checks (no -march=x86-64-v3, which also
enables BMI, MOVBE and F16C that the loader does not test), so a tier's code never holds an
instruction its check has not seen.
"""
_V3_FLAGS = ("-mavx2", "-mfma")
_V4_FLAGS = _V3_FLAGS + ("-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl")

# name -> (compiler flags, CPU features required at run time, architectures built for).
# baseline is the architecture's default target (SSE2 on x86-64, NEON on aarch64): the
# interpreter itself runs on it, so it needs no check and exists everywhere.
TIERS = {
    "baseline": ((), (), None),
    "v3": (_V3_FLAGS, ("avx", "avx2", "fma"), ("x86_64",)),
    "v4": (_V4_FLAGS, ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl"),
           ("x86_64",)),
}
# The package holding a tier's kernel modules, e.g. dilconv._kern_v3._panel.
PACKAGE = "_kern_{}"
