"""Run one case against an implementation and report every disagreement.

An implementation is anything with dilconv's `conv2d` and `conv2d_backward` (the real module
or a self-test mutant, see `impls`). A valid case runs on the case's kernel path, thread
count and CPU tier; its results are compared element by element with the oracle, checked
against the adjoint identities, re-run with the other thread count, which must give the same
bits, and (op "tiers") re-run on every other tier the CPU supports: the FMA tiers must give
the same bits, the baseline results within the oracle's bound.
An invalid case must raise ValueError or TypeError naming the bad argument.
"""
from __future__ import annotations

import time
import traceback

import numpy as np

import dilconv
from dilconv import _tiers
from dilconv._tuning import tuning

from . import cases, oracle

EPS64 = float(np.finfo(np.float64).eps)


def failure(op, kind, message, **details) -> dict:
    return {"op": op, "kind": kind, "message": message, **details}


def run_case(case, impl) -> dict:
    """Outcome of `case` on `impl`: status pass / fail, the ops checked, worst ratio per op,
    failures."""
    start = time.process_time()
    try:
        # Garbage results may overflow the error ratios: inf and NaN fail the checks anyway.
        with np.errstate(all="ignore"):
            if case["kind"] == "invalid":
                result = _run_invalid(case, impl)
            else:
                result = _run_valid(case, impl)
    except Exception:            # a bug in the lab itself: loud, never a silent pass
        result = _result([failure("lab", "lab_error", traceback.format_exc(limit=6))])
    result["id"] = case["id"]
    result["cpu_s"] = time.process_time() - start
    return result


def _result(failures, checked=(), ratios=None) -> dict:
    return {"status": "fail" if failures else "pass", "failures": failures,
            "checked": list(checked), "ratios": ratios or {}}


def _grad_op(needs):
    return next(op for op, name in cases.GRADS.items() if name in needs)


def _make_out(case):
    if case["out"] is None:
        return None
    shape = cases.api_shape(case, cases.shapes(case)["grad_output"])[int(case["unbatched"]):]
    out = np.full(shape, np.nan, np.dtype(case["dtype"]))
    return out if case["out"] == "c" else cases.present(out, "strided")


# The dilconv tuning knobs (dilconv._tuning) a case may set, by case field: tile sizes far
# below the defaults (which exceed every image the lab draws), so small images cross GEMM
# tile, flat band and depthwise task boundaries; no minimum of work per thread, so "2
# threads" really splits tiny cases; and one GEMM product per tap (the many-channel
# forward) on the lab's few-channel layers; panel blocks that always, or never, read the
# image in place; panel tiles (and depthwise rows with thin borders) always, or never, cut
# at the column taps' range ends (else zeros in the padding); panels packed one at a time,
# or a whole tile at once; their taps summed one at a time, or all at once; the panel
# forward with output channels in vector lanes, or in panels; and the CPU tier whose
# kernels run. A knob dilconv no longer has is an error (the tuning rejects unknown names).
KNOBS = {"path": ("path",),
         "isa": ("tier",),
         "tile_pixels": ("min_tile_pixels", "max_tile_pixels", "flat_span_elements",
                         "depthwise_task_pixels"),
         "min_macs_per_thread": ("min_macs_per_thread",),
         "kw_group_below_channels": ("kw_group_below_channels",),
         "panel_in_place_bytes": ("panel_in_place_bytes", "panel_in_place_max_blocks"),
         "zero_fill_max": ("zero_fill_max",),
         "panel_group_bytes": ("panel_group_bytes",),
         "panel_chunk_bytes": ("panel_chunk_bytes",),
         "panel_lanes": ("panel_lanes",),
         "panel_lanes_chunk_bytes": ("panel_lanes_chunk_bytes",),
         "panel_grad_weight_c_group": ("panel_grad_weight_c_group",),
         "panel_grad_weight_packed": ("panel_grad_weight_packed",)}


def available_knobs() -> list:
    """The tuning knobs the lab sets (every one exists: see KNOBS)."""
    return [name for names in KNOBS.values() for name in names]


def case_tuning(case):
    """A tuning context with the case's knobs (fields left at None keep the defaults)."""
    knobs = {name: case[key] for key, names in KNOBS.items()
             if case.get(key) is not None for name in names}
    return tuning(**knobs)


API_BACKWARD = {"conv2d": "conv2d_backward", "conv1d": "conv1d_backward",
                "conv_transpose2d": "conv_transpose2d_backward"}


def _call(case, impl, arrays, threads, got) -> dict:
    """Run the case's function and its backward as the case says, filling `got` (its
    "stage" says which call was running if one raises)."""
    call = cases.call_arrays(case, arrays)
    kwargs = cases.call_kwargs(case)
    api = case.get("api", "conv2d")
    out = got["out"] = _make_out(case)
    extra = {} if api == "conv_transpose2d" else {"out": out}
    dilconv.set_num_threads(threads)
    got["stage"] = "forward"
    try:
        with case_tuning(case):
            got["forward"] = getattr(impl, api)(call["input"], call["weight"], call["bias"],
                                                **kwargs, **extra)
            got["stage"] = "backward"
            if case["needs"]:
                got["grads"] = getattr(impl, API_BACKWARD[api])(
                    call["grad_output"], call["input"], call["weight"], **kwargs,
                    needs=tuple(case["needs"]))
    finally:
        dilconv.set_num_threads(None)
    return got


def _check_shapes(case, got) -> tuple:
    """Shape, dtype and `out` identity checks; returns (results batched and in the 4-D
    conv2d space of the oracle, failures)."""
    shapes = cases.roles(case, cases.shapes(case))
    dtype = np.dtype(case["dtype"])
    lead = 1 if case["unbatched"] else 0
    results, failures = {}, []
    items = [("forward", got["forward"], shapes["grad_output"])]
    grads = got.get("grads")
    for op, name in cases.GRADS.items():
        if name in case["needs"]:
            items.append((op, getattr(grads, name, None), shapes[name]))
    for op, value, shape in items:
        batched = op in ("forward", "grad_input")
        want = cases.api_shape(case, shape)[lead if batched else 0:]
        if not isinstance(value, np.ndarray) or value.shape != want or value.dtype != dtype:
            desc = (f"{type(value).__name__} {getattr(value, 'shape', '')} "
                    f"{getattr(value, 'dtype', '')}")
            failures.append(failure(op, "shape", f"expected {dtype} array of shape {want}, "
                                                  f"got {desc}"))
            continue
        results[op] = np.ascontiguousarray(value).reshape(shape)
    if got["out"] is not None and got["forward"] is not got["out"]:
        failures.append(failure("forward", "shape", "conv2d(out=...) did not return `out`"))
    for op, name in cases.GRADS.items():
        if name not in case["needs"] and getattr(grads, name, None) is not None:
            failures.append(failure(op, "shape", f"gradient {name!r} not in needs but "
                                                 f"returned"))
    return results, failures


def _run_valid(case, impl) -> dict:
    arrays = cases.build_arrays(case)
    got = {}
    try:
        _call(case, impl, arrays, case["threads"], got)
    except Exception as exc:
        op = "forward" if got["stage"] == "forward" else _grad_op(case["needs"])
        return _result([failure(op, "raised", f"valid case raised {type(exc).__name__}: "
                                              f"{exc}")])
    results, failures = _check_shapes(case, got)
    reruns = ("determinism", "tiers")
    ops = [op for op in case["ops"] if op in results or op in ("adjoint",) + reruns]
    expected = oracle.expected(case, arrays, ops)
    ratios, details = {}, {}
    for op in ("forward",) + tuple(cases.GRADS):
        if op in ops and op in results:
            info = details[op] = oracle.compare(results[op], expected[op], case["dtype"])
            ratios[op] = info["ratio"]
            if not info["ratio"] <= 1.0:
                failures.append(failure(op, "mismatch", f"{op} off by {info['ratio']:.3g} x "
                                        f"bound", **info))
    adjoint = _adjoint(cases.roles(case, arrays), results, expected, case["dtype"],
                       failures) if "adjoint" in ops else None
    if adjoint is not None:
        ratios["adjoint"] = adjoint
    if "determinism" in ops:
        _determinism(case, impl, arrays, results, failures)
    if "tiers" in ops:
        worst = _cross_tiers(case, impl, arrays, results, expected, failures)
        if worst is not None:
            ratios["tiers"] = worst
    checked = [op for op in ops if op in ratios or op in reruns]
    result = _result(failures, checked, ratios)
    result["details"] = details
    return result


def _dot(a, b) -> float:
    return float(np.dot(a.astype(np.float64).ravel(), b.astype(np.float64).ravel()))


def _adjoint(arrays, results, expected, dtype, failures):
    """<conv(x), g> = <x, dL/dx> + <b, dL/db> = <w, dL/dw> + <b, dL/db>, with kernel results.
    Returns the worst ratio to the slack, or None if no gradient was there to check.

    Slack: each side's per-element bounds weighted by the other factor, plus float64
    rounding of the dot products; exact arithmetic would give equality.
    """
    grads = [name for name in ("input", "weight") if "grad_" + name in results]
    if "forward" not in results or not grads:
        return None
    gy, b = arrays["grad_output"].astype(np.float64), arrays["bias"]
    y = results["forward"]
    lhs = _dot(y, gy)
    sizes = y.size + sum(a.size for a in arrays.values() if a is not None)
    base_slack = _dot(np.abs(gy), expected["forward"].bound(dtype)) + EPS64 * sizes * _dot(
        np.abs(y), np.abs(gy))
    bias_term = bias_slack = 0.0
    if b is not None:
        gb = gy.sum(axis=(0, 2, 3))
        bias_term = _dot(b, gb)
        bias_slack = EPS64 * sizes * _dot(np.abs(b), np.abs(gy).sum(axis=(0, 2, 3)))
    worst = 0.0
    for name in grads:
        op = "grad_" + name
        a, g = arrays[name].astype(np.float64), results[op]
        rhs = _dot(a, g) + bias_term
        slack = (base_slack + bias_slack + _dot(np.abs(a), expected[op].bound(dtype))
                 + EPS64 * sizes * _dot(np.abs(a), np.abs(g)) + np.finfo(np.float64).tiny)
        ratio = abs(lhs - rhs) / slack
        ratio = float("inf") if np.isnan(ratio) else float(ratio)
        worst = max(worst, ratio)
        if not ratio <= 1.0:
            failures.append(failure("adjoint", "mismatch", f"<conv(x), g> = {lhs!r} but "
                                    f"<{name}, grad_{name}> (+ bias term) = {rhs!r}: off by "
                                    f"{ratio:.3g} x slack {slack:.3g}", ratio=ratio))
    return worst


def _rerun(case, impl, arrays, threads, failures, check, what):
    """The case's results run again (`what`: with another thread count, on another tier),
    or None, with a failure of `check`, if that raised."""
    try:
        return _check_shapes(case, _call(case, impl, arrays, threads, {}))[0]
    except Exception as exc:
        failures.append(failure(check, "raised", f"{what}: {type(exc).__name__}: {exc}"))
        return None


def _same_bits(results, again, failures, check, kind, what, reference) -> None:
    """Every result of `again` must have the bits of `results`."""
    for op, value in results.items():
        if op not in again or again[op].tobytes() != value.tobytes():
            diff = int(np.sum(again[op] != value)) if op in again else -1
            failures.append(failure(check, kind, f"{op} {what} differs from {reference} in "
                                                 f"{diff} elements"))


def _determinism(case, impl, arrays, results, failures) -> None:
    """The other thread count must give bitwise the same results."""
    other = 3 - case["threads"]
    again = _rerun(case, impl, arrays, other, failures, "determinism",
                   f"with {other} threads")
    if again is not None:
        _same_bits(results, again, failures, "determinism", "nondeterministic",
                   f"with {other} threads", f"{case['threads']} thread(s)")


def _cross_tiers(case, impl, arrays, results, expected, failures):
    """The case on every other tier the CPU supports: an FMA tier must give the bits of the
    first FMA tier that ran (the case's own tier if it is one), any other tier results
    within the oracle's bound. Returns the worst ratio to the bound (None: none compared)."""
    own = case.get("isa") or _tiers.DEFAULT
    reference = (own, results) if own in cases.FMA_ISAS else None
    worst = None
    for tier in cases.ISAS:
        if tier == own:
            continue
        what = f"on {tier}"
        again = _rerun(cases.replace(case, isa=tier), impl, arrays, case["threads"],
                       failures, "tiers", what)
        if again is None:
            continue
        if tier in cases.FMA_ISAS and reference is not None:
            _same_bits(reference[1], again, failures, "tiers", "bits", what, reference[0])
            continue
        for op in (op for op in again if op in expected):
            info = oracle.compare(again[op], expected[op], case["dtype"])
            worst = max(info["ratio"], -1.0 if worst is None else worst)
            if not info["ratio"] <= 1.0:
                failures.append(failure("tiers", "mismatch", f"{op} {what} off by "
                                        f"{info['ratio']:.3g} x bound", **info))
        if tier in cases.FMA_ISAS:
            reference = (tier, again)
    return worst


def _run_invalid(case, impl) -> dict:
    call = cases.invalid_call(case)
    expect = cases.INVALID[case["invalid"]]
    kwargs = call["kwargs"]
    dilconv.set_num_threads(case["threads"])
    try:
        with tuning(path=case["path"], tier=case.get("isa")):
            if call["fn"] == "conv2d":
                impl.conv2d(call["input"], call["weight"], call["bias"], **kwargs,
                            out=call["out"])
            else:
                impl.conv2d_backward(call["grad_output"], call["input"], call["weight"],
                                     **kwargs)
    except (ValueError, TypeError) as exc:
        if expect.word not in str(exc):
            return _result([failure("invalid", "message", f"{case['invalid']}: "
                                    f"{type(exc).__name__} does not name {expect.word!r}: "
                                    f"{exc}")], ["invalid"])
        return _result([], ["invalid"])
    except Exception as exc:
        return _result([failure("invalid", "wrong_exception", f"{case['invalid']}: expected "
                                f"ValueError/TypeError, got {type(exc).__name__}: {exc}")],
                       ["invalid"])
    finally:
        dilconv.set_num_threads(None)
    return _result([failure("invalid", "returned", f"{case['invalid']}: {call['fn']} returned "
                            f"instead of raising")], ["invalid"])
