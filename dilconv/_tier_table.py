"""The CPU tiers the kernels are built for, lowest first: setup.py reads the compiler flags,
dilconv._tiers the CPU features a tier needs (keys of dilconv._cpu.cpu_features()).

Plain data, no imports: setup.py loads this file by path before anything is built. The
flags enable exactly the features the loader checks (no -march=x86-64-v3, which also
enables BMI, MOVBE and F16C that the loader does not test), so a tier's code never holds an
instruction its check has not seen.
"""
_V3_FLAGS = ("-mavx2", "-mfma")
# The compiler's own loops stay 256 bits wide in v4 (the backward's short rows ran up to
# 1.3x slower with 512-bit loops and their longer tails); the vector types of pyx/_vec.h
# that ask for 64 bytes get zmm registers all the same.
_V4_FLAGS = _V3_FLAGS + ("-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl",
                         "-mprefer-vector-width=256")

_V3_FEATURES = ("avx", "avx2", "fma")
_V4_FEATURES = _V3_FEATURES + ("avx512f", "avx512bw", "avx512dq", "avx512vl")

# name -> (compiler flags, CPU features required at run time, architectures built for).
# baseline is the architecture's default target (SSE2 on x86-64, NEON on aarch64): the
# interpreter itself runs on it, so it needs no check and exists everywhere.
TIERS = {
    "baseline": ((), (), None),
    "v3": (_V3_FLAGS, _V3_FEATURES, ("x86_64",)),
    "v4": (_V4_FLAGS, _V4_FEATURES, ("x86_64",)),
    # For tests only, never chosen by default: v4's vector and block sizes in AVX2 code
    # (the compiler splits the wide vectors), so v4's logic runs on any AVX2 CPU.
    "v4_on_v3": (_V3_FLAGS + ("-DDILCONV_V4_LAYOUT",), _V3_FEATURES, ("x86_64",)),
}
# Tiers that run only when asked for (dilconv._tiers.use, DILCONV_ISA).
TEST_ONLY = ("v4_on_v3",)
# The package holding a tier's kernel modules, e.g. dilconv._kern_v3._panel.
PACKAGE = "_kern_{}"
