"""Process-level behaviour: OpenMP thread control, threadpoolctl, optional PyTorch import."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import threadpoolctl

import dilconv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, **env):
    """Run `code` in a fresh interpreter importing this checkout's dilconv; its stdout."""
    full_env = {**os.environ, "PYTHONPATH": ROOT, **env}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_import_does_not_import_torch():
    out = _run("""
        import sys
        import dilconv
        print('torch' in sys.modules, dilconv.__file__)
    """)
    assert out == f"False {os.path.join(ROOT, 'dilconv', '__init__.py')}"


def test_omp_num_threads_is_followed():
    assert _run("import dilconv; print(dilconv.get_num_threads())", OMP_NUM_THREADS="3") == "3"
    assert _run("import dilconv; print(dilconv.get_num_threads())", OMP_NUM_THREADS="1") == "1"


def test_threadpool_info_lists_our_openmp():
    # The OpenMP entry appears with dilconv's import (numpy and scipy bring none here).
    out = _run("""
        import threadpoolctl, numpy, scipy.signal
        before = [i['user_api'] for i in threadpoolctl.threadpool_info()]
        import dilconv
        after = [i for i in threadpoolctl.threadpool_info() if i['user_api'] == 'openmp']
        print('openmp' in before, len(after) >= 1, dilconv.get_num_threads() ==
              after[0]['num_threads'])
    """, OMP_NUM_THREADS="2")
    assert out == "False True True"


def test_threadpool_limits_lower_get_num_threads():
    before = dilconv.get_num_threads()
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert dilconv.get_num_threads() == 1
    assert dilconv.get_num_threads() == before
    try:
        dilconv.set_num_threads(2)
        with threadpoolctl.threadpool_limits(1):
            assert dilconv.get_num_threads() == 1
        assert dilconv.get_num_threads() == 2
    finally:
        dilconv.set_num_threads(None)
    assert dilconv.get_num_threads() == before


def test_set_num_threads_none_restores_openmp_setting():
    out = _run("""
        import dilconv
        dilconv.set_num_threads(1)
        dilconv.set_num_threads(2)
        one = dilconv.get_num_threads()
        dilconv.set_num_threads(None)
        print(one, dilconv.get_num_threads())
    """, OMP_NUM_THREADS="3")
    assert out == "2 3"


def test_results_do_not_depend_on_threadpool_limits(rng):
    x = rng.standard_normal((2, 8, 20, 20)).astype(np.float32)
    w = rng.standard_normal((8, 8, 3, 3)).astype(np.float32)
    y = dilconv.conv2d(x, w, padding=2, dilation=2, padding_mode="reflect")
    with threadpoolctl.threadpool_limits(1):
        y1 = dilconv.conv2d(x, w, padding=2, dilation=2, padding_mode="reflect")
    assert y.tobytes() == y1.tobytes()


def test_package_is_typed():
    assert os.path.exists(os.path.join(os.path.dirname(dilconv.__file__), "py.typed"))


def test_unbuilt_source_tree_says_how_to_fix_it(tmp_path):
    """`python -m bench` in a checkout after a non-editable `pip install .` imports the
    unbuilt sources: a clear ImportError, not a circular-import puzzle."""
    src = tmp_path / "dilconv"
    src.mkdir()
    for name in os.listdir(os.path.join(ROOT, "dilconv")):
        if name.endswith(".py"):
            with open(os.path.join(ROOT, "dilconv", name)) as f:
                (src / name).write_text(f.read())
    result = subprocess.run([sys.executable, "-c", "import dilconv"], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: dilconv's compiled kernels are missing"), last
    assert "pip install -e ." in last and "outside the source tree" in last
    assert "circular" not in result.stderr
