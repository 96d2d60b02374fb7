"""The depthwise kernels (one input channel per group: forward, input and weight gradients)
against the oracle: row and column runs of every block width, padding wider than the kernel, strides, channel
multipliers, task bands, thread counts, non-finite weights, and the dispatch rule."""
import itertools

import numpy as np
import pytest

import dilconv
from dilconv import _dispatch, tolerance
from dilconv._dispatch import select
from dilconv._tiers import _depthwise
from dilconv._tuning import tuning
from dilconv._validate import make_spec

from _helpers import check_backward, check_forward, forward_bound, num_threads, random_case

tap_runs = _depthwise.tap_runs

# (n, groups, multiplier, h, w, kh, kw, stride, padding, dilation)
GRID = [
    (2, 6, 1, 13, 40, 3, 3, 1, 4, 4),                        # dw_d4, small
    (1, 3, 2, 9, 33, 3, 3, 1, ((4, 1), (5, 2)), (2, 3)),     # multiplier 2, asymmetric
    (2, 4, 1, 5, 7, 3, 3, 1, 9, 2),                          # padding > dilated kernel
    (1, 2, 1, 3, 70, 3, 5, 1, ((0, 7), (11, 0)), (1, 4)),    # whole rows in the padding
    (1, 5, 1, 11, 37, 3, 3, (2, 1), 2, 2),                   # row stride
    (2, 3, 1, 12, 41, 3, 3, (1, 2), 1, 1),                   # column stride
    (1, 4, 3, 10, 29, 2, 4, 3, (1, 3), (2, 3)),              # both strides, multiplier 3
    (3, 2, 1, 1, 1, 1, 1, 1, 0, 1),                          # 1-pixel image
    (2, 3, 1, 1, 1, 3, 3, 1, 1, 1),                          # only the centre tap
    (1, 2, 2, 2, 3, 3, 3, 1, 2, 1),                          # output bigger than input
    (1, 1, 4, 17, 66, 7, 7, 1, 3, 1),                        # groups 1, C = 1, k7
    (2, 8, 1, 1, 300, 1, 2, 1, 0, (1, 64)),                  # wavenet-like
]


@pytest.mark.parametrize("path", ["depthwise", None])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", GRID)
def test_matches_oracle(case, dtype, path, rng):
    n, groups, mult, h, w, kh, kw, stride, padding, dilation = case
    x, wt, b = random_case(rng, n, groups, h, w, groups * mult, kh, kw, groups, dtype,
                           bias=rng.random() < 0.7)
    with tuning(path=path):
        check_forward(x, wt, b, stride, padding, dilation, groups)


@pytest.mark.parametrize("path", ["depthwise", None])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", GRID)
def test_gradients_match_oracle(case, dtype, path, rng):
    n, groups, mult, h, w, kh, kw, stride, padding, dilation = case
    x, wt, _ = random_case(rng, n, groups, h, w, groups * mult, kh, kw, groups, dtype)
    spec = make_spec(x.shape, wt.shape, stride, padding, dilation, groups)
    gy = rng.standard_normal(spec.output_shape).astype(dtype)
    with tuning(path=path):
        check_backward(gy, x, wt, stride, padding, dilation, groups)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gradients_of_every_run_width(dtype, rng):
    # Weight-gradient rectangles of 1..70 columns: shorter than a vector, whole blocks of
    # chains, single vectors and a masked last vector; the input gradient's forward runs.
    for width, height in itertools.product(range(1, 71), (1, 3)):
        x, wt, _ = random_case(rng, 2, 2, height, width, 2, 3, 3, 2, dtype)
        spec = make_spec(x.shape, wt.shape, 1, (1, 2), (1, 2), 2)
        gy = rng.standard_normal(spec.output_shape).astype(dtype)
        with tuning(path="depthwise"):
            assert select(spec, "grad_weight") == select(spec, "grad_input") == "depthwise"
            check_backward(gy, x, wt, 1, (1, 2), (1, 2), 2)


def test_gradients_skip_padding_taps(rng):
    # Non-finite output gradients and inputs never meet a padding tap: every weight
    # gradient with a finite in-image sum stays finite.
    x, wt, _ = random_case(rng, 1, 2, 6, 40, 2, 3, 3, 2, np.float32)
    spec = make_spec(x.shape, wt.shape, 1, 4, 4, 2)
    gy = np.ones(spec.output_shape, np.float32)
    x[0, 0, :, :4] = np.inf                      # read by kernel columns 0 and 1 only
    g = dilconv.conv2d_backward(gy, x, wt, 1, 4, 4, 2, needs=("weight",)).weight
    assert np.isinf(g[0, 0, :, :2]).all() and np.isfinite(g[0, 0, :, 2]).all()
    assert np.isfinite(g[1]).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_run_width(dtype, rng):
    # Runs of 1..70 columns (after the edge runs) and 1..5 rows: wide, one-vector,
    # overlapping, half-vector and single-output blocks, one and two rows at a time.
    for width, height in itertools.product(range(1, 71), (1, 2, 5)):
        x, wt, b = random_case(rng, 1, 2, height, width, 2, 3, 3, 2, dtype)
        with tuning(path="depthwise"):
            check_forward(x, wt, b, 1, (1, 2), (1, 2), 2)


def test_outputs_without_taps_are_the_bias(rng):
    # Padding of 5 around a 2x3 image with a 1x1 kernel: the border outputs see no pixel.
    x, wt, b = random_case(rng, 2, 3, 2, 3, 3, 1, 1, 3, np.float32)
    with tuning(path="depthwise"):
        y = dilconv.conv2d(x, wt, b, padding=5, groups=3)
    inside = np.zeros(y.shape[2:], bool)
    inside[5:7, 5:8] = True
    np.testing.assert_array_equal(y[:, :, ~inside], np.broadcast_to(
        b[None, :, None], (2, 3, int((~inside).sum()))))
    np.testing.assert_array_equal(y[:, :, inside], x.reshape(2, 3, 6) * wt.reshape(1, 3, 1)
                                  + b[None, :, None])


@pytest.mark.parametrize("task_pixels", [1, 7, 50, 1 << 14])
def test_task_bands_cover_the_plane_once(task_pixels, rng):
    x, wt, b = random_case(rng, 2, 3, 23, 30, 6, 3, 3, 3, np.float64)
    with tuning(path="depthwise", depthwise_task_pixels=task_pixels):
        check_forward(x, wt, b, 1, 3, (3, 2), 3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bitwise_identical_across_thread_counts(dtype, rng):
    x, wt, b = random_case(rng, 3, 8, 37, 61, 16, 3, 3, 8, dtype)
    results = []
    try:
        for task_pixels, threads in itertools.product((61 * 5, 1 << 14), (1, 2, 3)):
            dilconv.set_num_threads(threads)
            with tuning(path="depthwise", depthwise_task_pixels=task_pixels,
                        min_macs_per_thread=1):
                results.append(dilconv.conv2d(x, wt, b, 1, 4, 4, 8).tobytes())
    finally:
        dilconv.set_num_threads(None)
    assert all(r == results[0] for r in results[1:])


@pytest.mark.parametrize("mult", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gradients_bitwise_identical_across_thread_counts(dtype, mult, rng):
    x, wt, _ = random_case(rng, 3, 8, 37, 61, 8 * mult, 3, 3, 8, dtype)
    gy = rng.standard_normal((3, 8 * mult, 37, 61)).astype(dtype)
    results = []
    try:
        for threads in (1, 2, 3):
            dilconv.set_num_threads(threads)
            with tuning(min_macs_per_thread=1):
                grads = dilconv.conv2d_backward(gy, x, wt, 1, 4, 4, 8)
            results.append(b"".join(g.tobytes() for g in grads))
    finally:
        dilconv.set_num_threads(None)
    assert all(r == results[0] for r in results[1:])


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nonfinite_weight_in_the_padding_is_not_multiplied(value):
    # Hand-computed: the top-left tap only meets padding for the first output row and
    # column, so those outputs are the sum of the other in-image taps; the rest take it.
    w = np.ones((2, 1, 3, 3))
    w[:, 0, 0, 0] = value
    x = np.ones((1, 2, 4, 30))
    with tuning(path="depthwise"):
        y = dilconv.conv2d(x, w, padding=1, groups=2)[0]
    expected_row0 = np.full(30, 6.0)
    expected_row0[[0, -1]] = 4
    np.testing.assert_array_equal(y[:, 0], np.broadcast_to(expected_row0, (2, 30)))
    np.testing.assert_array_equal(y[:, 1:, 0], np.full((2, 3), [6.0, 6.0, 4.0]))
    np.testing.assert_array_equal(y[:, 1:, 1:], np.full((2, 3, 29), value))   # nan == nan


def test_tap_runs_split_an_axis_by_taps_in_the_image():
    # Kernel 3, dilation 4, padding 4 on 64 outputs: taps 1..2, then all, then 0..1.
    spec = make_spec((1, 1, 64, 64), (1, 1, 3, 3), 1, 4, 4, 1)
    runs = tap_runs(spec.ow_lo, spec.ow_hi, spec.wo)
    np.testing.assert_array_equal(runs, [[0, 4, 1, 3], [4, 60, 0, 3], [60, 64, 0, 2]])
    # Padding wider than the kernel: runs with no tap in the image.
    spec = make_spec((1, 1, 2, 2), (1, 1, 1, 1), 1, 3, 1, 1)
    np.testing.assert_array_equal(tap_runs(spec.oh_lo, spec.oh_hi, spec.ho),
                                  [[0, 3, 0, 0], [3, 5, 0, 1], [5, 8, 0, 0]])


@pytest.mark.parametrize("xs, ws, stride, groups, op, path", [
    ((2, 64, 40, 40), (64, 1, 3, 3), 1, 64, "forward", "depthwise"),
    ((2, 64, 40, 40), (64, 1, 3, 3), 1, 64, "grad_weight", "depthwise"),
    ((2, 64, 40, 40), (64, 1, 3, 3), 1, 64, "grad_input", "depthwise"),
    ((2, 64, 40, 40), (64, 1, 3, 3), (2, 1), 64, "grad_weight", "depthwise"),
    ((2, 64, 40, 40), (64, 1, 3, 3), (2, 1), 64, "grad_input", "direct"),   # strided
    ((2, 64, 40, 40), (64, 1, 3, 3), (1, 2), 64, "grad_weight", "direct"),  # strided columns
    ((1, 8, 40, 40), (32, 1, 3, 3), 1, 8, "grad_input", "direct"),       # multiplier 4
    ((1, 8, 40, 40), (32, 1, 3, 3), 1, 8, "grad_weight", "depthwise"),
    ((1, 8, 40, 40), (32, 1, 3, 3), 1, 8, "forward", "depthwise"),       # multiplier 4
    ((1, 1, 40, 40), (64, 1, 3, 3), 1, 1, "forward", "depthwise"),       # groups 1, C = 1
    ((1, 64, 8, _dispatch.DEPTHWISE_MIN_WIDTH - 1), (64, 1, 3, 3), 1, 64, "forward", "flat"),
    ((1, 64, 80, 80), (64, 1, 3, 3), (1, 2), 64, "forward", "direct"),   # strided columns
    ((1, 64, 80, 80), (64, 1, 3, 3), (2, 1), 64, "forward", "depthwise"),
    ((1, 8, 40, 40), (8, 2, 3, 3), 1, 4, "forward", "flat"),             # two per group
])
def test_dispatch_rule(xs, ws, stride, groups, op, path):
    assert select(make_spec(xs, ws, stride, 1, 1, groups), op) == path


def test_matches_torch_on_the_benchmark_layer(rng):
    torch = pytest.importorskip("torch")
    x, wt, b = random_case(rng, 1, 128, 64, 64, 128, 3, 3, 128, np.float32)
    spec = make_spec(x.shape, wt.shape, 1, 4, 4, 128)
    assert select(spec) == "depthwise"
    y = check_forward(x, wt, b, 1, 4, 4, 128)
    ty = torch.nn.functional.conv2d(*(torch.from_numpy(a) for a in (x, wt, b)), padding=4,
                                    dilation=4, groups=128).numpy()
    # Both sides round: twice the bound of one.
    assert tolerance.worst_ratio(y, ty, 2 * forward_bound(x, wt, b, spec)) <= 1


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("task_pixels", [5, 1 << 14])
@pytest.mark.parametrize("case", [
    # (n, c, h, w, o, kh, kw, stride, padding, dilation, groups)
    (2, 6, 13, 29, 6, 3, 3, 1, 2, 2, 6),                      # 2-column borders
    (1, 4, 11, 30, 8, 3, 3, (2, 1), ((3, 3), (1, 2)), (2, 1), 4),   # 1 and 2, multiplier 2
    (1, 3, 15, 40, 3, 5, 5, 1, (0, 3), 3, 3),                 # borders of 3 with 3 tap sets
    (1, 2, 6, 20, 2, 3, 3, 1, 1, (1, 8), 2),                  # a tap reading no column whole
    (1, 2, 7, 70, 2, 3, 3, 1, 2, 2, 2),                       # rows past FLAT_RUN_MAX_WIDTH
])
def test_zero_filled_columns_give_the_same_sums(case, task_pixels, threads, rng):
    # Thin border columns read zeros between copied input rows instead of runs of their
    # own taps (narrow rows at unit row stride: a row run's rows as one run): the same
    # sums (0 * w adds zero); the oracle checks one of them.
    n, c, h, w, o, kh, kw, stride, padding, dilation, groups = case
    for dtype in (np.float32, np.float64):
        x, wt, b = random_case(rng, n, c, h, w, o, kh, kw, groups, dtype)
        y = {}
        for zero_fill in (True, False):
            with num_threads(threads), tuning(path="depthwise", min_macs_per_thread=1,
                                              depthwise_task_pixels=task_pixels,
                                              zero_fill_max=1e9 if zero_fill else -1.0):
                y[zero_fill] = (check_forward if zero_fill else dilconv.conv2d)(
                    x, wt, b, stride, padding, dilation, groups)
        np.testing.assert_array_equal(y[True], y[False])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("task_pixels", [7, 1 << 14])
def test_prefetching_the_next_plane_gives_the_same_bits(threads, task_pixels, monkeypatch,
                                                        rng):
    # Calls past PREFETCH_FROM_BYTES fetch the next plane ahead (whole-plane tasks): the
    # oracle checks one, and the other gives the same bits.
    for dtype in (np.float32, np.float64):
        x, wt, b = random_case(rng, 2, 5, 19, 37, 10, 3, 3, 5, dtype)
        y = {}
        for prefetch in (True, False):
            monkeypatch.setattr(_depthwise, "PREFETCH_FROM_BYTES", 0 if prefetch else 1 << 62)
            with num_threads(threads), tuning(path="depthwise", min_macs_per_thread=1,
                                              depthwise_task_pixels=task_pixels):
                y[prefetch] = (check_forward if prefetch else dilconv.conv2d)(
                    x, wt, b, 1, 4, 4, 5)
        np.testing.assert_array_equal(y[True], y[False])
