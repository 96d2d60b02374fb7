"""CPU tiers: every tier this CPU runs gives results within the oracle's bound, the FMA
tiers (v3, v4) give the same bits, and the choice of tier follows the CPU and DILCONV_ISA."""
import io
import os
import re
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

import dilconv
from dilconv import _cpu, _dispatch, _tiers
from dilconv._tier_table import TIERS
from dilconv._tuning import PATHS, tuning

from _helpers import assert_conv_close, check_backward, check_forward, random_case

# Tiers with fused multiply-adds: they must agree bit for bit.
FMA_TIERS = [t for t in _tiers.SUPPORTED if "fma" in TIERS[t][1]]

# (N, C, H, W, O, kH, kW, stride, padding, dilation, groups): many channels, strided with
# asymmetric padding, grouped, depthwise (with a channel multiplier), few channels with
# 'same', and odd widths (vector tails).
GEOMETRIES = {
    "channels": (2, 16, 19, 23, 24, 3, 3, 1, 2, 2, 1),
    "strided": (1, 8, 17, 21, 12, 3, 3, 2, ((1, 2), (0, 3)), (2, 1), 1),
    "grouped": (1, 12, 15, 29, 18, 3, 2, 1, 1, 3, 3),
    "depthwise": (2, 8, 20, 40, 8, 3, 3, 1, 4, 4, 8),
    "depthwise_x2": (1, 4, 13, 37, 8, 3, 5, 1, ((2, 1), (3, 4)), (1, 2), 4),
    "rgb_same": (1, 3, 31, 37, 5, 5, 5, 1, "same", 2, 1),
    "wide_tail": (1, 32, 9, 71, 40, 1, 3, 1, ((0, 0), (3, 2)), 3, 1),
    "lanes": (1, 32, 13, 17, 32, 3, 3, 1, 3, 3, 1),       # v4's output channels in lanes
    # Packed panels of rows 65 wide: runs of every length and lane (partial-block copies).
    "packed_rows": (1, 16, 7, 65, 16, 3, 3, 1, 2, 2, 2),
}
PATH_CHOICES = (None,) + PATHS


def _case(rng, name, dtype):
    n, c, h, w, o, kh, kw, stride, padding, dilation, groups = GEOMETRIES[name]
    x, wt, b = random_case(rng, n, c, h, w, o, kh, kw, groups, dtype)
    return x, wt, b, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


def _run_all(x, wt, b, kw, tier, path, threads):
    """Forward and the three gradients on `tier`, `path`, `threads`."""
    dilconv.set_num_threads(threads)
    try:
        with tuning(tier=tier, path=path):
            y = dilconv.conv2d(x, wt, b, **kw)
            gy = np.cos(np.arange(y.size, dtype=x.dtype)).reshape(y.shape)
            grads = dilconv.conv2d_backward(gy, x, wt, **kw)
    finally:
        dilconv.set_num_threads(None)
    return (y,) + tuple(grads)


@pytest.mark.skipif(len(FMA_TIERS) < 2, reason="this CPU runs fewer than two FMA tiers")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_fma_tiers_give_the_same_bits(rng, name, dtype):
    x, wt, b, kw = _case(rng, name, dtype)
    for path in PATH_CHOICES:
        first = _run_all(x, wt, b, kw, FMA_TIERS[0], path, 1)
        for tier in FMA_TIERS:
            for threads in (1, 2):
                got = _run_all(x, wt, b, kw, tier, path, threads)
                for what, a, g in zip(("forward", "grad input", "grad weight", "grad bias"),
                                      first, got):
                    assert a.tobytes() == g.tobytes(), (
                        f"{what} on {tier} ({threads} threads, path {path}) differs from "
                        f"{FMA_TIERS[0]} (1 thread): max diff {np.abs(a - g).max()}")


@pytest.mark.parametrize("tier", _tiers.SUPPORTED)
@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_every_tier_within_the_oracle_bound(rng, tier, name):
    for dtype in (np.float32, np.float64):
        x, wt, b, kw = _case(rng, name, dtype)
        args = (kw["stride"], kw["padding"], kw["dilation"], kw["groups"])
        for path in PATH_CHOICES:
            with tuning(tier=tier, path=path):
                y = check_forward(x, wt, b, *args)
                check_backward(np.ones_like(y), x, wt, *args)


@pytest.mark.parametrize("tier", _tiers.SUPPORTED)
def test_use_runs_that_tiers_modules(tier):
    with _tiers.use(tier) as used:
        assert used == tier == _tiers.current()
        assert _dispatch._panel.forward is _tiers.kernels(tier)._panel.forward
        assert _tiers._panel.MR == _tiers.kernels(tier)._panel.MR
        assert _tiers._panel.MR_GRAD_WEIGHT >= _tiers._panel.MR
    assert _tiers.current() == _tiers.DEFAULT


def test_use_is_per_thread():
    seen = {}
    inside, release = threading.Event(), threading.Event()

    def other():
        inside.wait()
        seen["other"] = _tiers.current()
        release.set()

    thread = threading.Thread(target=other)
    thread.start()
    with _tiers.use("baseline"):
        inside.set()
        release.wait()
        seen["here"] = _tiers.current()
    thread.join()
    assert seen == {"here": "baseline", "other": _tiers.DEFAULT}


def test_best_supported_tier_is_the_default_unless_forced():
    if os.environ.get(_tiers.ENV, "").strip():
        assert _tiers.DEFAULT == os.environ[_tiers.ENV].strip()
    else:
        assert _tiers.DEFAULT == _tiers.BEST
    # What the CPU reports decides: a tier is supported exactly when none of its
    # features is missing.
    for tier in _tiers.BUILT:
        assert (tier in _tiers.SUPPORTED) == (not _tiers.missing_features(tier))
    if _tiers.FEATURES.get("avx512f") and _tiers.FEATURES.get("avx512bw") and \
            _tiers.FEATURES.get("avx512dq") and _tiers.FEATURES.get("avx512vl") and \
            "v4" in _tiers.BUILT:
        assert "v4" in _tiers.SUPPORTED


@pytest.mark.skipif("v4_on_v3" not in _tiers.SUPPORTED, reason="no AVX2 tiers here")
def test_v4_sizes_on_v3_are_v4s():
    # The test tier exists to run v4's blocking everywhere: it must have v4's sizes.
    k = _tiers.kernels("v4_on_v3")._panel
    assert k.MR != _tiers.kernels("v3")._panel.MR
    if "v4" in _tiers.SUPPORTED:
        v4 = _tiers.kernels("v4")._panel
        assert (k.MR, k.MR_GRAD_WEIGHT, k.BLOCK_NBYTES) == (v4.MR, v4.MR_GRAD_WEIGHT,
                                                             v4.BLOCK_NBYTES)
    assert _tiers.BEST != "v4_on_v3"


def test_setting_on_a_proxy_sets_the_tier_in_use(monkeypatch):
    # Undone on the same tier (a patch through a proxy belongs to the tier it was made on).
    with _tiers.use("baseline"):
        monkeypatch.setattr(_tiers._panel, "forward", "patched")
        assert _tiers.kernels("baseline")._panel.forward == "patched"
        if _tiers.DEFAULT != "baseline":
            assert _tiers.kernels(_tiers.DEFAULT)._panel.forward != "patched"
        monkeypatch.undo()
    assert _tiers.kernels("baseline")._panel.forward != "patched"


@pytest.mark.parametrize("value, words", [
    ("v5", ["v5", "not a CPU tier", "baseline"]),
    ("AVX2", ["AVX2", "not a CPU tier"]),
    (" ", None),
])
def test_dilconv_isa_values(value, words):
    env = dict(os.environ, **{_tiers.ENV: value})
    r = subprocess.run([sys.executable, "-c", "from dilconv import _tiers; print(_tiers.DEFAULT)"],
                       env=env, capture_output=True, text=True)
    if words is None:
        assert r.returncode == 0 and r.stdout.strip() == _tiers.BEST, r.stderr
        return
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError") and _tiers.ENV in last, last
    for word in words + list(_tiers.SUPPORTED):
        assert word in last, (word, last)


@pytest.mark.parametrize("tier", _tiers.SUPPORTED)
def test_dilconv_isa_forces_a_supported_tier(tier):
    env = dict(os.environ, **{_tiers.ENV: tier})
    code = "import dilconv; from dilconv import _tiers; print(_tiers.current()); " \
           "dilconv.show_config()"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == tier
    assert f"CPU tier: {tier} ({_tiers.ENV}={tier}" in r.stdout


def test_a_tier_the_cpu_lacks_is_refused(monkeypatch):
    # As on a CPU without AVX-512: v4 is refused, naming what is missing.
    monkeypatch.setitem(_tiers.FEATURES, "avx512bw", False)
    assert "avx512bw" in _tiers.missing_features("v4")
    with pytest.raises(ValueError, match=r"tier='v4'.*lacks (avx512\w+, )*avx512bw"):
        _tiers.check("v4")
    with pytest.raises(ValueError, match="not a CPU tier"):
        with _tiers.use("sse9"):
            pass


def test_show_config():
    out = io.StringIO()
    dilconv.show_config(file=out)
    text = out.getvalue()
    assert f"CPU tier: {_tiers.current()}" in text
    assert "supported by this CPU: " + ", ".join(_tiers.SUPPORTED) in text
    assert re.search(r"^OpenMP: (on|off)", text, re.M)
    assert f"threads: {dilconv.get_num_threads()}" in text
    assert f"(vendor: {_cpu.cpu_vendor() or 'other'})" in text
    assert "BLAS:" in text
    with _tiers.use("baseline"):
        out = io.StringIO()
        dilconv.show_config(file=out)
        assert "CPU tier: baseline (set in this thread" in out.getvalue()


# Registers a tier must not use: SSE2 code has no ymm/zmm, AVX2 code (v4's sizes too) no zmm.
FORBIDDEN_REGISTERS = {"baseline": ("ymm", "zmm"), "v3": ("zmm",), "v4_on_v3": ("zmm",)}


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump not installed")
@pytest.mark.parametrize("tier", [t for t in FORBIDDEN_REGISTERS if t in _tiers.BUILT])
def test_tier_objects_hold_only_their_registers(tier):
    if "v3" not in _tiers.BUILT:
        pytest.skip("not an x86-64 build")
    modules = list(vars(_tiers.kernels(tier)).values())
    if tier == "baseline":
        modules += [dilconv._openmp_helpers, dilconv._callpath]
    uses_ymm = []
    for module in modules:
        asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", module.__file__],
                             capture_output=True, text=True, check=True).stdout
        for reg in FORBIDDEN_REGISTERS[tier]:
            hits = [line for line in asm.splitlines() if f"%{reg}" in line]
            assert not hits, f"{module.__name__} uses {reg}: {hits[:3]}"
        uses_ymm.append("%ymm" in asm)
    # The AVX2 builds are AVX2 code (the check above cannot pass on a build without it).
    assert tier == "baseline" or any(uses_ymm)


# Under emulation only dilconv runs (the oracle, and scipy's import, would take most of
# an emulated run's time): its results go to a file, checked natively.
QEMU_SCRIPT = """
import sys
import numpy as np
import dilconv
from dilconv import _tiers
rng = np.random.default_rng(0)
results = {}
# Panel (many channels), depthwise and flat (few channels): each family's code runs.
for i, (c, o, groups) in enumerate(QEMU_CASES):
    x = rng.standard_normal((1, c, 21, 30)).astype(np.float32)
    w = rng.standard_normal((o, c // groups, 3, 3)).astype(np.float32)
    y = dilconv.conv2d(x, w, None, 1, 2, 2, groups)
    g = dilconv.conv2d_backward(np.ones_like(y), x, w, 1, 2, 2, groups)
    results.update({f"x{i}": x, f"w{i}": w, f"y{i}": y,
                    **{f"g{k}{i}": a for k, a in zip("iwb", g)}})
np.savez(sys.argv[1], **results)
print(_tiers.current())
"""
QEMU_CASES = ((16, 24, 1), (8, 8, 8), (3, 4, 1))


@pytest.mark.skipif(shutil.which("qemu-x86_64") is None,
                    reason="qemu-x86_64 not installed (apt-get install qemu-user)")
@pytest.mark.parametrize("cpu, forced, tier", [("Haswell", "", "v3"),
                                               ("Haswell", "v4_on_v3", "v4_on_v3"),
                                               ("SandyBridge", "", "baseline"),
                                               ("Nehalem", "", "baseline")])
def test_runs_on_cpus_without_avx512_or_avx(cpu, forced, tier, tmp_path):
    # SandyBridge has AVX but neither AVX2 nor FMA; Nehalem has no AVX at all.
    if tier not in _tiers.BUILT:
        pytest.skip(f"no {tier} in this build")
    env = dict(os.environ, **{_tiers.ENV: forced})
    saved = tmp_path / "results.npz"
    script = f"QEMU_CASES = {QEMU_CASES!r}\n" + QEMU_SCRIPT
    r = subprocess.run(["qemu-x86_64", "-cpu", cpu, sys.executable, "-c", script, str(saved)],
                       capture_output=True, text=True, timeout=600, env=env)
    if r.returncode < 0:
        # Some numpy builds need more than the emulated CPU has: then nothing of ours runs.
        probe = subprocess.run(["qemu-x86_64", "-cpu", cpu, sys.executable, "-c",
                                "import numpy"], capture_output=True, timeout=600, env=env)
        if probe.returncode < 0:
            pytest.skip(f"numpy {np.__version__} itself dies on an emulated {cpu} "
                        f"(signal {-probe.returncode})")
    # A signal (SIGILL: an instruction the CPU lacks) gives a negative return code.
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.split() == [tier]
    results = np.load(saved)
    for i, (c, o, groups) in enumerate(QEMU_CASES):
        x, w, y = results[f"x{i}"], results[f"w{i}"], results[f"y{i}"]
        grads = tuple(results[f"g{k}{i}"] for k in "iwb")
        assert_conv_close(y, "conv2d", x, w, None, 1, 2, 2, groups)
        assert_conv_close(grads, "conv2d_backward", np.ones_like(y), x, w, 1, 2, 2, groups)
        # The FMA tiers give this machine's bits for the same tier.
        if tier in FMA_TIERS:
            with _tiers.use(tier):
                native = dilconv.conv2d_backward(np.ones_like(y), x, w, 1, 2, 2, groups)
            assert all(np.array_equal(a, b) for a, b in zip(native, grads))
