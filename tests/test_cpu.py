"""The CPU yardsticks (dilconv._cpu): features, the multiply-add peak probe, copy bandwidth."""
import platform
import re
import shutil
import subprocess
import time

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from dilconv import _cpu


def test_features_are_consistent():
    f = _cpu.cpu_features()
    assert set(f) == set(_cpu.FEATURES)
    assert all(isinstance(v, bool) for v in f.values())
    if platform.machine() in ("x86_64", "AMD64"):
        assert f["sse2"] and not f["neon"]
        # The OS saves the wider states only where it saves the narrower ones.
        assert not f["avx2"] or f["avx"]
        assert not f["avx512f"] or f["avx2"]
    widths = _cpu.vector_widths()
    assert widths[0] == 128 and widths == sorted(widths)
    assert (256 in widths) == (f["avx2"] and f["fma"])


def _cpuinfo(field):
    try:
        with open("/proc/cpuinfo") as f:
            return {line.split(":")[1].strip() for line in f
                    if line.split(":")[0].strip() == field}
    except OSError:
        pytest.skip("no /proc/cpuinfo")


def test_vendor_and_family_are_the_ones_in_cpuinfo():
    vendor, family = _cpu.cpu_vendor(), _cpu.cpu_family()
    assert vendor in ("amd", "intel", "")
    assert isinstance(family, int) and family >= 0
    if platform.machine() not in ("x86_64", "AMD64"):
        assert family == 0
        return
    ids, families = _cpuinfo("vendor_id"), _cpuinfo("cpu family")
    if ids:
        assert vendor == {"AuthenticAMD": "amd", "GenuineIntel": "intel"}.get(ids.pop(), "")
    if families:
        assert family == int(families.pop())


def _matmul_gflops(dtype, n=512, repeat=5):
    a = np.random.default_rng(0).standard_normal((n, n)).astype(dtype)
    b = a.T.copy()
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeat))
    return 2 * n ** 3 / best / 1e9


def _timed(f):
    start = time.perf_counter()
    f()
    return time.perf_counter() - start


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_probe_is_at_least_a_matmul(dtype):
    # A matmul cannot beat the arithmetic peak of the same core: a probe slower than
    # numpy's one-thread matmul is broken (spilled accumulators, too few of them: about
    # half the matmul's speed). Both are best of interleaved rounds; the margin absorbs
    # the noise of a shared machine.
    matmul = peak = 0.0
    with threadpool_limits(1):
        for _ in range(4):
            matmul = max(matmul, _matmul_gflops(dtype))
            peak = max(peak, _cpu.fma_peak(dtype, 1, seconds=0.05))
    assert peak >= 0.8 * matmul, (peak, matmul)


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump not installed")
def test_probe_loops_keep_their_accumulators_in_registers():
    # Every width's loop: an accumulator spilled to the stack puts a store-to-load chain
    # in it and the probe reads about half the peak (at every width, not only the widest
    # that the matmul test above checks).
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the probes' loops are checked on x86-64")
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", _cpu.__file__],
                         capture_output=True, text=True, check=True).stdout
    loops = re.findall(r"<(dilconv_probe_\w+?)(?:\.\w+)*>:\n(.*?)\n\n", asm, re.S)
    names = {name for name, _ in loops}
    assert {"dilconv_probe_f32_256", "dilconv_probe_f64_256"} <= names, names
    for name, body in loops:
        lines = body.splitlines()
        arith = [i for i, line in enumerate(lines)
                 if re.search(r"\tv?(fmadd\d*|mul|add)p[sd]", line)]
        loop = lines[arith[0]:arith[-1] + 1]
        spills = [line for line in loop if "(%rsp)" in line or "(%rbp)" in line]
        assert not spills, (name, spills[:3])


def test_wider_vectors_are_not_slower():
    # Doubling the vector width doubles (or, on cores that split wide vectors, keeps) the
    # peak; a width slower than a narrower one means its probe is not doing its work.
    runs = [[_cpu.fma_peak("float32", 1, w, seconds=0.03) for w in _cpu.vector_widths()]
            for _ in range(3)]
    rates = [max(by_width) for by_width in zip(*runs)]
    for narrow, wide in zip(rates, rates[1:]):
        assert wide >= 0.8 * narrow, rates


def test_float64_peak_is_about_half_of_float32():
    # Half the lanes per vector. Best of interleaved runs: a busy moment only lowers one.
    runs = [(_cpu.fma_peak("float32", 1, seconds=0.03),
             _cpu.fma_peak("float64", 1, seconds=0.03)) for _ in range(4)]
    f32, f64 = max(r[0] for r in runs), max(r[1] for r in runs)
    assert 0.35 <= f64 / f32 <= 0.65, runs


def test_probe_arguments_are_checked():
    with pytest.raises(TypeError, match="dtype"):
        _cpu.fma_peak(np.int32)
    with pytest.raises(ValueError, match="width"):
        _cpu.fma_peak("float32", 1, 1024)
    with pytest.raises(ValueError, match="threads"):
        _cpu.fma_peak("float32", 0)
    with pytest.raises(ValueError, match="threads"):
        _cpu.copy_bandwidth(0)


def test_copy_bandwidth_is_plausible():
    bw = _cpu.copy_bandwidth(1, nbytes=1 << 24, repeat=2)
    assert 0.5 < bw < 2000, bw
