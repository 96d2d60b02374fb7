"""Build the Cython kernels in pyx/ into extension modules of the dilconv package.

The kernel modules are built once per CPU tier of the target architecture (x86-64:
baseline SSE2, v3 AVX2+FMA, v4 AVX-512; elsewhere baseline only; dilconv/_tier_table.py),
as dilconv._kern_<tier>.<module>; dilconv._tiers picks one at import from the running CPU.
Nothing depends on the building machine's CPU, so a wheel runs on every CPU of its
architecture.

Environment switches:
  DILCONV_NO_OPENMP=1   build serial kernels even if the compiler supports OpenMP
  DILCONV_REQUIRE_OPENMP=1  fail instead of falling back to a serial build
  DILCONV_DEBUG=1       bounds checks on in the kernels, -O0 -g (for gdb and debugging)
  DILCONV_SANITIZE=1    AddressSanitizer + UndefinedBehaviorSanitizer (see README, Testing)
  DILCONV_TIERS=a,b     build only these tiers (baseline is always built): quicker
                        development builds
A change of any of these (or of CC/CFLAGS) rebuilds what it affects: every compiled module
depends on a file holding its flags, rewritten when they change.
"""
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import textwrap

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# Built once per tier.
KERNEL_MODULES = ["_forward", "_backward", "_gemm", "_flat", "_panel", "_depthwise"]
# Built once, with the baseline flags, and imported before a tier is chosen (_cpu compiles
# each of its probes for the instructions the probe needs).
COMMON_MODULES = ["_openmp_helpers", "_cpu", "_callpath"]
# Per-module flags. _depthwise: no fused multiply-adds, so that every block size rounds the
# same way (gcc fused the sums of some blocks and not of others), and an output's bits do
# not depend on which block computed it.
# _cpu: optimised in debug builds too, since its probes measure the CPU's peak.
# _panel: gcc would turn its short copy loops (the runs panels are packed from) into calls
# to memmove, whose set-up costs more than the copy; used where the compiler takes it.
MODULE_FLAGS = {"_depthwise": ["-ffp-contract=off"], "_cpu": ["-O3"]}
OPTIONAL_MODULE_FLAGS = {"_panel": ["-fno-tree-loop-distribute-patterns"]}
TIER_TABLE = runpy.run_path(os.path.join("dilconv", "_tier_table.py"))
TIERS, TIER_PACKAGE = TIER_TABLE["TIERS"], TIER_TABLE["PACKAGE"]
# Generated sources: each tier's copy of the .pyx files, so that each gets its own C file.
SOURCE_DIR = os.path.join("build", "dilconv-src")


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


# The one place for Cython's directives (the .pyx files set none).
DIRECTIVES = {
    "language_level": 3,
    "boundscheck": _env_flag("DILCONV_DEBUG"),
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": False,
}


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


def target_arch():
    """The architecture the compiler builds for (not the one running this script)."""
    for arch, macro in (("x86_64", "defined(__x86_64__) && !defined(__ILP32__)"),
                        ("aarch64", "defined(__aarch64__)")):
        if _compiler_accepts([], f"#if !({macro})\n#error\n#endif\nint main(void) {{ return 0; }}\n"):
            return arch
    return None


def tiers_to_build():
    """The target's tiers, lowest first, that DILCONV_TIERS asks for and the compiler takes."""
    if os.environ.get("DILCONV_MARCH", "").strip():
        sys.exit("dilconv: DILCONV_MARCH is no longer used: the kernels are built for every "
                 "CPU tier and the running CPU's is chosen at import (DILCONV_TIERS selects "
                 "tiers to build, DILCONV_ISA the tier to run)")
    arch = target_arch()
    available = [t for t, (_, _, arches) in TIERS.items() if arches is None or arch in arches]
    asked = os.environ.get("DILCONV_TIERS", "").strip()
    wanted = {t.strip() for t in asked.split(",") if t.strip()} if asked else set(available)
    unknown = wanted - set(available)
    if unknown:
        sys.exit(f"dilconv: DILCONV_TIERS={asked!r}: {', '.join(sorted(unknown))} not a tier "
                 f"of this target ({arch or 'unknown architecture'}: {', '.join(available)})")
    chosen = []
    for tier in available:
        if tier != "baseline" and tier not in wanted:
            continue
        flags = list(TIERS[tier][0])
        if flags and not _compiler_accepts(flags, "int main(void) { return 0; }\n"):
            if asked:
                sys.exit(f"dilconv: the C compiler does not accept {' '.join(flags)} "
                         f"(tier {tier})")
            print(f"WARNING: dilconv: the C compiler does not accept {' '.join(flags)}; "
                  f"tier {tier} not built", file=sys.stderr)
            continue
        chosen.append(tier)
    return chosen


def _write_if_changed(path, text):
    """Write `text` to `path` unless it already holds it (its mtime then says when it
    changed); True when written."""
    try:
        with open(path) as f:
            if f.read() == text:
                return False
    except OSError:
        pass
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return True


def _tier_of(ext_name):
    """'dilconv._kern_v3._panel' -> 'v3'; common modules are built as baseline."""
    parts = ext_name.split(".")
    prefix = TIER_PACKAGE.format("")
    return parts[1][len(prefix):] if len(parts) == 3 and parts[1].startswith(prefix) \
        else "baseline"


class BuildExt(build_ext):
    """Decide compiler flags at build time (the compiler is only known then)."""

    def build_extensions(self):
        omp = openmp_flags()
        module_flags = dict(MODULE_FLAGS)
        for module, flags in OPTIONAL_MODULE_FLAGS.items():
            if _compiler_accepts(flags + ["-Werror"], "int main(void) { return 0; }\n"):
                module_flags[module] = module_flags.get(module, []) + flags
        opt = ["-O0", "-g"] if _env_flag("DILCONV_DEBUG") else ["-O3"]
        sanitize = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"] \
            if _env_flag("DILCONV_SANITIZE") else []
        env = {k: os.environ.get(k, "") for k in ("CC", "CFLAGS", "CPPFLAGS", "LDFLAGS")}
        for ext in self.extensions:
            module = ext.name.rsplit(".", 1)[-1]
            ext.extra_compile_args = (opt + omp + sanitize + list(TIERS[_tier_of(ext.name)][0])
                                      + module_flags.get(module, []))
            ext.extra_link_args = omp + sanitize
            # Flags changed since the last build: the module depends on this file, so it is
            # rebuilt (setuptools only compares mtimes of sources and depends).
            stamp = os.path.join(self.build_temp, "dilconv-flags", ext.name + ".txt")
            _write_if_changed(stamp, repr((ext.extra_compile_args, ext.extra_link_args,
                                           ext.define_macros, env)))
            ext.depends = list(ext.depends) + [stamp]
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1
        super().build_extensions()

    def copy_extensions_to_source(self):
        # In-place and editable builds: the tier packages have no files of their own.
        for tier in TIERS:
            os.makedirs(os.path.join("dilconv", TIER_PACKAGE.format(tier)), exist_ok=True)
        super().copy_extensions_to_source()


def _copy_if_changed(src, dst):
    with open(src) as f:
        _write_if_changed(dst, f.read())


def extensions():
    common = dict(include_dirs=[numpy.get_include(), "pyx"],
                  define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")])
    exts = [Extension(f"dilconv.{name}", [f"pyx/{name}.pyx"], **common)
            for name in COMMON_MODULES]
    for tier in tiers_to_build():
        for name in KERNEL_MODULES:
            source = os.path.join(SOURCE_DIR, tier, f"{name}.pyx")
            _copy_if_changed(os.path.join("pyx", f"{name}.pyx"), source)
            exts.append(Extension(f"dilconv.{TIER_PACKAGE.format(tier)}.{name}", [source],
                                  **common))
    # Directives changed (a debug build after a release one): regenerate every C file.
    force = _write_if_changed(os.path.join(SOURCE_DIR, "directives.txt"), repr(DIRECTIVES))
    return cythonize(exts, compiler_directives=DIRECTIVES, include_path=["pyx"], force=force,
                     nthreads=os.cpu_count() or 1)


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
