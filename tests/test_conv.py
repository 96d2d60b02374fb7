"""Kernels against the correlate2d oracle, seed facts, adjoints, determinism, layouts."""
import itertools

import numpy as np
import pytest
from hypothesis import given, strategies as st

import dilconv
from dilconv import _cpu, _dispatch, _validate
from dilconv._dispatch import PATHS, select
from dilconv._threads import kernel_threads
from dilconv._tuning import Tuning, tuning
from dilconv._validate import kernel_array, make_spec

from _helpers import check_backward, check_forward, num_threads, random_case

SEED_X = np.array([[1, 2, 3, 0], [0, 1, 2, 3], [3, 0, 1, 2], [2, 3, 0, 1]])
SEED_W = np.array([[2, 0], [1, 3]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_seed_toy_exact(dtype):
    y = dilconv.conv2d(SEED_X[None, None].astype(dtype), SEED_W[None, None].astype(dtype),
                       dilation=2)
    assert y.dtype == dtype
    np.testing.assert_array_equal(y[0, 0], [[8, 10], [2, 8]])


def test_seed_3to16_shape(rng):
    x = rng.standard_normal((1, 3, 256, 256)).astype(np.float32)
    w = rng.standard_normal((16, 3, 3, 3)).astype(np.float32)
    assert dilconv.conv2d(x, w, dilation=2).shape == (1, 16, 252, 252)
    assert dilconv.output_shape((1, 3, 256, 256), (16, 3, 3, 3), dilation=2) == (1, 16, 252,
                                                                                   252)


def test_seed_toy_backward_by_hand():
    # d out[i,j] / d w[a,b] = x[i+2a, j+2b]; with all-ones grad, sum over i, j in {0, 1}.
    g = dilconv.conv2d_backward(np.ones((1, 1, 2, 2)), SEED_X[None, None], SEED_W[None, None],
                                dilation=2)
    np.testing.assert_array_equal(g.weight[0, 0], [[4, 8], [8, 4]])
    np.testing.assert_array_equal(g.bias, [4])
    # Each input pixel feeds at most one output through one tap.
    np.testing.assert_array_equal(g.input[0, 0], [[2, 2, 0, 0], [2, 2, 0, 0],
                                                  [1, 1, 3, 3], [1, 1, 3, 3]])


def test_hand_computed_stride_padding():
    # 3x3 ones, 1x1 kernel of 2, padding 1, stride 2: corners of the padded 5x5 are zero.
    y = dilconv.conv2d(np.ones((1, 3, 3)), np.full((1, 1, 1, 1), 2.0), np.array([1.0]),
                       stride=2, padding=1)
    np.testing.assert_array_equal(y[0], [[1, 1, 1], [1, 3, 1], [1, 1, 1]])


GRID = [
    # (n, c, h, w, o, kh, kw, stride, padding, dilation, groups)
    (2, 3, 9, 11, 4, 3, 3, 1, 0, 1, 1),
    (1, 4, 12, 10, 6, 3, 2, (2, 1), 1, (2, 3), 2),
    (2, 6, 13, 9, 6, 3, 3, 1, 4, 4, 6),                    # depthwise
    (1, 2, 7, 7, 3, 2, 3, 3, ((2, 0), (1, 3)), 2, 1),       # asymmetric padding
    (3, 4, 8, 16, 8, 1, 5, 1, "same", (1, 3), 4),
    (1, 3, 16, 16, 5, 3, 3, 2, "valid", 2, 1),
    (2, 2, 5, 5, 2, 3, 3, 1, 9, 5, 1),                      # padding > dilated kernel
    (1, 1, 1, 1, 2, 1, 1, 4, 0, 1, 1),                      # 1-pixel image
    (1, 2, 6, 6, 2, 3, 3, 5, 2, 2, 2),                      # stride near image size
    (2, 4, 9, 9, 4, 5, 5, 1, 0, 2, 2),                      # dilated kernel == image
    (0, 3, 5, 5, 2, 3, 3, 1, 1, 1, 1),                      # empty batch
    (2, 8, 1, 64, 8, 1, 2, 1, 0, (1, 16), 1),               # wavenet-like
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", GRID)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_backward_match_oracle(case, dtype, bias, path, rng):
    n, c, h, w, o, kh, kw, stride, padding, dilation, groups = case
    x, wt, b = random_case(rng, n, c, h, w, o, kh, kw, groups, dtype, bias)
    with tuning(path=path):
        y = check_forward(x, wt, b, stride, padding, dilation, groups)
        gy = rng.standard_normal(y.shape).astype(dtype)
        check_backward(gy, x, wt, stride, padding, dilation, groups)


@pytest.fixture
def fresh_specs():
    # Shared specs remember select's choices: none made under a patched rule outlive it.
    _validate._cached_spec.cache_clear()
    yield
    _validate._cached_spec.cache_clear()


@pytest.mark.parametrize("avx512", [False, True])
def test_few_output_channels(monkeypatch, fresh_specs, avx512):
    # Many channels into one to three at unit stride (and the input gradient of RGB stems,
    # a forward of many channels into three): a BLAS product per tap only on CPUs with
    # AVX-512 (the input gradient in float32 only), else the panels; with fewer channel
    # pairs, or at a stride, the panels on every CPU.
    monkeypatch.setattr(_dispatch, "GEMM_FEW_OUTPUT_CHANNELS", avx512)
    blas = "gemm" if avx512 else "panel"
    stem = make_spec((1, 3, 32, 32), (16, 3, 3, 3), 1, 0, 2, 1)
    assert select(stem, "grad_input", dtype=np.float32) == blas
    assert select(stem, "grad_input", np.ones((16, 3, 3, 3), np.float32)) == blas
    assert select(stem, "grad_input", dtype=np.float64) == select(stem, "grad_input") == "panel"
    assert select(make_spec((1, 3, 32, 32), (8, 3, 3, 3), 1, 0, 2, 1), "grad_input") == "panel"
    assert select(make_spec((1, 64, 32, 32), (3, 64, 3, 3), 1, 1, 1, 1)) == blas
    assert select(make_spec((1, 16, 32, 32), (2, 16, 3, 3), 1, 1, 1, 1)) == blas
    assert select(make_spec((1, 64, 32, 32), (3, 64, 3, 3), 2, 1, 1, 1)) == "panel"
    assert select(make_spec((1, 3, 32, 32), (16, 3, 3, 3), 2, 0, 2, 1),
                  "grad_input") == "panel"


def test_few_output_channels_follow_the_cpu():
    assert _dispatch.GEMM_FEW_OUTPUT_CHANNELS == _cpu.cpu_features()["avx512f"]


def test_dispatch_picks_panel_for_many_channels_and_flat_or_direct_for_few():
    many = make_spec((1, 64, 32, 32), (64, 64, 3, 3), 1, 1, 1, 1)
    assert select(many) == "panel"
    assert select(many, "grad_weight") == "panel"
    assert select(make_spec((1, 8, 32, 32), (8, 2, 3, 3), 1, 1, 1, 4)) == "flat"
    assert select(make_spec((1, 8, 32, 32), (8, 2, 3, 3), 2, 1, 1, 4)) == "direct"
    # Few input channels: the weight gradient loops directly; the input gradient into
    # them (a forward of many channels into few) as test_few_output_channels says.
    stem = make_spec((1, 3, 32, 32), (16, 3, 3, 3), 1, 0, 2, 1)
    assert select(stem, "grad_weight") == "direct"
    assert select(make_spec((1, 64, 32, 32), (3, 64, 3, 3), 2, 1, 1, 1)) == "panel"
    assert select(make_spec((1, 64, 32, 32), (4, 64, 3, 3), 1, 1, 1, 1)) == "panel"
    # Few channels in long rows of several output channels: the panels (4 -> 4 at 256
    # columns is one row of 1024 outputs; strided, rows of 256 are enough).
    assert select(make_spec((1, 4, 8, 256), (4, 4, 3, 3), 1, 1, 1, 1)) == "panel"
    assert select(make_spec((1, 4, 8, 254), (4, 4, 3, 3), 1, 1, 1, 1)) == "flat"
    assert select(make_spec((1, 8, 8, 512), (2, 8, 3, 3), 1, 1, 1, 1)) == "flat"
    assert select(make_spec((1, 3, 8, 64), (8, 3, 3, 3), 2, 1, 1, 1)) == "panel"
    assert select(make_spec((1, 3, 8, 60), (8, 3, 3, 3), 2, 1, 1, 1)) == "direct"
    # Gradients of few channels: the input gradient where the panels would take its
    # forward (4 -> 4 in 256 columns, 16 -> 2), or at a stride from 16 channel pairs; never
    # into one input channel at unit stride; the weight gradient a BLAS product per tap
    # from 4 output channels, with 8 input channels or a stride.
    assert select(make_spec((1, 4, 8, 256), (4, 4, 3, 3), 1, 1, 1, 1), "grad_input") == "panel"
    assert select(make_spec((1, 4, 8, 128), (4, 4, 3, 3), 1, 1, 1, 1), "grad_input") == "direct"
    assert select(make_spec((1, 16, 8, 8), (2, 16, 3, 3), 1, 1, 1, 1), "grad_input") == "panel"
    assert select(make_spec((1, 1, 8, 64), (16, 1, 3, 3), 1, 1, 1, 1), "grad_input") == "direct"
    assert select(make_spec((1, 4, 8, 8), (4, 4, 3, 3), 2, 1, 1, 1), "grad_input") == "panel"
    assert select(make_spec((1, 4, 8, 8), (3, 4, 3, 3), 2, 1, 1, 1), "grad_input") == "direct"
    assert select(make_spec((1, 3, 8, 8), (8, 3, 3, 3), 2, 1, 1, 1), "grad_weight") == "gemm"
    assert select(make_spec((1, 3, 8, 8), (8, 3, 3, 3), 1, 1, 1, 1), "grad_weight") == "direct"
    assert select(make_spec((1, 16, 8, 8), (2, 16, 3, 3), 1, 1, 1, 1), "grad_weight") == "direct"
    assert select(make_spec((1, 8, 8, 8), (4, 8, 3, 3), 1, 1, 1, 1), "grad_weight") == "gemm"
    with tuning(path="direct"):
        assert select(make_spec((1, 64, 32, 32), (64, 64, 3, 3), 1, 1, 1, 1)) == "direct"
    with pytest.raises(ValueError, match="path"):
        with tuning(path="fast"):
            pass


def test_flat_path_keeps_nonfinite_weights_off_the_padding(rng):
    # A weight tap that only ever meets padding must not turn outputs into NaN (0 * inf).
    x = rng.standard_normal((1, 1, 5, 5))
    w = np.ones((1, 1, 3, 3))
    w[0, 0, 0, 0] = np.inf
    with tuning(path="flat"):
        y = dilconv.conv2d(x, w, padding=2, dilation=2)
    assert np.isfinite(y[0, 0, :2, :2]).all()       # the inf tap lands in the padding there
    assert np.isinf(y[0, 0, 2:, 2:]).all()


@pytest.mark.parametrize("row_products", [True, False])
@pytest.mark.parametrize("case", GRID[:7])
def test_gemm_forward_per_tap_and_per_kernel_row(case, row_products, rng):
    # Both ways the GEMM forward groups taps into products, whatever the channel count.
    n, c, h, w, o, kh, kw, stride, padding, dilation, groups = case
    x, wt, b = random_case(rng, n, c, h, w, o, kh, kw, groups, np.float32)
    with tuning(path="gemm", kw_group_below_channels=10 ** 9 if row_products else 1):
        check_forward(x, wt, b, stride, padding, dilation, groups)


@pytest.mark.parametrize("tile_pixels", [5, 64, 4096])
@pytest.mark.parametrize("case", GRID[:7] + [(1, 3, 20, 20, 7, 3, 3, 1, 0, 2, 1),
                                             (1, 5, 20, 20, 7, 3, 3, 1, 2, 2, 1)])
def test_gemm_input_gradient_in_place_and_packed(case, tile_pixels, rng):
    # The GEMM input gradient reads grad_output in place where a tap's rect spans whole
    # rows of it (large tiles), and packs narrower rects (small tiles, border taps).
    n, c, h, w, o, kh, kw, stride, padding, dilation, groups = case
    x, wt, _ = random_case(rng, n, c, h, w, o, kh, kw, groups, np.float64)
    spec = make_spec(x.shape, wt.shape, stride, padding, dilation, groups)
    gy = rng.standard_normal(spec.output_shape)
    with tuning(path="gemm", min_tile_pixels=1, max_tile_pixels=tile_pixels):
        check_backward(gy, x, wt, stride, padding, dilation, groups)


@pytest.mark.parametrize("in_place, zero_fill", [(True, False), (False, False),
                                                  (False, True)])
@pytest.mark.parametrize("tile_pixels", [5, 4096])
@pytest.mark.parametrize("case", GRID[:7] + GRID[-1:])
def test_panel_blocks_in_place_packed_and_zero_fill(case, in_place, zero_fill, tile_pixels,
                                                     rng):
    # Blocks that read the image in place and packed ones, tiles cut at the column taps'
    # range ends or spanning whole rows (zeros in the padding), small and large tiles.
    knobs = dict(path="panel", panel_in_place_bytes=1 << 30 if in_place else 0,
                 zero_fill_max=1e9 if zero_fill else -1.0, max_tile_pixels=tile_pixels)
    n, c, h, w, o, kh, kw, stride, padding, dilation, groups = case
    for dtype in (np.float32, np.float64):
        x, wt, b = random_case(rng, n, c, h, w, o, kh, kw, groups, dtype)
        with tuning(**knobs):
            y = check_forward(x, wt, b, stride, padding, dilation, groups)
            check_backward(rng.standard_normal(y.shape).astype(dtype), x, wt, stride,
                           padding, dilation, groups)


@pytest.mark.parametrize("stride, padding, dilation, k", [
    (2, 2, 2, 3),                  # odd rows and columns: no tap reads them
    (2, 1, 1, 3),                  # every phase, with two taps or one
    ((3, 2), ((0, 4), (3, 1)), (1, 3), 2),   # phases without taps; asymmetric padding
    (3, 5, 2, 3),                  # padding past part of the kernel: cropped phases
    ((2, 1), 0, (2, 1), 4),        # stride along rows only
    (2, 3, 4, 3),                  # a phase's taps dilated (4 / 2)
    ((2, 3), (6, 1), (6, 3), 4),   # dilated phases along rows, one tap per column phase
])
@pytest.mark.parametrize("groups", [1, 2])
def test_panel_strided_input_gradient_by_stride_phases(stride, padding, dilation, k, groups,
                                                       rng):
    # At a stride the panel family's input gradient is one unit-stride forward per phase.
    for dtype in (np.float32, np.float64):
        x, wt, b = random_case(rng, 2, 16, 13, 11, 8, k, k, groups, dtype)
        y = dilconv.conv2d(x, wt, b, stride, padding, dilation, groups)
        with tuning(path="panel"):
            assert select(make_spec(x.shape, wt.shape, stride, padding, dilation, groups),
                          "grad_input", wt) == "panel"
            check_backward(rng.standard_normal(y.shape).astype(dtype), x, wt, stride,
                           padding, dilation, groups)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("view", [False, True])
def test_panel_partial_blocks_read_in_place_give_the_packed_bits(view, dtype, rng):
    # A row's last block, more than half full, reads a whole block of the image in
    # place, past the row's end, in the rows where that stays in the channel's plane
    # (the last rows' are packed): the same terms in the same order as packed blocks.
    nr = dilconv._tiers._panel.BLOCK_NBYTES // np.dtype(dtype).itemsize
    packed = dict(path="panel", panel_in_place_bytes=0, panel_in_place_max_blocks=0)
    for wo, c, o, k, d, padding in ((nr - 1, 3, 8, 3, 2, 0), (2 * nr - 3, 2, 16, 2, 3, 1),
                                    (nr + nr // 2 + 1, 1, 4, 3, 1, (2, 0)),
                                    (nr // 2 + 1, 4, 8, 1, 1, 0)):
        h = 9
        w = wo + (k - 1) * d - 2 * (padding[1] if isinstance(padding, tuple) else padding)
        if view:         # planes apart, the last one ending where the buffer does
            x = rng.standard_normal((2, 2 * c, h, w)).astype(dtype)[:, 1::2]
        else:
            x = rng.standard_normal((2, c, h, w)).astype(dtype)
        wt = rng.standard_normal((o, c, k, k)).astype(dtype)
        with tuning(path="panel", panel_in_place_bytes=1 << 30):
            y = check_forward(x, wt, None, 1, padding, d, 1)
        assert y.shape[-1] == wo
        with tuning(**packed):
            np.testing.assert_array_equal(y, dilconv.conv2d(x, wt, None, 1, padding, d))


@pytest.mark.parametrize("zero_fill", [False, True])
@pytest.mark.parametrize("tile_pixels", [5, 4096])
@pytest.mark.parametrize("case", GRID[:7] + GRID[-1:])
def test_panel_taps_summed_in_chunks_give_the_same_bits(case, tile_pixels, zero_fill, rng):
    # A tap at a time (blocks accumulating into the output, or into a scratch block where
    # a block wraps across tile rows) and all taps at once add the same terms in the
    # same order; the oracle checks one of them.
    n, c, h, w, o, kh, kw, stride, padding, dilation, groups = case
    knobs = dict(path="panel", panel_in_place_bytes=0, max_tile_pixels=tile_pixels,
                 zero_fill_max=1e9 if zero_fill else -1.0)
    for dtype in (np.float32, np.float64):
        x, wt, b = random_case(rng, n, c, h, w, o, kh, kw, groups, dtype)
        with tuning(panel_chunk_bytes=1, **knobs):
            chunked = check_forward(x, wt, b, stride, padding, dilation, groups)
        with tuning(panel_chunk_bytes=1 << 30, **knobs):
            whole = dilconv.conv2d(x, wt, b, stride, padding, dilation, groups)
        np.testing.assert_array_equal(chunked, whole)


def _merged_groups_case(dtype, og, groups=4, n=2, h=13, w=17):
    # Groups of half a vector of input channels, with enough taps for the lanes scheme
    # in the tier that runs (None where its plans never take that scheme).
    panel = dilconv._tiers._panel
    if not panel.LANES_DEFAULT:
        return None
    lanes = panel.lanes_layout(make_spec((1, 1, 1, 1), (1, 1, 1, 1), 1, 0, 1, 1),
                               np.dtype(dtype).itemsize)[0]
    k = int(np.ceil(np.sqrt(panel.LANES_MIN_TERMS / lanes)))
    og = og * max(1, 16 // lanes)           # enough channels for the panel family
    return (n, groups * lanes // 2, h, w, groups * og, k, k, 1, 2, 2, groups)


def test_lanes_rule_follows_the_tier_plans():
    # Which forwards the tier's plans give the lanes scheme: long enough sums of whole
    # vectors of input channels, column kernels (kH x 1) where the tier says so; the knob
    # overrides both ways.
    panel = dilconv._tiers._panel
    f32 = np.dtype(np.float32).itemsize
    lanes = panel.lanes_layout(make_spec((1, 1, 1, 1), (1, 1, 1, 1), 1, 0, 1, 1), f32)[0]
    c = lanes * int(np.ceil(panel.LANES_MIN_TERMS / (3 * lanes)))    # 3 taps reach the minimum
    row = make_spec((1, c, 16, 64), (c, c, 1, 3), 1, 0, 1, 1)
    column = make_spec((1, c, 64, 16), (c, c, 3, 1), 1, 0, 1, 1)
    short = make_spec((1, lanes, 16, 64), (c, lanes, 1, 1), 1, 0, 1, 1)
    default = Tuning()
    assert panel.uses_lanes(row, f32, default) == panel.LANES_DEFAULT
    assert panel.uses_lanes(column, f32, default) == (panel.LANES_DEFAULT
                                                       and panel.LANES_COLUMN_KERNELS)
    assert panel.uses_lanes(short, f32, default) == (panel.LANES_DEFAULT
                                                      and lanes >= panel.LANES_MIN_TERMS)
    for forced in (True, False):
        assert all(panel.uses_lanes(s, f32, Tuning(panel_lanes=forced)) == forced
                   for s in (row, column, short))


@pytest.mark.parametrize("tier", dilconv._tiers.SUPPORTED)
def test_lanes_tap_major_where_runs_get_longer(tier, monkeypatch, rng):
    # Thin border segments that only some column taps reach (dilation 2 on 7 columns: 2,
    # 3 and 2 columns) take the taps one at a time where that lengthens the runs, with the
    # same bits as the taps summed together; rows of whole runs either way do not.
    panel = dilconv._tiers.kernels(tier)._panel
    thin = make_spec((2, 16, 7, 7), (32, 16, 3, 3), 1, 2, 2, 1)
    wide = make_spec((1, 16, 8, 40), (32, 16, 1, 3), 1, 0, (1, 2), 1)
    monkeypatch.setattr(panel, "LANES_TAP_MAJOR_RUN_GAIN", 1.2)
    assert panel.lanes_tap_major_runs_longer(thin, False)
    assert not panel.lanes_tap_major_runs_longer(thin, True)
    assert not panel.lanes_tap_major_runs_longer(wide, False)
    x, wt, b = random_case(rng, 2, 16, 7, 7, 32, 3, 3, 1, np.float32)
    results = []
    for gain in (1.2, None):
        monkeypatch.setattr(panel, "LANES_TAP_MAJOR_RUN_GAIN", gain)
        with dilconv._tiers.use(tier), tuning(path="panel", panel_lanes=True,
                                              zero_fill_max=0.0):
            results.append(check_forward(x, wt, b, 1, 2, 2, 1))
    assert np.array_equal(*results)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("og", [8, 12])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lanes_merged_groups_give_the_panels_sums(dtype, og, threads, rng):
    # Pairs of groups summed together with block-diagonal weights: the zeros add nothing;
    # with a non-finite input (0 * inf would be nan in the other group's outputs) the
    # panels run instead (the same non-finite outputs). The oracle checks the finite one.
    case = _merged_groups_case(dtype, og=og)
    if case is None:
        pytest.skip("this tier's plans do not take the lanes scheme")
    n, c, h, w, o, kh, kw, stride, padding, dilation, groups = case
    spec = make_spec((n, c, h, w), (o, c // groups, kh, kw), stride, padding, dilation,
                     groups)
    assert select(spec, "forward") == "panel"
    assert dilconv._tiers._panel.lanes_merged_groups(spec, np.dtype(dtype).itemsize,
                                                      Tuning()) == 2
    x, wt, b = random_case(rng, n, c, h, w, o, kh, kw, groups, dtype)
    for bad in (None, np.inf, np.nan):
        if bad is not None:
            x[1, c // 2 - 1, h // 2, w // 3] = bad
        with num_threads(threads), tuning(min_macs_per_thread=1):
            merged = (check_forward if bad is None else dilconv.conv2d)(
                x, wt, b, stride, padding, dilation, groups)
            with tuning(panel_lanes=False):
                panels = dilconv.conv2d(x, wt, b, stride, padding, dilation, groups)
        np.testing.assert_array_equal(merged, panels)


# Channels per group that fill whole vectors and blocks of output channels, and not.
LANES_GRID = GRID[:7] + GRID[-1:] + [
    (1, 32, 13, 17, 40, 3, 3, 1, 3, 3, 1),
    (2, 24, 9, 20, 16, 3, 3, 2, ((2, 1), (0, 3)), (2, 1), 2),
]


@pytest.mark.parametrize("zero_fill", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("one_row_bands", [False, True])
@pytest.mark.parametrize("taps_in_chunks", [False, True])
@pytest.mark.parametrize("case", LANES_GRID)
def test_panel_lanes_give_the_same_bits_as_the_panels(case, taps_in_chunks, one_row_bands,
                                                      threads, zero_fill, rng, monkeypatch):
    # Output channels in vector lanes, each output starting from its bias and adding its
    # taps and channels in the panels' order: the same bits, forward and input gradient,
    # with a run's taps summed in registers or a tap at a time in chunks of one channel
    # block, in bands of one output row (each task packing its own rows), where every
    # thread packs one shared band, and with border columns reading zeros in packed rows
    # padded with them (where narrow); the oracle checks one of them.
    if one_row_bands:
        for budget in ("LANES_BAND_BYTES", "LANES_TAP_MAJOR_BAND_BYTES"):
            monkeypatch.setattr(dilconv._tiers._panel, budget, 1)
    n, c, h, w, o, kh, kw, stride, padding, dilation, groups = case
    conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    dilconv.set_num_threads(threads)
    try:
        for dtype in (np.float32, np.float64):
            x, wt, b = random_case(rng, n, c, h, w, o, kh, kw, groups, dtype)
            results = {}
            for lanes in (True, False):
                with tuning(path="panel", panel_lanes=lanes, min_macs_per_thread=1,
                            panel_lanes_chunk_bytes=1 if taps_in_chunks else None,
                            zero_fill_max=1e9 if zero_fill else -1.0):
                    y = (check_forward(x, wt, b, **conv) if lanes
                         else dilconv.conv2d(x, wt, b, **conv))
                    gy = np.cos(np.arange(y.size, dtype=dtype)).reshape(y.shape)
                    results[lanes] = (y,) + tuple(dilconv.conv2d_backward(gy, x, wt, **conv))
            for got, want in zip(results[True], results[False]):
                np.testing.assert_array_equal(got, want)
    finally:
        dilconv.set_num_threads(None)


@pytest.mark.parametrize("case", GRID)
def test_panel_tiles_cover_the_plane_and_align_with_tap_ranges(case):
    n, c, h, w, o, kh, kw, stride, padding, dilation, groups = case
    spec = make_spec((max(n, 1), c, h, w), (o, c // groups, kh, kw), stride, padding,
                     dilation, groups)
    for zero_fill in (False, True):
        tiles = dilconv._tiers._panel.aligned_tiles(spec, 7, zero_fill)
        covered = np.zeros((spec.ho, spec.wo), int)
        for r0, r1, c0, c1 in tiles:
            covered[r0:r1, c0:c1] += 1
            # Each tap reads the image for every pixel of the tile, or for none (row
            # taps only, with zero_fill).
            edges = [(spec.oh_lo, spec.oh_hi, r0, r1)]
            if not zero_fill:
                edges.append((spec.ow_lo, spec.ow_hi, c0, c1))
            for lo, hi, a, b in edges:
                for t in range(len(lo)):
                    inside = (a >= lo[t]) & (b <= hi[t])
                    outside = (b <= lo[t]) | (a >= hi[t])
                    assert inside or outside
        assert (covered == 1).all()


def test_tiny_calls_stay_on_one_thread():
    spec = make_spec((1, 2, 5, 6), (2, 2, 3, 2), 1, 0, 2, 1)
    try:
        dilconv.set_num_threads(2)
        assert kernel_threads(spec, 4, Tuning()) == 1
        big = make_spec((1, 64, 64, 64), (64, 64, 3, 3), 1, 1, 1, 1)
        assert kernel_threads(big, 4, Tuning()) == 2
    finally:
        dilconv.set_num_threads(None)


def test_env_var_forces_path(monkeypatch):
    spec = make_spec((1, 64, 32, 32), (64, 64, 3, 3), 1, 1, 1, 1)
    monkeypatch.setenv("DILCONV_PATH", "direct")
    assert select(spec) == "direct"
    monkeypatch.setenv("DILCONV_PATH", "bogus")
    with pytest.raises(ValueError, match="DILCONV_PATH"):
        select(spec)


def test_gemm_tiles_cover_large_planes_once(rng):
    # Planes larger than one tile (several row tiles, and column tiles on wide rows).
    for shape in ((1, 4, 70, 90), (1, 4, 2, 5000)):
        x, wt, b = random_case(rng, *shape, 8, 3, 3, 1, np.float64)
        args = (1, 2, (1, 2), 1)
        with tuning(path="gemm"):
            y = check_forward(x, wt, b, *args)
            check_backward(rng.standard_normal(y.shape), x, wt, *args)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("stride", [1, 2])
def test_gemm_forward_and_weight_gradient_are_the_forced_reference(stride, dtype, rng):
    # Never chosen on their own (panel is), kept as the BLAS reference and fallback: on a
    # channel-heavy layer, forced, they agree with the oracle like every other path.
    x, wt, b = random_case(rng, 2, 32, 11, 13, 32, 3, 3, 1, dtype)
    args = (stride, 2, 2, 1)
    spec = make_spec(x.shape, wt.shape, *args)
    assert "gemm" not in (select(spec, "forward", wt), select(spec, "grad_weight"))
    with tuning(path="gemm"):
        assert (select(spec, "forward", wt), select(spec, "grad_weight")) == ("gemm", "gemm")
        y = check_forward(x, wt, b, *args)
        check_backward(rng.standard_normal(y.shape).astype(dtype), x, wt, *args)


@pytest.mark.parametrize("case", GRID[:6])
def test_unbatched_matches_batched(case, rng):
    n, c, h, w, o, kh, kw, stride, padding, dilation, groups = case
    x, wt, b = random_case(rng, 1, c, h, w, o, kh, kw, groups, np.float64)
    args = (stride, padding, dilation, groups)
    y = dilconv.conv2d(x[0], wt, b, *args)
    np.testing.assert_array_equal(y, dilconv.conv2d(x, wt, b, *args)[0])
    gy = rng.standard_normal(y.shape)
    g1 = dilconv.conv2d_backward(gy, x[0], wt, *args)
    g4 = dilconv.conv2d_backward(gy[None], x, wt, *args)
    np.testing.assert_array_equal(g1.input, g4.input[0])
    np.testing.assert_array_equal(g1.weight, g4.weight)
    np.testing.assert_array_equal(g1.bias, g4.bias)


def _inner(a, b):
    return float(np.vdot(a.astype(np.float64), b.astype(np.float64)))


@pytest.mark.parametrize("case", GRID)
def test_adjoint_identities(case, rng):
    n, c, h, w, o, kh, kw, stride, padding, dilation, groups = case
    x, wt, _ = random_case(rng, n, c, h, w, o, kh, kw, groups, np.float64, bias=False)
    args = (stride, padding, dilation, groups)
    y = dilconv.conv2d(x, wt, None, *args)
    g = rng.standard_normal(y.shape)
    grads = dilconv.conv2d_backward(g, x, wt, *args)
    scale = max(1.0, _inner(np.abs(y), np.abs(g)))
    # <conv(x), g> = <x, conv^T(g)>, and conv is linear in w: <conv_w(x), g> = <w, dL/dw>.
    assert abs(_inner(y, g) - _inner(x, grads.input)) <= 1e-12 * scale
    assert abs(_inner(y, g) - _inner(wt, grads.weight)) <= 1e-12 * scale
    np.testing.assert_allclose(grads.bias, g.sum(axis=(0, 2, 3)), rtol=1e-12, atol=1e-12)


def test_finite_differences(rng):
    x, wt, b = random_case(rng, 1, 2, 6, 7, 2, 3, 2, 1, np.float64)
    args = dict(stride=(2, 1), padding=((1, 2), (0, 1)), dilation=(1, 2))
    g = rng.standard_normal(dilconv.conv2d(x, wt, b, **args).shape)
    loss = lambda x_, w_, b_: float((dilconv.conv2d(x_, w_, b_, **args) * g).sum())
    grads = dilconv.conv2d_backward(g, x, wt, **args)
    eps = 1e-6
    for arr, grad in ((x, grads.input), (wt, grads.weight), (b, grads.bias)):
        for idx in list(np.ndindex(arr.shape))[::3]:
            old = arr[idx]
            arr[idx] = old + eps
            up = loss(x, wt, b)
            arr[idx] = old - eps
            down = loss(x, wt, b)
            arr[idx] = old
            assert abs((up - down) / (2 * eps) - grad[idx]) < 1e-6


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bitwise_identical_across_thread_counts(dtype, rng):
    # Large enough that the GEMM path cuts the planes into several tiles.
    x, wt, b = random_case(rng, 3, 8, 61, 75, 12, 3, 3, 2, dtype)
    args = (1, 3, 2, 2)
    gy = rng.standard_normal(dilconv.conv2d(x, wt, b, *args).shape).astype(dtype)
    results = []
    try:
        for path, threads in itertools.product(PATHS, (1, 2, 3)):
            dilconv.set_num_threads(threads)
            assert dilconv.get_num_threads() == threads
            # Every thread count really runs, however little work each thread gets.
            with tuning(path=path, min_macs_per_thread=1):
                results.append((path, (dilconv.conv2d(x, wt, b, *args),)
                                + tuple(dilconv.conv2d_backward(gy, x, wt, *args))))
    finally:
        dilconv.set_num_threads(None)
    by_path = {}
    for path, outputs in results:
        by_path.setdefault(path, []).append(outputs)
    for runs in by_path.values():
        for other in runs[1:]:
            for a, b_ in zip(runs[0], other):
                assert a.tobytes() == b_.tobytes()


def _unaligned(x):
    """x's values in a C-contiguous array one byte off its item alignment."""
    raw = np.zeros(x.nbytes + 1, np.uint8)
    y = raw[1:].view(x.dtype).reshape(x.shape)
    y[...] = x
    assert not y.flags.aligned and y.flags.c_contiguous
    return y


def _layouts(x):
    """The same values in C order, Fortran order, a strided view, read-only, big-endian,
    and one byte off alignment (as buffers from pickle or the network can be)."""
    yield "c", x
    yield "unaligned", _unaligned(x)
    yield "fortran", np.asfortranarray(x)
    big = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)
    big[..., ::2] = x
    yield "strided", big[..., ::2]
    ro = x.copy()
    ro.flags.writeable = False
    yield "readonly", ro
    yield "bigendian", x.astype(x.dtype.newbyteorder(">"))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layouts_give_identical_results(dtype, rng):
    x, wt, b = random_case(rng, 2, 4, 10, 9, 4, 3, 3, 2, dtype)
    args = (2, 1, (1, 2), 2)
    y0 = dilconv.conv2d(x, wt, b, *args)
    gy = rng.standard_normal(y0.shape).astype(dtype)
    g0 = dilconv.conv2d_backward(gy, x, wt, *args)
    for (name, xl), (_, wl), (_, gl) in zip(_layouts(x), _layouts(wt), _layouts(gy)):
        y = dilconv.conv2d(xl, wl, b, *args)
        assert y.dtype == dtype, name
        np.testing.assert_array_equal(y, y0, err_msg=name)
        for got, want in zip(dilconv.conv2d_backward(gl, xl, wl, *args), g0):
            np.testing.assert_array_equal(got, want, err_msg=name)


def test_unaligned_arrays_reach_the_kernels_aligned(rng):
    # x86 tolerates misaligned loads, so results alone cannot show it (the sanitizer
    # build does): the arrays the kernels get are aligned copies, and an unaligned `out`
    # gets the result through a copy.
    x, wt, b = random_case(rng, 2, 4, 10, 9, 4, 3, 3, 2, np.float32)
    call, _ = dilconv._validate.conv_call(_unaligned(x), _unaligned(wt), _unaligned(b), 1,
                                          0, 1, 2, "zeros")
    assert call.x.flags.aligned and call.weight.flags.aligned and call.bias.flags.aligned
    want = dilconv.conv2d(x, wt, b, groups=2)
    out = _unaligned(np.zeros_like(want))
    assert dilconv.conv2d(x, wt, b, groups=2, out=out) is out
    np.testing.assert_array_equal(out, want)


def test_lists_and_ints_become_float64():
    y = dilconv.conv2d(SEED_X[None].tolist(), SEED_W[None, None].tolist(), dilation=2)
    assert y.dtype == np.float64
    np.testing.assert_array_equal(y[0], [[8, 10], [2, 8]])


def test_ints_follow_float32_of_other_arrays():
    w = SEED_W[None, None].astype(np.float32)
    assert dilconv.conv2d(SEED_X[None], w, dilation=2).dtype == np.float32
    assert dilconv.conv2d(SEED_X[None].astype(np.float16), w.astype(np.float16),
                          dilation=2).dtype == np.float64


@pytest.mark.parametrize("batched", [True, False])
def test_out_argument(batched, rng):
    x, wt, b = random_case(rng, 2, 3, 8, 8, 4, 3, 3, 1, np.float32)
    if not batched:
        x = x[0]
    expected = dilconv.conv2d(x, wt, b, padding=2, dilation=2)
    out = np.full(expected.shape, np.nan, np.float32)
    assert dilconv.conv2d(x, wt, b, padding=2, dilation=2, out=out) is out
    np.testing.assert_array_equal(out, expected)
    # A non-contiguous out is filled too.
    big = np.full(expected.shape[:-1] + (2 * expected.shape[-1],), np.nan, np.float32)
    strided = big[..., ::2]
    assert dilconv.conv2d(x, wt, b, padding=2, dilation=2, out=strided) is strided
    np.testing.assert_array_equal(strided, expected)


def test_needs_selects_gradients(rng):
    x, wt, _ = random_case(rng, 1, 2, 5, 5, 2, 2, 2, 1, np.float64)
    gy = np.ones((1, 2, 4, 4))
    g = dilconv.conv2d_backward(gy, x, wt, needs=("weight",))
    assert g.input is None and g.bias is None and g.weight.shape == wt.shape
    g = dilconv.conv2d_backward(gy, x, wt, needs="bias")
    assert g.input is None and g.weight is None
    np.testing.assert_array_equal(g.bias, [16, 16])


def test_empty_batch_gives_zero_gradients(rng):
    x, wt, _ = random_case(rng, 0, 2, 5, 5, 3, 3, 3, 1, np.float32)
    y = dilconv.conv2d(x, wt)
    assert y.shape == (0, 3, 3, 3)
    g = dilconv.conv2d_backward(y, x, wt)
    assert g.input.shape == x.shape
    assert not g.weight.any() and not g.bias.any()


@st.composite
def conv_cases(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    c = groups * draw(st.integers(1, 3))
    o = groups * draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    dilation = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    pads = ((draw(st.integers(0, 6)), draw(st.integers(0, 6))),
            (draw(st.integers(0, 6)), draw(st.integers(0, 6))))
    h = draw(st.integers(max(1, dilation[0] * (kh - 1) + 1 - sum(pads[0])), 20))
    w = draw(st.integers(max(1, dilation[1] * (kw - 1) + 1 - sum(pads[1])), 20))
    n = draw(st.integers(0, 3))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2 ** 32 - 1))
    return (n, c, h, w, o, kh, kw, groups, stride, pads, dilation, dtype, bias, seed)


@given(conv_cases(), st.sampled_from(PATHS))
def test_property_random_cases_match_oracle(case, path):
    n, c, h, w, o, kh, kw, groups, stride, pads, dilation, dtype, bias, seed = case
    rng = np.random.default_rng(seed)
    x, wt, b = random_case(rng, n, c, h, w, o, kh, kw, groups, dtype, bias)
    with tuning(path=path):
        y = check_forward(x, wt, b, stride, pads, dilation, groups)
        gy = rng.standard_normal(y.shape).astype(dtype)
        check_backward(gy, x, wt, stride, pads, dilation, groups)


def test_spec_tap_ranges_skip_padding():
    # Kernel 3, dilation 18, padding 18 on a 33-pixel axis: the outer taps only reach half.
    spec = make_spec((1, 1, 33, 33), (1, 1, 3, 3), 1, 18, 18, 1)
    assert spec.ho == 33
    assert list(spec.oh_lo) == [18, 0, 0] and list(spec.oh_hi) == [33, 33, 15]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("knobs", [dict(path="panel", panel_lanes=True),
                                   dict(path="panel", panel_lanes=False),
                                   dict(path="panel", panel_lanes=False,
                                        panel_in_place_bytes=1 << 30),
                                   dict(path="direct"), dict()])
@pytest.mark.parametrize("view", ["channels", "reversed", "rows", "batch"])
def test_input_planes_lying_apart_give_the_contiguous_bits(view, knobs, dtype, rng):
    # conv2d's panels read an input whose channel planes lie apart (some channels of an
    # image, or some rows of each: dilconv.dask's stripes of a file) without a copy; every
    # other family reads a copy. Either way the bits are those of the contiguous input.
    big = rng.standard_normal((4, 48, 40, 33)).astype(dtype)
    x = {"channels": big[:, 3:35:2], "reversed": big[::2, ::-3],
         "rows": big[:, :16, 5:29], "batch": big[::3, 16:32]}[view]
    assert not x.flags.c_contiguous and x.strides[-1] == x.itemsize
    assert kernel_array(x, x.dtype, planes=True) is x            # no copy for the panels
    for groups, width in ((1, 3), (2, 3), (x.shape[1] // 2, 1)):
        w = rng.standard_normal((32, x.shape[1] // groups, 3, width)).astype(dtype)
        for threads in (1, 2):
            with tuning(**knobs), num_threads(threads):
                got = dilconv.conv2d(x, w, None, 1, (2, 1), 2, groups)
                want = dilconv.conv2d(np.ascontiguousarray(x), w, None, 1, (2, 1), 2, groups)
            np.testing.assert_array_equal(got, want)


def test_panel_forward_refuses_planes_that_are_not_contiguous():
    from dilconv._tiers import _panel
    spec = make_spec((1, 2, 4, 6), (1, 2, 1, 1), 1, 0, 1, 1)
    x = np.zeros((1, 2, 4, 12))[..., ::2]
    with pytest.raises(ValueError, match="planes"):
        _panel.forward(x, np.ones((1, 2, 1, 1)), np.zeros(0), np.zeros((1, 1, 4, 6)), spec,
                       Tuning())


@pytest.mark.parametrize("tier", dilconv._tiers.SUPPORTED)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", [
    (3, 72, 9, 11, 30, 3, 3, 1, 2, 2, 1),         # 3 channel blocks, the last partial
    (2, 40, 10, 13, 44, 3, 3, 2, 1, (1, 2), 2),   # groups of 20 -> 22, stride 2
    (1, 64, 7, 37, 9, 1, 3, 1, (0, 3), 3, 1),     # 9 outputs: one block of MR rows
])
@pytest.mark.parametrize("c_group", [2, 4])
def test_weight_gradient_packed_grad_output_gives_the_same_bits(case, threads, tier, c_group,
                                                                rng):
    # grad_output packed MR_GW channels per pixel, for tasks of c_group channel blocks
    # (more than a group has, in some cases; where the tier's MR_GW passes MR), against
    # read in place by tasks of one (the tuning's
    # panel_grad_weight_* knobs, which the fuzz lab draws too): each weight's
    # sum takes its pixels in the same order, so the same bits; the oracle checks one.
    panel = dilconv._tiers.kernels(tier)._panel
    n, c, h, w, o, kh, kw, stride, padding, dilation, groups = case
    conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    spec = make_spec((n, c, h, w), (o, c // groups, kh, kw), stride, padding, dilation,
                     groups)
    for dtype in (np.float32, np.float64):
        x, wt, b = random_case(rng, n, c, h, w, o, kh, kw, groups, dtype)
        gy = np.sin(np.arange(np.prod(spec.output_shape), dtype=dtype))
        gy = gy.reshape(spec.output_shape)
        results = []
        for packed in (True, False):
            knobs = dict(path="panel", min_macs_per_thread=1, panel_grad_weight_packed=packed,
                         panel_grad_weight_c_group=c_group if packed else 1)
            blocks = panel.grad_weight_blocks(spec, np.dtype(dtype).itemsize, Tuning(**knobs))
            assert blocks[1:3] == (c_group if packed else 1, packed and panel.MR_GRAD_WEIGHT
                                   > panel.MR and o // groups > panel.MR)
            with dilconv._tiers.use(tier), tuning(**knobs), num_threads(threads):
                grads = (check_backward(gy, x, wt, **conv) if packed else
                         dilconv.conv2d_backward(gy, x, wt, **conv))
            results.append(grads.weight)
        np.testing.assert_array_equal(*results)
