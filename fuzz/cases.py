"""Random cases for the campaign.

A case is a small JSON-able dict: geometry, argument forms, padding mode, dtype, memory
layouts, thread count, kernel path, CPU tier and a seed for its arrays. Case `i` of a
campaign with seed `S` depends on (S, i) only, so any case can be rebuilt from its repro file
or its index (its CPU tier is drawn among those the running CPU supports, from a stream of
its own: the rest of the case is the same on every CPU).

Geometry is normalised here independently of dilconv's validator (`padding_amounts`,
`out_size`), so the lab also checks how dilconv reads its arguments.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from dilconv import _tiers
from dilconv._dispatch import PATHS
from dilconv._tier_table import TIERS

# Every family forced, or None: the one dilconv's dispatch chooses (as users run it).
DRAWN_PATHS = PATHS + (None,)

# The generator draws padding modes from this list; the oracle (dilconv.testing) pads with
# numpy.pad and convolves with zero padding.
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
MODE_WEIGHTS = (0.76, 0.08, 0.08, 0.08)
PADDING_FORMS = ("int", "pair", "asym", "same", "valid")
LAYOUTS = ("c", "fortran", "strided", "negstride", "planes", "readonly", "bigendian")
VALUE_KINDS = ("normal", "uniform", "int", "scaled", "sparse")
EDGES = ("none", "exact_fit", "pad_gt_kernel", "stride_gt_image", "output_one", "one_pixel")
EDGE_WEIGHTS = (0.6, 0.08, 0.08, 0.08, 0.08, 0.08)
KERNEL_SIZES = (1, 2, 3, 4, 5, 6, 7)
KERNEL_WEIGHTS = (0.18, 0.2, 0.26, 0.1, 0.1, 0.08, 0.08)
THREADS = (1, 2)
DTYPES = ("float32", "float64")
# Public functions a case can go through (invalid cases always use conv2d). conv1d cases
# are 2-D cases of height 1; a conv_transpose2d case is the adjoint of its conv2d geometry:
# its input has conv2d's output shape and its output conv2d's input shape.
APIS = ("conv2d", "conv1d", "conv_transpose2d")
API_WEIGHTS = (0.7, 0.15, 0.15)
GRADS = {"grad_input": "input", "grad_weight": "weight", "grad_bias": "bias"}
VALID_OPS = ("forward", "grad_input", "grad_weight", "grad_bias", "adjoint", "determinism",
             "tiers")
OPS = VALID_OPS + ("invalid",)
SMALL_SIZE = 12
# Tile sizes (pixels) forced on some cases: default GEMM tiles and flat bands are larger
# than any image the lab draws, so without this their boundaries would never be crossed.
TILE_PIXELS = (3, 7, 16, 50)
# CPU tiers a case may run on (its "isa"; "tier" is the small/large cost class): those the
# running CPU supports, the test-only v4_on_v3 included. The FMA tiers must agree bit for bit.
ISAS = _tiers.SUPPORTED
FMA_ISAS = tuple(t for t in ISAS if "fma" in TIERS[t][1])


@dataclass(frozen=True)
class GenConfig:
    """What the generator may draw. Cost caps are in multiply-adds of the oracle (one
    correlate2d tap per output pixel), which is what dominates a case's time."""

    dtypes: tuple = DTYPES
    ops: tuple = OPS
    max_size: int = 48
    invalid_rate: float = 0.1
    large_rate: float = 0.1
    small_cost: float = 1.5e5
    large_cost: float = 1e6
    modes: tuple = PADDING_MODES
    apis: tuple = APIS
    isas: tuple = ISAS
    # Cases that also run on every other tier (the "tiers" op): up to three more runs of
    # the kernels, so a fraction keeps campaigns about as fast.
    cross_tier_rate: float = 0.25


def case_seed(seed: int, index: int) -> int:
    """Seed of case `index` of the campaign with seed `seed` (independent streams)."""
    return int(np.random.SeedSequence(entropy=int(seed), spawn_key=(int(index),))
               .generate_state(1, np.uint32)[0])


def pair(value) -> tuple:
    """An int or a 2-sequence as (h, w)."""
    return (value, value) if isinstance(value, (int, np.integer)) else tuple(value)


def geom(case, key) -> tuple:
    """The case's stride or dilation as a 2-D (h, w) pair (conv1d's is (1, value))."""
    value = case[key]
    if case.get("api") == "conv1d":
        return (1, value if isinstance(value, (int, np.integer)) else value[0])
    return pair(value)


def pair_arg(case, key, hw) -> dict:
    """{key: argument} giving the 2-D pair `hw` in the case's API form."""
    if case.get("api") == "conv1d":
        return {key: hw[1]}
    return {key: hw[0] if hw[0] == hw[1] else list(hw)}


def padding_arg(case, pads) -> list:
    """Explicit ((top, bottom), (left, right)) amounts in the case's API form."""
    return list(pads[1]) if case.get("api") == "conv1d" else [list(p) for p in pads]


def out_size(size, k, stride, dilation, lo, hi) -> int:
    return (size + lo + hi - dilation * (k - 1) - 1) // stride + 1


def padding_amounts(case) -> tuple:
    """((top, bottom), (left, right)) for the case's padding, whatever its form."""
    padding = case["padding"]
    if padding == "valid":
        return ((0, 0), (0, 0))
    if padding == "same":
        pads = []
        for k, d in zip((case["kh"], case["kw"]), geom(case, "dilation")):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))   # odd pixel bottom/right
        return tuple(pads)
    if isinstance(padding, (int, np.integer)):
        return ((0, 0) if case.get("api") == "conv1d" else (padding, padding),
                (padding, padding))
    if case.get("api") == "conv1d":           # (p,) or (left, right)
        return ((0, 0), (padding[0], padding[-1]))
    if isinstance(padding[0], (int, np.integer)):
        return ((padding[0], padding[0]), (padding[1], padding[1]))
    return (tuple(padding[0]), tuple(padding[1]))


def output_padding(case) -> tuple:
    """conv_transpose2d's output_padding that gives back the conv2d input size."""
    pads = padding_amounts(case)
    return tuple((size + sum(side) - d * (k - 1) - 1) % s for size, side, k, d, s in zip(
        (case["h"], case["w"]), pads, (case["kh"], case["kw"]), geom(case, "dilation"),
        geom(case, "stride")))


def shapes(case) -> dict:
    """Batched shapes of the conv2d geometry's x, weight, bias and grad_output (NCHW, OIHW):
    the arrays every case is built from (a transposed convolution's bias has C entries)."""
    g, n = case["groups"], case["n"]
    c, o = g * case["cg"], g * case["og"]
    (pt, pb), (pl, pr) = padding_amounts(case)
    (sh, sw), (dh, dw) = geom(case, "stride"), geom(case, "dilation")
    ho = out_size(case["h"], case["kh"], sh, dh, pt, pb)
    wo = out_size(case["w"], case["kw"], sw, dw, pl, pr)
    bias = (c,) if case.get("api") == "conv_transpose2d" else (o,)
    return {"input": (n, c, case["h"], case["w"]), "weight": (o, case["cg"], case["kh"],
            case["kw"]), "bias": bias, "grad_output": (n, o, ho, wo)}


def roles(case, named: dict) -> dict:
    """Map conv2d-geometry entries (input, weight, bias, grad_output) to the case's API
    roles: a transposed convolution's input is conv2d's grad_output and the reverse."""
    if case.get("api") == "conv_transpose2d":
        return {"input": named["grad_output"], "weight": named["weight"],
                "bias": named["bias"], "grad_output": named["input"]}
    return dict(named)


def api_shape(case, shape) -> tuple:
    """A 4-D (role) shape as the API sees it: conv1d drops the height axis."""
    return shape[:2] + shape[3:] if case.get("api") == "conv1d" and len(shape) == 4 else shape


def is_valid(case) -> bool:
    """Would PyTorch accept this geometry (including the padding mode's limits)?"""
    if min(case["groups"], case["cg"], case["og"], case["h"], case["w"], case["kh"],
           case["kw"]) < 1 or case["n"] < 0:
        return False
    stride, dilation = geom(case, "stride"), geom(case, "dilation")
    if min(stride + dilation) < 1 or (case["padding"] == "same" and stride != (1, 1)):
        return False
    if case.get("api") == "conv_transpose2d" and (isinstance(case["padding"], str)
                                                  or case["padding_mode"] != "zeros"):
        return False
    if case.get("api") == "conv1d" and (case["h"], case["kh"]) != (1, 1):
        return False
    pads = padding_amounts(case)
    if min(pads[0] + pads[1]) < 0 or min(shapes(case)["grad_output"][2:]) < 1:
        return False
    if case["unbatched"] and case["n"] != 1:
        return False
    return all(size >= mode_min_size(case["padding_mode"], side)
               for size, side in zip((case["h"], case["w"]), pads))


def mode_min_size(mode, side) -> int:
    """Smallest image size the padding mode allows for (lo, hi) padding: PyTorch wants
    pad < size for reflect and pad <= size for circular."""
    return {"reflect": max(side) + 1, "circular": max(side)}.get(mode, 1)


def oracle_cost(case) -> float:
    """Multiply-adds of one oracle correlate2d pass over the case (zero taps included)."""
    (pt, pb), (pl, pr) = padding_amounts(case)
    (dh, dw) = geom(case, "dilation")
    dkh, dkw = dh * (case["kh"] - 1) + 1, dw * (case["kw"] - 1) + 1
    pairs = max(1, case["n"]) * case["groups"] * case["og"] * case["cg"]
    return float(pairs * (case["h"] + pt + pb) * (case["w"] + pl + pr) * dkh * dkw)


def _choice(rng, options, p=None):
    return options[int(rng.choice(len(options), p=p))]


def _draw_pad(rng, dk):
    # Mostly up to half the dilated kernel (what 'same' needs), sometimes up to all of it.
    top = dk if rng.random() < 0.25 else (dk - 1) // 2 + 1
    return int(rng.integers(0, top + 1))


def _axis(rng, k, d, s, lo, hi, form, edge, limit):
    """Size (and adjusted kernel/stride/pads) along one axis for the wanted edge."""
    dk = d * (k - 1) + 1
    if edge == "pad_gt_kernel" and form not in ("same", "valid"):
        if rng.random() < 0.5:
            lo = dk + int(rng.integers(1, 4))
        else:
            hi = dk + int(rng.integers(1, 4))
    if edge == "one_pixel":
        if form == "valid":
            k, dk = 1, 1
        elif form != "same" and lo + hi < dk - 1:
            hi = dk - 1 - lo
        return k, s, lo, hi, 1
    if edge == "exact_fit" and dk - lo - hi >= 1:
        return k, s, lo, hi, dk - lo - hi
    smallest = max(1, dk - lo - hi)
    if edge == "output_one" and lo + hi - dk + 1 < s:
        # out = 1 while H + lo + hi - dk < s.
        return k, s, lo, hi, int(rng.integers(smallest, dk - lo - hi + s))
    if edge == "stride_gt_image" and form != "same" and smallest < 5:
        h = int(rng.integers(smallest, 5))
        return k, int(rng.integers(h + 1, 6)), lo, hi, h
    # Draw the output length, then the size that gives it.
    out = 1 + int(limit * rng.random())
    return k, s, lo, hi, max(smallest, (out - 1) * s + dk - lo - hi + int(rng.integers(0, s)))


def _padding_value(form, pads, api):
    """The padding argument in `form` if the amounts allow it, else the asymmetric form
    (for conv1d: p, (p,) and (left, right))."""
    (pt, pb), (pl, pr) = pads
    if api == "conv1d":
        if form in ("int", "pair") and pl == pr:
            return (pl, "int") if form == "int" else ([pl], "pair")
        return [pl, pr], "asym"
    if form == "int" and pt == pb == pl == pr:
        return pt, "int"
    if form in ("int", "pair") and pt == pb and pl == pr:
        return [pt, pl], "pair"
    return [[pt, pb], [pl, pr]], "asym"


def _draw_geometry(rng, cfg: GenConfig, kind: str) -> dict:
    large = rng.random() < cfg.large_rate
    limit = cfg.max_size if large else min(cfg.max_size, SMALL_SIZE)
    n = int(rng.choice(5, p=(0.06, 0.44, 0.28, 0.12, 0.10)))
    r = rng.random()
    wide = 9 if large else 5
    if r < 0.45:
        groups, cg, og = 1, int(rng.integers(1, wide)), int(rng.integers(1, wide))
    elif r < 0.7:                                   # depthwise, channel multiplier 1 or 2
        groups, cg, og = int(rng.integers(1, 7)), 1, 1 + int(rng.random() < 0.3)
    elif r < 0.8:
        # Groups of half a vector of input channels (8: float32 in v4; 4: float64 in v4,
        # float32 in v3), whose lanes forward sums pairs of groups as one given enough
        # taps (the panels take them: generate).
        groups, cg, og = 2 * int(rng.integers(1, 3)), int(_choice(rng, (4, 8))), int(
            rng.integers(4, 9))
    elif r < 0.85:
        # Many channel pairs with one to three channels on one side: a segmentation head's
        # forward, an RGB stem's input gradient (BLAS by default on CPUs with AVX-512:
        # GEMM_FORWARD_MIN_PAIRS).
        few, many = int(rng.integers(1, 4)), int(rng.integers(11, 33))
        groups, cg, og = (1, many, few) if rng.random() < 0.5 else (1, few, many)
    else:
        groups, cg, og = int(rng.integers(2, 5)), int(rng.integers(1, 4)), int(
            rng.integers(1, 4))
    ks = [_choice(rng, KERNEL_SIZES, KERNEL_WEIGHTS) for _ in range(2)]
    if half_vector_groups(groups, cg):
        ks = [max(k, 3 if cg == 8 else 5) for k in ks]     # 144 terms: LANES_MIN_TERMS
    strides = [1 if rng.random() < 0.5 else int(rng.integers(2, 6)) for _ in range(2)]
    dils = [1 if rng.random() < 0.35 else int(rng.integers(2, 9)) for _ in range(2)]
    form = _choice(rng, PADDING_FORMS)
    edge = _choice(rng, EDGES, EDGE_WEIGHTS)
    mode = _choice(rng, cfg.modes, _weights(cfg.modes)) if kind == "valid" else "zeros"
    api = _choice(rng, cfg.apis, _weights(cfg.apis, APIS, API_WEIGHTS)) if (
        kind == "valid") else "conv2d"
    if api == "conv1d":                  # height 1, nothing happens along it
        ks[0] = strides[0] = dils[0] = 1
    if api == "conv_transpose2d":
        mode = "zeros"                   # PyTorch's transposed convolutions pad with zeros
    if edge == "pad_gt_kernel" and form in ("same", "valid"):
        form = "asym"
    if form == "same":
        strides = [1, 1]
    dks = [d * (k - 1) + 1 for k, d in zip(ks, dils)]
    if form == "same":
        pads = [[(dk - 1) // 2, dk - 1 - (dk - 1) // 2] for dk in dks]
    elif form == "valid":
        pads = [[0, 0], [0, 0]]
    elif form == "int":
        p = _draw_pad(rng, dks[1] if api == "conv1d" else min(dks))
        pads = [[p, p], [p, p]]
    elif form == "pair":
        pads = [[p, p] for p in (_draw_pad(rng, dk) for dk in dks)]
    else:
        pads = [[_draw_pad(rng, dk), _draw_pad(rng, dk)] for dk in dks]
    axes = (1,) if api == "conv1d" else _choice(rng, ((0,), (1,), (0, 1)))
    sizes = [0, 0]
    for a in range(2):
        ks[a], strides[a], pads[a][0], pads[a][1], sizes[a] = _axis(
            rng, ks[a], dils[a], strides[a], pads[a][0], pads[a][1], form,
            edge if a in axes else "none", limit)
    if api == "conv1d":
        sizes[0], pads[0] = 1, [0, 0]
    sizes = [max(size, mode_min_size(mode, side)) for size, side in zip(sizes, pads)]
    if api == "conv_transpose2d" and form in ("same", "valid"):
        form = "asym"                    # the same amounts, given explicitly
    if form in ("int", "pair", "asym"):
        padding, form = _padding_value(form, pads, api)
    else:
        padding = form
    if api == "conv1d":
        stride = strides[1] if rng.random() < 0.5 else [strides[1]]
        dilation = dils[1] if rng.random() < 0.5 else [dils[1]]
    else:
        stride = strides[0] if strides[0] == strides[1] and rng.random() < 0.5 else strides
        dilation = dils[0] if dils[0] == dils[1] and rng.random() < 0.5 else dils
    return {"api": api, "n": n, "groups": groups, "cg": cg, "og": og, "h": sizes[0],
            "w": sizes[1], "kh": ks[0], "kw": ks[1], "stride": stride, "dilation": dilation,
            "padding": padding, "padding_form": form, "padding_mode": mode,
            "edge": edge, "tier": "large" if large else "small"}


def half_vector_groups(groups: int, cg: int) -> bool:
    """Layers of the geometry kind drawn for the panel forward's merged groups."""
    return groups % 2 == 0 and cg in (4, 8)


def _fit(case, cap, max_size) -> bool:
    """Shrink the case until the oracle's cost is at most `cap` and the image fits in
    max_size: images toward their smallest valid size first (which keeps the drawn edge),
    then fewer images and channels. False if it cannot fit."""
    pads = padding_amounts(case)
    floor = {}
    for key, k, d, side in (("h", case["kh"], geom(case, "dilation")[0], pads[0]),
                            ("w", case["kw"], geom(case, "dilation")[1], pads[1])):
        floor[key] = max(d * (k - 1) + 1 - sum(side), mode_min_size(case["padding_mode"],
                                                                    side))
        case[key] = min(case[key], max_size)
        if case[key] < floor[key]:
            return False
    while oracle_cost(case) > cap:
        excess = {key: case[key] - floor[key] for key in floor}
        key = max(excess, key=excess.get)
        if excess[key] > 0:
            case[key] = floor[key] + excess[key] // 2
        elif case["n"] > 1:
            case["n"] -= 1
        elif max(case["og"], case["cg"]) > 1:
            key = "og" if case["og"] >= case["cg"] else "cg"
            case[key] -= 1
        elif case["groups"] > 1:
            case["groups"] -= 1
        else:
            return False
    return True


def _weights(chosen, options=PADDING_MODES, weights=MODE_WEIGHTS):
    w = np.array([weights[options.index(m)] for m in chosen])
    return w / w.sum()


def generate(seed: int, index: int, cfg: GenConfig) -> dict:
    """Case `index` of the campaign `seed`: valid (checked against the oracle) or invalid."""
    rng = np.random.default_rng(case_seed(seed, index))
    valid_ops = [op for op in cfg.ops if op != "invalid"]
    invalid = "invalid" in cfg.ops and (not valid_ops or rng.random() < cfg.invalid_rate)
    kind = "invalid" if invalid else "valid"
    for _ in range(200):
        case = _draw_geometry(rng, cfg, kind)
        cap = cfg.large_cost if case["tier"] == "large" else cfg.small_cost
        fits = _fit(case, cap, cfg.max_size)
        case["unbatched"] = bool(case["n"] == 1 and rng.random() < 0.25)
        if fits and is_valid(case):
            break
    else:                                        # practically unreachable; stay valid
        case.update(n=1, groups=1, cg=1, og=1, h=1, w=1, kh=1, kw=1, stride=1, dilation=1,
                    padding=0, padding_form="int", padding_mode="zeros", unbatched=False)
    isa, cross_tier, depthwise = _draw_extra(seed, index, cfg)
    case.update(
        id=int(index), seed=int(seed), kind=kind, isa=isa,
        dtype=_choice(rng, tuple(cfg.dtypes)),
        bias=bool(rng.random() < 0.6),
        path=_choice(rng, DRAWN_PATHS),
        threads=int(_choice(rng, THREADS)),
        values=_choice(rng, VALUE_KINDS),
        array_seed=int(rng.integers(0, 2 ** 32)),
        layouts={name: ("c" if rng.random() < 0.5 else _choice(rng, LAYOUTS))
                 for name in ("input", "weight", "bias", "grad_output")},
        out=None if case["api"] == "conv_transpose2d" else _choice(
            rng, (None, "c", "strided"), (0.7, 0.15, 0.15)),
        tile_pixels=None if rng.random() < 0.6 else _choice(rng, TILE_PIXELS),
        min_macs_per_thread=None if rng.random() < 0.2 else 1,
        kw_group_below_channels=None if rng.random() < 0.7 else 1,
        panel_in_place_bytes=None if rng.random() < 0.5 else _choice(rng, (0, 1 << 30)),
        zero_fill_max=None if rng.random() < 0.5 else _choice(rng, (-1.0, 1e9)),
        panel_group_bytes=None if rng.random() < 0.5 else _choice(rng, (1, 1 << 30)),
        panel_chunk_bytes=None if rng.random() < 0.5 else _choice(rng, (1, 1 << 30)),
        panel_lanes=None if rng.random() < 0.5 else bool(rng.random() < 0.5),
        panel_lanes_chunk_bytes=None if rng.random() < 0.5 else _choice(rng, (1, 1 << 30)),
        panel_grad_weight_c_group=None if rng.random() < 0.5 else _choice(rng, (1, 2, 4)),
        panel_grad_weight_packed=None if rng.random() < 0.5 else bool(rng.random() < 0.5),
    )
    if depthwise and case["cg"] == 1:
        case["path"] = "depthwise"
    if half_vector_groups(case["groups"], case["cg"]):
        case["path"] = "panel"
    if invalid:
        case["ops"] = ["invalid"]
        name = _choice(rng, tuple(INVALID))
        case["invalid"] = name
        case["call"] = INVALID[name].call or _choice(rng, ("conv2d", "conv2d_backward"))
        if INVALID[name].nonempty:
            case["n"] = max(1, case["n"])
        return case
    grads = [op for op in GRADS if op in valid_ops]
    if grads and rng.random() < 0.25:            # ask for a subset of the gradients
        chosen = [op for op in grads if rng.random() < 0.5] or [grads[0]]
    else:
        chosen = grads
    case["needs"] = [GRADS[op] for op in chosen]
    if not chosen and "adjoint" in valid_ops:       # the identities need two gradients
        case["needs"] = ["input", "weight"]
    case["ops"] = [op for op in valid_ops if (op not in GRADS or op in chosen)
                   and (op != "tiers" or cross_tier)]
    return case


def _draw_extra(seed, index, cfg: GenConfig) -> tuple:
    """(tier, whether to cross-check the other tiers, whether a layer with one input channel
    per group takes the depthwise family) of case `index`: from a stream of its own, so the
    rest of the case is the same on every CPU. The depthwise gradients apply only to some
    of those layers (unit strides, multiplier 1 for the input gradient): a path drawn among
    all families alone reached the depthwise input gradient in about one case in 100."""
    rng = np.random.default_rng([case_seed(seed, index), 1])
    cross = bool(rng.random() < cfg.cross_tier_rate and len(ISAS) > 1)
    depthwise = bool(rng.random() < 0.25)
    return _choice(rng, tuple(cfg.isas)), cross, depthwise    # the tier last: CPUs differ


# --- arrays -------------------------------------------------------------------------------

def _values(rng, kind, shape):
    if kind == "uniform":
        return rng.uniform(-1, 1, shape)
    if kind == "int":
        return rng.integers(-3, 4, shape).astype(np.float64)
    if kind == "scaled":
        return rng.standard_normal(shape) * 2.0 ** int(rng.integers(-12, 13))
    if kind == "sparse":
        return rng.standard_normal(shape) * (rng.random(shape) < 0.3)
    return rng.standard_normal(shape)


def build_arrays(case) -> dict:
    """The case's arrays, batched, C-contiguous, in its dtype (finite values only). Each
    array has its own random stream, so shrinking one shape leaves the others' values."""
    dtype = np.dtype(case["dtype"])
    arrays = {name: _values(np.random.default_rng([case["array_seed"], i]), case["values"],
                            shape).astype(dtype)
              for i, (name, shape) in enumerate(shapes(case).items())}
    if not case["bias"]:
        arrays["bias"] = None
    return arrays


def present(arr, layout):
    """The same values in another memory layout (the API must accept every one)."""
    if arr is None or layout == "c":
        return arr
    if layout == "fortran":
        return np.asfortranarray(arr)
    if layout == "strided":
        big = np.zeros(arr.shape[:-1] + (2 * arr.shape[-1],), arr.dtype)
        big[..., ::2] = arr
        return big[..., ::2]
    if layout == "negstride":
        return np.ascontiguousarray(arr[..., ::-1])[..., ::-1]
    if layout == "planes":     # contiguous planes, apart and in reverse (a bias: as it is)
        if arr.ndim < 3:
            return arr
        big = np.zeros(arr.shape[:-3] + (2 * arr.shape[-3],) + arr.shape[-2:], arr.dtype)
        big[..., ::-2, :, :] = arr
        return big[..., ::-2, :, :]
    if layout == "readonly":
        ro = arr.copy()
        ro.flags.writeable = False
        return ro
    if layout == "bigendian":
        return arr.astype(arr.dtype.newbyteorder(">"))
    raise ValueError(f"unknown layout {layout!r}")


def call_kwargs(case) -> dict:
    """Geometry keyword arguments exactly as the case passes them to its API."""
    def as_arg(v):
        return tuple(as_arg(x) for x in v) if isinstance(v, list) else v
    kwargs = {"stride": as_arg(case["stride"]), "padding": as_arg(case["padding"]),
              "dilation": as_arg(case["dilation"]), "groups": case["groups"]}
    if case.get("api") == "conv_transpose2d":
        op = output_padding(case)
        kwargs["output_padding"] = op[0] if op[0] == op[1] else op
    else:
        kwargs["padding_mode"] = case["padding_mode"]
    return kwargs


def call_arrays(case, arrays) -> dict:
    """input, weight, bias, grad_output as given to the API (roles, layouts, unbatched)."""
    lay = case["layouts"]
    role = roles(case, arrays)

    def given(name, batched=True):
        a = role[name]
        if a is None:
            return None
        if case.get("api") == "conv1d" and a.ndim == 4:
            a = a[:, :, 0, :]
        if batched and case["unbatched"]:
            a = a[0]
        return present(a, lay[name])
    return {"input": given("input"), "weight": given("weight", False),
            "bias": given("bias", False), "grad_output": given("grad_output")}


# --- invalid calls ------------------------------------------------------------------------

@dataclass(frozen=True)
class Invalid:
    """A way to break a valid call. `apply(call, case)` edits the call dict in place;
    the error must name `word`. `call` fixes the function (None: either)."""

    apply: object
    word: str
    call: str = None
    nonempty: bool = False      # only invalid when the arrays have elements


def _set(**changes):
    def apply(call, case):
        call["kwargs"].update(changes)
    return apply


def _array(name, fn):
    def apply(call, case):
        call[name] = fn(call[name], case)
    return apply


def _other_float(a):
    return a.astype(np.float64 if a.dtype.itemsize == 4 else np.float32)


def _kernel_too_big(call, case):
    call["kwargs"].update(padding="valid")
    if case["kh"] > 1:
        call["kwargs"]["dilation"] = (case["h"] + 1, 1)
    else:
        w = call["weight"]
        call["weight"] = np.zeros(w.shape[:2] + (case["h"] + 1, w.shape[3]), w.dtype)


def _out_overlapping(call, case):
    x = call["input"]
    y_shape = shapes(case)["grad_output"][int(case["unbatched"]):]
    buf = np.zeros(max(x.size, int(np.prod(y_shape))) + 1, np.dtype(case["dtype"]))
    buf[:x.size] = np.asarray(x, dtype=buf.dtype).ravel()
    call["input"] = buf[:x.size].reshape(x.shape)
    call["out"] = buf[:int(np.prod(y_shape))].reshape(y_shape)


def _out_like(fn):
    def apply(call, case):
        y_shape = shapes(case)["grad_output"][int(case["unbatched"]):]
        call["out"] = fn(np.zeros(y_shape, np.dtype(case["dtype"])))
    return apply


def _readonly(a):
    a.flags.writeable = False
    return a


INVALID = {
    "groups_not_dividing": Invalid(lambda call, case: call["kwargs"].update(
        groups=case["groups"] * case["cg"] + 1), "groups"),
    "groups_zero": Invalid(_set(groups=0), "groups"),
    "groups_float": Invalid(lambda call, case: call["kwargs"].update(
        groups=float(case["groups"])), "groups"),
    "groups_bool": Invalid(_set(groups=True), "groups"),
    "stride_zero": Invalid(_set(stride=(1, 0)), "stride"),
    "stride_negative": Invalid(_set(stride=-1), "stride"),
    "stride_float": Invalid(_set(stride=1.5), "stride"),
    "stride_len3": Invalid(_set(stride=(1, 1, 1)), "stride"),
    "dilation_zero": Invalid(_set(dilation=0), "dilation"),
    "dilation_float": Invalid(_set(dilation=(1, 2.0)), "dilation"),
    "padding_negative": Invalid(_set(padding=((0, -1), (0, 0))), "padding"),
    "padding_bad_string": Invalid(_set(padding="full"), "padding"),
    "padding_float": Invalid(_set(padding=1.0), "padding"),
    "padding_same_strided": Invalid(_set(padding="same", stride=(1, 2)), "stride"),
    "padding_len3": Invalid(_set(padding=(1, 1, 1)), "padding"),
    "padding_mode_unknown": Invalid(_set(padding_mode="mirror"), "padding_mode"),
    "padding_mode_type": Invalid(_set(padding_mode=0), "padding_mode"),
    "reflect_pad_too_big": Invalid(lambda call, case: call["kwargs"].update(
        padding_mode="reflect", padding=((0, 0), (case["w"], case["w"]))), "padding"),
    "circular_pad_too_big": Invalid(lambda call, case: call["kwargs"].update(
        padding_mode="circular", padding=((case["h"] + 1, 0), (0, 0))), "padding"),
    "kernel_too_big": Invalid(_kernel_too_big, "kernel"),
    "weight_channels": Invalid(_array("weight", lambda w, case: np.zeros(
        (w.shape[0], w.shape[1] + 1) + w.shape[2:], w.dtype)), "weight"),
    "weight_rank3": Invalid(_array("weight", lambda w, case: w[0]), "weight"),
    "weight_no_out_channels": Invalid(_array("weight", lambda w, case: w[:0]), "weight",
                                      "conv2d_backward"),
    "weight_longdouble": Invalid(_array("weight", lambda w, case: w.astype(np.longdouble)),
                                 "weight"),
    "weight_other_float": Invalid(_array("weight", lambda w, case: _other_float(w)),
                                  "weight"),
    "input_rank2": Invalid(_array("input", lambda x, case: x.reshape(-1, x.shape[-1])),
                           "input"),
    "input_rank5": Invalid(_array("input", lambda x, case: x[None, None]
                                  if x.ndim == 3 else x[None]), "input"),
    "input_no_channels": Invalid(_array("input", lambda x, case: x[..., :0, :, :]), "input"),
    "input_no_height": Invalid(_array("input", lambda x, case: x[..., :0, :]), "input"),
    "input_complex": Invalid(_array("input", lambda x, case: x.astype(np.complex128)),
                             "input"),
    "input_object": Invalid(_array("input", lambda x, case: x.astype(object)), "input"),
    "input_strings": Invalid(_array("input", lambda x, case: np.full(x.shape, "a")), "input"),
    "input_none": Invalid(_array("input", lambda x, case: None), "input"),
    "input_ragged": Invalid(_array("input", lambda x, case: [[1.0, 2.0], [3.0]]), "input"),
    "bias_wrong_length": Invalid(_array("bias", lambda b, case: np.zeros(
        case["groups"] * case["og"] + 1, np.dtype(case["dtype"]))), "bias", "conv2d"),
    "bias_2d": Invalid(_array("bias", lambda b, case: np.zeros(
        (case["groups"] * case["og"], 1), np.dtype(case["dtype"]))), "bias", "conv2d"),
    "bias_other_float": Invalid(_array("bias", lambda b, case: np.zeros(
        case["groups"] * case["og"], _other_float(np.zeros(1, case["dtype"])).dtype)),
        "bias", "conv2d"),
    "out_wrong_shape": Invalid(_out_like(lambda y: np.zeros(y.shape[:-1] + (y.shape[-1] + 1,),
                                                            y.dtype)), "out", "conv2d"),
    "out_wrong_dtype": Invalid(_out_like(_other_float), "out", "conv2d"),
    "out_readonly": Invalid(_out_like(_readonly), "out", "conv2d"),
    "out_list": Invalid(_out_like(lambda y: y.tolist()), "out", "conv2d"),
    "out_overlaps_input": Invalid(_out_overlapping, "out", "conv2d", nonempty=True),
    "grad_output_shape": Invalid(_array("grad_output", lambda g, case: np.zeros(
        g.shape[:-1] + (g.shape[-1] + 1,), g.dtype)), "grad_output", "conv2d_backward"),
    "grad_output_other_float": Invalid(_array("grad_output", lambda g, case: _other_float(g)),
                                       "grad_output", "conv2d_backward"),
    "needs_unknown": Invalid(_set(needs=("input", "bias_grad")), "needs", "conv2d_backward"),
    "needs_type": Invalid(_set(needs=3), "needs", "conv2d_backward"),
}


def invalid_call(case) -> dict:
    """The broken call of an invalid case: function name, arrays, kwargs (and out)."""
    arrays = build_arrays(case)
    call = call_arrays(case, arrays)
    call = {"fn": case["call"], **call, "kwargs": call_kwargs(case), "out": None}
    INVALID[case["invalid"]].apply(call, case)
    return call


def replace(case, **changes) -> dict:
    """A deep copy of `case` with some fields changed."""
    new = copy.deepcopy(case)
    new.update(changes)
    return new
