"""Shrink a failing case to a small one that fails the same way.

Greedy: try simpler variants of the case (fewer images and channels, smaller image, kernel,
stride, dilation and padding, no bias, plain layouts, one thread); keep the first that still
fails with the same (op, kind); repeat until no variant fails or the run budget is spent.
Candidates run in the worker pool, so a crashing case shrinks like any other.
"""
from __future__ import annotations

import json

from . import cases


def _lower(value, floor):
    """Smaller values to try, most aggressive first."""
    return [v for v in dict.fromkeys((floor, value // 2, value - 1)) if floor <= v < value]


def _axis_variants(case, key):
    """Per-axis reductions of a stride or dilation argument (in the case's API form)."""
    pair = list(cases.geom(case, key))
    for axis in range(2):
        for v in _lower(pair[axis], 1):
            new = list(pair)
            new[axis] = v
            yield cases.pair_arg(case, key, new)


def _padding_variants(case):
    pads = [list(p) for p in cases.padding_amounts(case)]
    if case["padding"] != 0:
        yield {"padding": 0, "padding_form": "int"}
    if not any(pads[0] + pads[1]):
        return
    if case["padding_form"] != "asym":       # same amounts, a form whose sides can shrink
        yield {"padding": cases.padding_arg(case, pads), "padding_form": "asym"}
        return
    for axis in range(2):
        for side in range(2):
            for v in _lower(pads[axis][side], 0):
                new = [list(p) for p in pads]
                new[axis][side] = v
                yield {"padding": cases.padding_arg(case, new)}


def candidates(case):
    """(rank, change): simpler variants of `case`, grouped by what they simplify (not all
    valid; the caller filters)."""
    rank = 0
    for key, floor in (("n", 0), ("groups", 1), ("cg", 1), ("og", 1), ("h", 1), ("w", 1),
                       ("kh", 1), ("kw", 1)):
        for v in _lower(case[key], floor):
            yield rank, ({key: v, "unbatched": case["unbatched"] and v == 1} if key == "n"
                         else {key: v})
        rank += 1
    for group in (_axis_variants(case, "stride"), _axis_variants(case, "dilation"),
                  _padding_variants(case)):
        for change in group:
            yield rank, change
        rank += 1
    if case["kind"] == "valid" and case["padding_mode"] != "zeros":
        yield rank, {"padding_mode": "zeros"}
    for key, plain in (("bias", False), ("out", None), ("unbatched", False), ("threads", 1),
                       ("tile_pixels", None), ("min_macs_per_thread", None),
                       ("values", "int")):
        rank += 1
        if case.get(key) != plain:
            yield rank, {key: plain}
    for name, layout in case["layouts"].items():
        rank += 1
        if layout != "c":
            yield rank, {"layouts": {**case["layouts"], name: "c"}}


def fails_like(result, sig) -> bool:
    return any((f["op"], f["kind"]) == tuple(sig) for f in result["failures"])


def shrink(case, sig, impl, pool, budget=300):
    """(smallest failing case found, its result, case runs used).

    Passes over the candidates in rank order; after a success the pass goes on from the
    same rank of the new case's candidates, and passes repeat while one succeeds.
    """
    best, best_result, runs = case, None, 0
    seen = {_key(case)}
    improved = True
    while improved and runs < budget:
        improved, start_rank = False, 0
        while runs < budget:
            variants = [(rank, cases.replace(best, **change))
                        for rank, change in candidates(best) if rank >= start_rank]
            variants = [(rank, v) for rank, v in variants
                        if cases.is_valid(v) and _key(v) not in seen]
            seen.update(_key(v) for _, v in variants)
            hit = _first_failing(variants, sig, impl, pool, budget - runs)
            runs += hit[2]
            if hit[0] is None:
                break
            (start_rank, best), best_result = hit[0], hit[1]
            improved = True
    if best_result is None:
        best_result = next(iter(pool.run([(0, best, impl)])))[2]
        runs += 1
    return best, best_result, runs


def _key(case) -> str:
    return json.dumps(case, sort_keys=True)


def _first_failing(variants, sig, impl, pool, budget):
    """The first (rank, case) of `variants` failing like `sig`, its result, runs used.
    Runs `jobs` variants at a time, in order."""
    step, runs = max(1, pool.jobs), 0
    for lo in range(0, len(variants), step):
        chunk = variants[lo:lo + step][:budget - runs]
        if not chunk:
            break
        results = {key: result for key, _, result in
                   pool.run((k, v, impl) for k, (_, v) in enumerate(chunk))}
        runs += len(chunk)
        for k, item in enumerate(chunk):
            if fails_like(results[k], sig):
                return item, results[k], runs
    return None, None, runs
