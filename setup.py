"""Build the Cython kernels in pyx/ into extension modules of the dilconv package.

Environment switches:
  DILCONV_NO_OPENMP=1   build serial kernels even if the compiler supports OpenMP
  DILCONV_REQUIRE_OPENMP=1  fail instead of falling back to a serial build
  DILCONV_DEBUG=1       bounds checks on in the kernels, -O0 -g (for gdb and debugging)
  DILCONV_SANITIZE=1    AddressSanitizer + UndefinedBehaviorSanitizer (see README, Testing)
  DILCONV_MARCH=...     CPU the kernels are tuned for: "native" (default: this machine's
                        instructions, e.g. AVX2/FMA, used when the compiler accepts it),
                        "none" for the compiler's generic target (portable binaries, wheels),
                        or any -march value such as "x86-64-v3"
"""
import os
import subprocess
import sys
import tempfile
import textwrap

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

KERNEL_MODULES = ["_openmp_helpers", "_cpu", "_forward", "_backward", "_gemm", "_flat", "_panel",
                  "_depthwise"]
# Per-module flags. _depthwise: no fused multiply-adds, so that every block size rounds the
# same way (gcc fused the sums of some blocks and not of others), and an output's bits do
# not depend on which block computed it.
MODULE_FLAGS = {"_depthwise": ["-ffp-contract=off"]}


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _compiler_accepts(flags, source):
    """True when the C compiler builds and links `source` with `flags`."""
    cc = os.environ.get("CC", "cc")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(source)
        cmd = [cc, src, "-o", os.path.join(tmp, "probe")] + flags
        try:
            return subprocess.run(cmd, capture_output=True).returncode == 0
        except OSError:
            return False


OPENMP_PROBE = textwrap.dedent("""
    #include <omp.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        return omp_get_max_threads() > 0 && n > 0 ? 0 : 1;
    }
""")


def openmp_flags():
    if _env_flag("DILCONV_NO_OPENMP"):
        return []
    if _compiler_accepts(["-fopenmp"], OPENMP_PROBE):
        return ["-fopenmp"]
    message = "dilconv: the C compiler does not support OpenMP; building serial kernels"
    if _env_flag("DILCONV_REQUIRE_OPENMP"):
        sys.exit(message)
    print("WARNING: " + message, file=sys.stderr)
    return []


def arch_flags():
    march = os.environ.get("DILCONV_MARCH", "native").strip()
    if march.lower() in ("", "none", "0", "generic"):
        return []
    flag = f"-march={march}"
    if _compiler_accepts([flag], "int main(void) { return 0; }\n"):
        return [flag]
    if "DILCONV_MARCH" in os.environ:
        sys.exit(f"dilconv: the C compiler does not accept {flag}")
    print(f"WARNING: dilconv: the C compiler does not accept {flag}; generic build",
          file=sys.stderr)
    return []


class BuildExt(build_ext):
    """Decide compiler flags at build time (the compiler is only known then)."""

    def build_extensions(self):
        omp = openmp_flags()
        if _env_flag("DILCONV_DEBUG"):
            opt = ["-O0", "-g"]
        else:
            opt = ["-O3"] + arch_flags()
        sanitize = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"] \
            if _env_flag("DILCONV_SANITIZE") else []
        for ext in self.extensions:
            module = ext.name.rsplit(".", 1)[-1]
            ext.extra_compile_args = opt + omp + sanitize + MODULE_FLAGS.get(module, [])
            ext.extra_link_args = omp + sanitize
        super().build_extensions()


def extensions():
    directives = {
        "language_level": 3,
        "boundscheck": _env_flag("DILCONV_DEBUG"),
        "wraparound": False,
        "cdivision": True,
        "initializedcheck": False,
    }
    exts = [
        Extension(
            f"dilconv.{name}",
            [f"pyx/{name}.pyx"],
            include_dirs=[numpy.get_include(), "pyx"],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        )
        for name in KERNEL_MODULES
    ]
    return cythonize(exts, compiler_directives=directives, include_path=["pyx"])


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
