"""Kernel selection and plans: `select` names the family that really runs, the tuning
context is per thread and strict, and no path pays for padding (huge dilations)."""
import copy
import pickle
import threading
import time
import tracemalloc

import numpy as np
import pytest

import dilconv
from dilconv import _dispatch, _geometry, reference, tolerance
from dilconv._dispatch import PATHS, select
from dilconv._tuning import KNOBS, Tuning, current, tuning
from dilconv._validate import make_spec

from _helpers import backward_bounds, check_backward, check_forward, forward_bound

# Entry points of the kernel modules dispatch calls, by the family they belong to.
ENTRIES = {"_forward": ("direct", ("forward",)),
           "_backward": ("direct", ("grad_input", "grad_weight", "grad_bias")),
           "_flat": ("flat", ("forward",)),
           "_depthwise": ("depthwise", ("forward", "grad_weight")),
           "_panel": ("panel", ("forward", "grad_weight")),
           "_gemm": ("gemm", ("forward", "grad_input", "grad_weight"))}

# (input shape, weight shape, stride, padding, dilation, groups)
GEOMETRIES = [
    ((1, 64, 9, 9), (64, 64, 3, 3), 1, 1, 1, 1),          # many channels
    ((1, 64, 9, 9), (64, 64, 3, 3), 2, 1, 1, 1),          # strided
    ((1, 64, 5, 5), (64, 64, 3, 3), 1, 9, 1, 1),          # padding past the kernel
    ((1, 3, 12, 12), (8, 3, 3, 3), 1, 2, 2, 1),           # few channels
    ((1, 3, 12, 12), (8, 3, 3, 3), (1, 2), 2, 2, 1),      # few channels, strided
    ((2, 4, 6, 30), (8, 1, 3, 3), 1, 1, 1, 4),            # depthwise, multiplier 2
    ((1, 3, 8, 8), (8, 3, 3, 3), 1, 10 ** 4, 10 ** 4, 1), # padding dominates
]


@pytest.fixture
def ran(monkeypatch):
    """The families whose kernels were called (the kernels themselves do nothing; the flat
    forward declines weights that are not finite, returning False, as the real one does)."""
    calls = []
    finite = _dispatch._flat.finite

    def run(family, *args):
        if family == "flat" and not finite(args[1]):
            return False
        calls.append(family)
        return True

    for module, (family, names) in ENTRIES.items():
        for name in names:
            monkeypatch.setattr(getattr(_dispatch, module), name,
                                lambda *a, family=family: run(family, *a))
    return calls


@pytest.mark.parametrize("forced", (None,) + PATHS)
@pytest.mark.parametrize("finite", [True, False])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_select_names_the_family_that_runs(geometry, finite, forced, ran):
    xs, ws, stride, padding, dilation, groups = geometry
    spec = make_spec(xs, ws, stride, padding, dilation, groups)
    weight = np.ones(ws, np.float32)
    if not finite:
        weight[0, 0, 0, 0] = np.inf
    x, y = np.zeros(xs, np.float32), np.zeros(spec.output_shape, np.float32)
    bias = np.zeros(ws[0], np.float32)
    with tuning(path=forced):
        expected = [select(spec, "forward", weight), select(spec, "grad_input", weight),
                    select(spec, "grad_weight", weight), select(spec, "grad_bias")]
        families = []
        for op in (lambda: _dispatch.forward(x, weight, bias, y, spec),
                   lambda: _dispatch.grad_input(y, weight, x, spec),
                   lambda: _dispatch.grad_weight(y, x, weight, spec),
                   lambda: _dispatch.grad_bias(y, bias, spec)):
            ran.clear()
            op()                       # a strided input gradient: one call per phase
            families.append(set(ran))
    assert families == [{family} for family in expected]
    if forced is not None:
        # The panel family leaves input gradients with padding past the kernel to BLAS.
        assert set().union(*families) <= ({forced, "direct"}
                                          | ({"gemm"} if forced == "panel" else set()))


def test_repeated_conv2d_calls_run_the_family_in_force(ran, monkeypatch):
    # conv2d remembers a validated call (dilconv._api._REPEATS); its repeats still follow
    # the tuning and DILCONV_PATH in force and check the weights each time.
    xs, ws = (1, 3, 12, 12), (8, 3, 3, 3)
    spec = make_spec(xs, ws, 1, 2, 2, 1)
    x, weight = np.zeros(xs, np.float32), np.ones(ws, np.float32)

    def families(w=weight):
        ran.clear()
        dilconv.conv2d(x, w, None, 1, 2, 2)
        return set(ran)

    for forced in (None,) + PATHS:
        with tuning(path=forced):
            expected = {select(spec, "forward", weight)}
            assert [families(), families()] == [expected, expected]
    assert families() == {"flat"}
    monkeypatch.setenv("DILCONV_PATH", "gemm")
    assert families() == {"gemm"}
    monkeypatch.delenv("DILCONV_PATH")
    inf = weight.copy()
    inf[0, 0, 0, 0] = np.inf                      # padding taps would multiply it
    assert [families(), families(inf), families()] == [{"flat"}, {"direct"}, {"flat"}]
    # The backward likewise, for the gradients asked for.
    gy = np.zeros((1, 8, 12, 12), np.float32)

    def backward_families(needs=("input", "weight", "bias")):
        ran.clear()
        dilconv.conv2d_backward(gy, x, weight, 1, 2, 2, needs=needs)
        return set(ran)

    for forced in (None,) + PATHS:
        with tuning(path=forced):
            expected = {select(spec, op, weight) for op in ("grad_input", "grad_weight")}
            expected.add("direct")                 # grad_bias
            assert [backward_families(), backward_families()] == [expected, expected]
            alone = {select(spec, "grad_weight")}
            assert [backward_families(("weight",)), backward_families(("weight",))] == [
                alone, alone]
    monkeypatch.setenv("DILCONV_PATH", "direct")
    assert backward_families() == {"direct"}
    monkeypatch.delenv("DILCONV_PATH")
    # Other dtypes, layouts and argument types than the remembered call's are checked
    # and converted afresh.
    assert families(weight.astype(np.float64).astype(np.float32)) == {"flat"}
    with pytest.raises(TypeError, match="dtype mismatch"):
        dilconv.conv2d(x, weight.astype(np.float64), None, 1, 2, 2)
    with pytest.raises(TypeError, match="stride"):
        dilconv.conv2d(x, weight, None, True, 2, 2)
    with pytest.raises(ValueError, match="bias"):
        dilconv.conv2d(x, weight, np.ones(3, np.float32), 1, 2, 2)


def test_repeated_conv2d_calls_match_the_oracle(rng):
    # The second call of each takes the remembered path: inputs that are views, unbatched
    # or of the other dtype give the oracle's values as the first call does.
    for dtype in (np.float32, np.float64):
        x = rng.standard_normal((2, 3, 9, 11)).astype(dtype)
        w = rng.standard_normal((4, 3, 2, 3)).astype(dtype)
        b = rng.standard_normal(4).astype(dtype)
        for args in ((x, w, b), (x[:, :, 1:], w, b), (x[0], w, None), (x[1], w, b),
                     (x[:, ::-1], w, b), (np.asfortranarray(x), w, b)):
            first = check_forward(*args, 1, 1, (2, 1))
            assert np.array_equal(check_forward(*args, 1, 1, (2, 1)), first)
            gy = rng.standard_normal(first.shape).astype(dtype)
            for gy_given in (gy, gy[..., ::-1].copy()[..., ::-1]):
                grads = [check_backward(gy_given, args[0], w, 1, 1, (2, 1))
                         for _ in range(2)]
                for a, b in zip(*grads):
                    assert np.array_equal(a, b)


def test_a_spec_leaves_its_memo_in_its_process(rng):
    # Plans and the kernels' geometry (with pointers into the spec's tap ranges) are
    # remembered on the spec: a pickled or copied spec starts afresh and runs correctly.
    x = rng.standard_normal((1, 3, 9, 9)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    spec = make_spec(x.shape, w.shape, 1, 2, 2, 1)
    expected = np.empty(spec.output_shape, np.float32)
    _dispatch.forward(x, w, np.empty(0, np.float32), expected, spec)
    assert "geom" in spec.memo
    for other in (pickle.loads(pickle.dumps(spec)), copy.copy(spec), copy.deepcopy(spec)):
        assert other == spec and other.memo == {}
        y = np.empty_like(expected)
        _dispatch.forward(x, w, np.empty(0, np.float32), y, other)
        assert np.array_equal(y, expected)


def test_select_falls_back_where_the_forced_family_does_not_apply():
    few = make_spec((1, 3, 12, 12), (8, 3, 3, 3), 1, 2, 2, 1)
    weight = np.ones((8, 3, 3, 3))
    with tuning(path="flat"):
        assert select(few, "forward", weight) == "flat"
        weight[0, 0, 0, 0] = np.nan                  # padding taps would multiply it
        assert select(few, "forward", weight) == "direct"
        assert select(make_spec((1, 3, 12, 12), (8, 3, 3, 3), 2, 2, 2, 1)) == "direct"
    with tuning(path="depthwise"):
        assert select(few) == "direct"               # three input channels per group
    past = make_spec((1, 64, 5, 5), (64, 64, 3, 3), 1, 9, 1, 1)
    with tuning(path="panel"):
        # No transposed spec (its padding would be negative): BLAS takes the input gradient.
        assert select(past, "grad_input") == "gemm"
        assert select(past, "grad_bias") == "direct"
    with pytest.raises(ValueError, match="op"):
        select(few, "backward")


def test_select_remembers_a_geometry_for_its_tuning_and_environment_only(monkeypatch):
    # The choice is remembered on the spec, which make_spec shares between equal calls.
    spec = make_spec((1, 3, 12, 12), (8, 3, 3, 3), 1, 2, 2, 1)
    assert make_spec((1, 3, 12, 12), (8, 3, 3, 3), 1, 2, 2, 1) is spec
    weight = np.ones((8, 3, 3, 3))
    assert select(spec, "forward", weight) == "flat"
    weight[1, 2, 0, 1] = np.inf                       # the weights are checked every call
    assert select(spec, "forward", weight) == "direct"
    weight[1, 2, 0, 1] = 1
    monkeypatch.setenv("DILCONV_PATH", "gemm")
    assert select(spec, "forward", weight) == "gemm"
    with tuning(path="panel"):
        assert select(spec, "forward", weight) == "panel"
    monkeypatch.delenv("DILCONV_PATH")
    assert select(spec, "forward", weight) == "flat"
    # A new tuning object each time (as `with tuning(...)` makes): the memo stays bounded.
    for pixels in range(64, 64 + 4 * _geometry.MEMO_ENTRIES):
        with tuning(max_tile_pixels=pixels):
            assert select(spec, "forward", weight) == "flat"
    assert len(spec.memo) <= _geometry.MEMO_ENTRIES
    # An entry under this tuning's id but for another tuning object is not taken.
    key = (("select", "forward", None, weight.itemsize), id(current()))
    assert select(spec, "forward", weight) == "flat" and key in spec.memo
    spec.memo[key] = (Tuning(path="gemm"), "gemm")
    assert select(spec, "forward", weight) == "flat"


@pytest.mark.parametrize("knobs, error, match", [
    ({"max_tile_pixel": 7}, TypeError, "max_tile_pixel.*known ones: path"),
    ({"max_tile_pixels": "7"}, TypeError, "max_tile_pixels must be an int"),
    ({"zero_fill_max": None}, TypeError, "zero_fill_max must be a number"),
    ({"min_macs_per_thread": 0}, ValueError, "min_macs_per_thread must be >= 1"),
    ({"path": "fast"}, ValueError, "path must be one of"),
    ({"panel_lanes": 1}, TypeError, "panel_lanes must be True, False or None"),
    ({"panel_lanes_chunk_bytes": 0}, ValueError, "panel_lanes_chunk_bytes must be >= 1"),
])
def test_tuning_rejects_unknown_knobs_and_bad_values(knobs, error, match):
    with pytest.raises(error, match=match):
        with tuning(**knobs):
            pass
    assert current() == Tuning()


def test_tuning_nests_and_is_immutable():
    assert current() == Tuning() and set(KNOBS) == set(Tuning.__dataclass_fields__)
    with tuning(max_tile_pixels=7) as knobs:
        with tuning(path="gemm"):
            assert current() == Tuning(path="gemm", max_tile_pixels=7)
        assert current() == knobs
        with pytest.raises(AttributeError):
            knobs.path = "flat"
    assert current() == Tuning()


def test_tuning_set_in_one_thread_is_not_seen_in_another():
    spec = make_spec((1, 64, 9, 9), (64, 64, 3, 3), 1, 1, 1, 1)
    entered, checked = threading.Event(), threading.Event()
    seen = {}

    def forcing():
        with tuning(path="direct", max_tile_pixels=5):
            seen["forcing"] = select(spec)
            entered.set()
            checked.wait(10)

    def other():
        entered.wait(10)
        seen["other"] = (select(spec), current())
        checked.set()

    threads = [threading.Thread(target=forcing), threading.Thread(target=other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen == {"forcing": "direct", "other": ("panel", Tuning())}


@pytest.mark.parametrize("cin, cout", [(1, 9), (9, 1), (3, 16)])
def test_panel_group_knob_costs_no_more_than_the_tiles(cin, cout, rng):
    """Panels packed in groups of 1 GiB, taps one at a time: a group is never larger than
    a tile's panels, so the scratch stays that of a small image (it asked for 50 GiB)."""
    x = rng.standard_normal((1, cin, 1, 40))
    w = rng.standard_normal((cout, cin, 1, 2))
    gy = rng.standard_normal((1, cout, 1, 39))
    tracemalloc.start()
    try:
        with tuning(path="panel", panel_group_bytes=1 << 30, panel_chunk_bytes=1):
            y = dilconv.conv2d(x, w)
            gx = dilconv.conv2d_backward(gy, x, w, needs=("input",)).input
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2 ** 20, peak
    spec = make_spec(x.shape, w.shape, 1, 0, 1, 1)
    args = (spec.stride, spec.padding, spec.dilation, spec.groups)
    expected = reference.conv2d_reference(x, w, None, *args)
    assert tolerance.worst_ratio(y, expected, forward_bound(x, w, None, spec)) <= 1
    exp_gx = reference.conv2d_backward_reference(gy, x, w, *args)[0]
    assert tolerance.worst_ratio(gx, exp_gx, backward_bounds(gy, x, w, spec)[0]) <= 1


# Dilations and paddings so large that, of a 3x3 kernel on a 32x32 image, only the centre
# tap ever reads the image: the result is the 1x1 convolution with the centre weights.
HUGE = [(10 ** 4, 10 ** 4), (10 ** 5, 10 ** 5), (10 ** 9, "same")]


@pytest.mark.parametrize("forced", (None,) + PATHS)
@pytest.mark.parametrize("dilation, padding", HUGE)
def test_huge_dilation_costs_no_more_than_the_image(dilation, padding, forced, rng):
    x = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    gy = rng.standard_normal((1, 8, 32, 32)).astype(np.float32)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with tuning(path=forced):
            y = dilconv.conv2d(x, w, b, 1, padding, dilation)
            grads = dilconv.conv2d_backward(gy, x, w, 1, padding, dilation)
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Time and memory of a 32x32 image: it used to take seconds and gigabytes (or raise
    # MemoryError) with zero-padded bands as wide as the padded image.
    assert seconds < 5 and peak < 4 * 2 ** 20, (seconds, peak)
    centre = np.ascontiguousarray(w[:, :, 1:2, 1:2])
    small = make_spec(x.shape, centre.shape, 1, 0, 1, 1)
    args = (small.stride, small.padding, small.dilation, small.groups)
    expected = reference.conv2d_reference(x, centre, b, *args)
    assert y.shape == expected.shape
    assert tolerance.worst_ratio(y, expected, forward_bound(x, centre, b, small)) <= 1
    exp_grads = reference.conv2d_backward_reference(gy, x, centre, *args)
    bounds = backward_bounds(gy, x, centre, small)
    assert tolerance.worst_ratio(grads.input, exp_grads[0], bounds[0]) <= 1
    assert tolerance.worst_ratio(grads.weight[:, :, 1:2, 1:2], exp_grads[1], bounds[1]) <= 1
    off_centre = grads.weight.copy()
    off_centre[:, :, 1, 1] = 0
    assert not off_centre.any()                      # those taps read only padding
    assert tolerance.worst_ratio(grads.bias, exp_grads[2], bounds[2]) <= 1
