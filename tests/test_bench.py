"""The benchmark CLI (python -m bench): its peers are correct, its numbers are consistent."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dilconv import reference
from dilconv._dispatch import PATHS

ROOT = Path(__file__).resolve().parents[1]
# bench/ is a top-level directory of the repository, not part of the installed package.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import im2col, layers, run, timing  # noqa: E402
from bench.cli import main  # noqa: E402
from bench.impls import Case, Dilconv, Torch, check  # noqa: E402
from bench.layers import Layer  # noqa: E402
from bench.peers import PEERS, Jax, OnnxRuntime  # noqa: E402

from test_conv import GRID  # noqa: E402

TINY = ["--suite", "tiny", "--repeat", "1", "--min-time", "0", "--peak-size", "64"]


def _grid_layer(i, case):
    n, c, h, w, o, kh, kw, stride, padding, dilation, groups = case
    return Layer(f"grid{i}", (n, c, h, w), (o, c // groups, kh, kw), stride, padding,
                 dilation, groups)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("i", range(len(GRID)))
def test_im2col_peer_matches_oracle(i, dtype):
    case = Case.make(_grid_layer(i, GRID[i]), dtype)
    args = case.norm_args
    want = reference.conv2d_reference(case.x, case.weight, case.bias, *args)
    got = im2col.conv2d(case.x, case.weight, case.bias, *args)
    assert got.dtype == case.x.dtype
    assert check(case, "forward", (got,), (want,)) <= 1
    if case.spec.n == 0:
        return
    want = reference.conv2d_backward_reference(case.grad_output, case.x, case.weight, *args)
    got = im2col.conv2d_backward(case.grad_output, case.x, case.weight, *args)
    assert check(case, "backward", got, want) <= 1


def test_check_catches_a_wrong_answer():
    case = Case.make(layers.LAYERS["seed_3to16"], "float32")
    y = Dilconv().runner(case, "forward")[0]()
    assert check(case, "forward", (y,), (y,)) == 0
    wrong = y.copy()
    wrong[0, 3, 100, 7] += 4 * case.bounds("forward")[0][0, 3, 100, 7]
    assert check(case, "forward", (wrong,), (y,)) > 1
    assert check(case, "forward", (y[:, :-1],), (y,)) == np.inf


def test_torch_peer_matches_and_does_not_accumulate():
    pytest.importorskip("torch")
    torch_impl = Torch()
    assert torch_impl.missing() is None
    layer = Layer("strided_groups", (2, 4, 12, 10), (6, 2, 3, 2), (2, 1), (2, 1), (2, 3), 2)
    case = Case.make(layer, "float64")
    for op in layers.OPS:
        ours = Dilconv().outputs(Dilconv().runner(case, op)[0]())
        call, before = torch_impl.runner(case, op)
        for _ in range(2):      # the second call must not add onto the first's gradients
            if before is not None:
                before()
            got = torch_impl.outputs(call())
        assert check(case, op, got, ours) <= 1, op


def test_flops_by_hand():
    # seed_toy: 1 image, 1 in, 1 out channel, 2x2 taps, 2x2 outputs, no padding.
    spec = layers.LAYERS["seed_toy"].spec()
    assert layers.flops(spec, "forward") == (2 * 4 * 4, 2 * 4 * 4)
    assert layers.flops(spec, "backward") == (2 * 32 + 4, 2 * 32 + 4)
    # 3x3 image, 3x3 kernel, padding 1: per axis the taps reach 2 + 3 + 2 = 7 of 9 outputs.
    spec = Layer("pad", (1, 1, 3, 3), (1, 1, 3, 3), padding=1).spec()
    assert layers.flops(spec, "forward") == (2 * 81, 2 * 49)
    assert layers.flops(spec, "backward") == (4 * 81 + 9, 4 * 49 + 9)


def test_aspp_r18_taps_in_padding():
    # Taps at offsets -18, 0, +18 of a 33-wide image reach 15 + 33 + 15 of 99 outputs.
    spec = layers.LAYERS["aspp_r18"].spec()
    nominal, effective = layers.flops(spec, "forward")
    assert effective / nominal == pytest.approx((63 / 99) ** 2)


def test_suite_layers_are_valid():
    assert layers.LAYERS["seed_3to16"].spec().output_shape == (1, 16, 252, 252)
    for name in layers.SUITES:
        assert all(layer.spec().ho >= 1 for layer in layers.select(name))
    assert [layer.name for layer in layers.select("all", ["dw_d4"])] == ["dw_d4"]
    assert set(layers.SUITES["all"].dtypes) == {"float32", "float64"}


def test_a_matmul_above_the_fma_peak_is_noted():
    fma = {"float32": {"1": 100.0, "2": 200.0}}
    assert run.peak_notes(fma, {"float32": {"1": 90.0, "2": 204.0}}) == []
    notes = run.peak_notes(fma, {"float32": {"1": 90.0, "2": 260.0}})
    assert len(notes) == 1 and "260.0" in notes[0] and "2 thread" in notes[0]


def test_statistics():
    s = timing.summarize([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (s["median_s"], s["q1_s"], s["q3_s"], s["iqr_s"], s["repeats"]) == (3, 2, 4, 2, 5)
    assert timing.repeats_for(0.01, 5, 0.2) == 20
    assert timing.repeats_for(1.0, 5, 0.2) == 5
    assert timing.repeats_for(1e-9, 1, 0.2) == timing.MAX_REPEAT
    assert timing.repeats_for(0.01, 1, 0.0) == 1


def test_interleaved_timing_counts_and_order():
    log = []
    runners = {name: (lambda name=name: log.append(name), lambda: log.append("before"))
               for name in ("a", "b")}
    times = timing.time_interleaved(runners, {"a": 10, "b": 3}, rounds=5)
    assert [len(times["a"]), len(times["b"])] == [10, 3]
    calls = [entry for entry in log if entry != "before"]
    assert log.count("before") == len(calls) == 13
    # Both are timed early and late, not one after the other.
    assert {"a", "b"} <= set(calls[:5]) and {"a", "b"} <= set(calls[-5:])


def test_extra_memory_sees_numpy_scratch():
    def call():
        scratch = np.ones(2 ** 20)            # 8 MiB, freed before returning
        return np.zeros(10) + scratch[:10]
    extra = timing.extra_memory(call, lambda out: out.nbytes)
    assert 8 * 2 ** 20 <= extra < 9 * 2 ** 20


def _run_cli(args, tmp_path, hide=()):
    """Run the CLI in a fresh process; modules in `hide` fail to import there."""
    stubs = tmp_path / "hidden"
    for name in hide:
        (stubs / name).mkdir(parents=True)
        (stubs / name / "__init__.py").write_text(f"raise ImportError('{name} hidden')\n")
    code = f"import sys; from bench.cli import main; sys.exit(main({args!r}))"
    path = os.pathsep.join([str(stubs), str(ROOT)])
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": path})
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_cli_tiny_suite_writes_json_and_plot(tmp_path):
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    stdout = _run_cli(TINY + ["--json", str(out_json), "--plot", str(out_png)], tmp_path)
    assert "seed_toy" in stdout and "numpy matmul" in stdout and "FMA peak" in stdout
    report = json.loads(out_json.read_text())
    rows = {(r["impl"], r["op"], r["threads"]): r for r in report["results"]}
    for op in layers.OPS:
        for threads in (1, 2):
            ours = rows["dilconv", op, threads]
            assert ours["status"] == "ok" and ours["median_s"] > 0 and ours["repeats"] == 1
            assert ours["path"] in PATHS and ours["extra_mib"] >= 0
            for peer in ("numpy", "scipy"):
                row = rows[peer, op, threads]
                assert row["status"] == "ok" and row["check"] <= 1
                assert row["ratio"] == pytest.approx(row["median_s"] / ours["median_s"])
    assert set(report["gemm_peak_gflops"]["float32"]) == {"1", "2"}
    assert set(report["fma_peak_gflops"]["float32"]) == {"1", "2"}
    assert set(report["copy_bandwidth_gbs"]) == {"1", "2"}
    for threads in (1, 2):
        ours = rows["dilconv", "forward", threads]
        peak = report["fma_peak_gflops"]["float32"][str(threads)]
        assert ours["pct_peak"] == pytest.approx(100 * ours["gflops_effective"] / peak)
        timed = [rows[p, "forward", threads]["ratio"] for p in report["implementations"]
                 if p != "dilconv" and rows[p, "forward", threads].get("ratio")]
        assert ours["vs_best"] == pytest.approx(min(timed))
    assert "summary (vs best" in stdout
    assert report["machine"]["versions"]["dilconv"]
    assert "openmp" in report["machine"]["dilconv_build"]
    if report["peers"]["torch"]["status"] == "ok":
        assert rows["dilconv", "forward", 1]["ratio_to_torch"] == rows["torch", "forward", 1][
            "ratio"]
    assert {s["impl"] for s in report["thread_scaling"]} >= {"dilconv", "numpy"}
    if report["machine"]["versions"]["matplotlib"]:
        assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "plot skipped" in stdout
    # Re-rendering the saved report prints the same table without measuring again.
    table = stdout[stdout.index("layer  "):stdout.index("ms: median")]
    assert table in _render_saved(out_json)


def _render_saved(path):
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["--from-json", str(path)]) == 0
    return buf.getvalue()


def test_cli_without_torch_or_matplotlib_says_so(tmp_path):
    png = tmp_path / "p.png"
    stdout = _run_cli(TINY + ["--ops", "forward", "--threads", "1", "--peers", "torch,numpy",
                              "--plot", str(png)], tmp_path,
                      hide=("torch", "matplotlib"))
    assert "torch skipped: PyTorch is not installed (pip install torch==2.13.0)" in stdout
    assert "plot skipped: matplotlib is not installed" in stdout and not png.exists()
    assert "numpy ms" in stdout and "torch ms" not in stdout


def test_readme_describes_the_layer_suite():
    """README's layer table is the suite that runs (users have no other description)."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    rows = {}
    for line in readme.splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] in layers.LAYERS:
            rows[cells[0]] = cells[1:]
    assert set(rows) == set(layers.LAYERS)
    for name, layer in layers.LAYERS.items():
        assert rows[name] == ["x".join(map(str, layer.input)),
                              "x".join(map(str, layer.weight)), layer.describe(),
                              layer.what], name
    assert "DESIGN" not in readme


def test_cli_list_and_bad_arguments(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in list(layers.LAYERS) + list(layers.SUITES) + list(PEERS):
        assert name in out
    # The layer suite is described right there, not by a document users do not have.
    assert "DESIGN" not in out and "p padding" in out
    for layer in layers.LAYERS.values():
        assert layer.what in out and "x".join(map(str, layer.weight)) in out
    for bad in (["--layers", "nope"], ["--ops", "sideways"], ["--threads", "0"],
                ["--dtype", "float16"], ["--peers", "tensorflow"], ["--min-time", "-1"]):
        with pytest.raises(SystemExit) as exc:
            main(bad)
        assert exc.value.code == 2
        assert bad[1] in capsys.readouterr().err


PEER_LAYERS = [Layer("strided_groups", (2, 4, 12, 10), (6, 2, 3, 2), (2, 1), (2, 1), (2, 3), 2),
               Layer("depthwise", (1, 3, 9, 9), (3, 1, 3, 3), 1, 4, 4, 3),
               layers.LAYERS["seed_3to16"]]


@pytest.mark.parametrize("layer", PEER_LAYERS, ids=lambda layer: layer.name)
def test_ort_peer_matches(layer):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    ort = OnnxRuntime()
    assert ort.missing() is None
    case = Case.make(layer, "float32")
    ours = Dilconv().outputs(Dilconv().runner(case, "forward")[0]())
    for threads in (1, 2):
        call, before = ort.runner(case, "forward", threads)
        assert before is None
        assert check(case, "forward", ort.outputs(call()), ours) <= 1
    assert ort.skip(Case.make(layer, "float64"), "forward")
    assert ort.skip(case, "backward")


def test_ort_peer_check_catches_a_wrong_model():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    layer = PEER_LAYERS[0]
    case = Case.make(layer, "float32")
    ours = Dilconv().outputs(Dilconv().runner(case, "forward")[0]())
    ort = OnnxRuntime()
    ort.missing()
    wrong = Case.make(Layer(layer.name, layer.input, layer.weight, layer.stride, layer.padding,
                            1, layer.groups), "float32")     # dilation dropped
    got = ort.outputs(ort.runner(wrong, "forward")[0]())
    assert check(case, "forward", got, ours) > 1


def test_jax_peer_matches_on_one_core():
    pytest.importorskip("jax")
    jax_impl = Jax()
    assert jax_impl.missing() is None
    try:
        for layer in PEER_LAYERS[:2]:
            for dtype in ("float32", "float64"):
                case = Case.make(layer, dtype)
                for op in layers.OPS:
                    ours = Dilconv().outputs(Dilconv().runner(case, op)[0]())
                    call, _ = jax_impl.runner(case, op, 1)
                    result = call()
                    assert isinstance(result, timing.Timed) and result.seconds > 0
                    got = jax_impl.outputs(result)
                    assert got[0].dtype == np.dtype(dtype)
                    assert check(case, op, got, ours) <= 1, (layer.name, dtype, op)
        # The child is pinned to one core: its CPU time cannot exceed its wall time much.
        case = Case.make(layers.LAYERS["seed_3to16"], "float32")
        call, _ = jax_impl.runner(case, "forward", 1)
        for _ in range(20):
            call()
        usage = jax_impl.measured(case, "forward", 1)
        assert usage["cpu_per_wall"] <= 1.25 and "warning" not in usage
    finally:
        jax_impl.close()
    assert not jax_impl.workers


def test_cli_without_ort_or_jax_says_so(tmp_path):
    stdout = _run_cli(TINY + ["--ops", "forward", "--threads", "1", "--peers", "ort,jax,numpy"],
                      tmp_path, hide=("onnxruntime", "onnx", "jax"))
    assert "ort skipped: ONNX Runtime is not installed (pip install onnx onnxruntime)" in stdout
    assert 'jax skipped: JAX is not installed (pip install "jax[cpu]")' in stdout
    assert "numpy ms" in stdout and "ort ms" not in stdout and "jax ms" not in stdout
