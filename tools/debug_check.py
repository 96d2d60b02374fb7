"""Checks that the kernels of a DILCONV_DEBUG=1 build test their indices: an index out of
range in a kernel's inner function (noexcept nogil, so it cannot raise to its caller) is
reported as an IndexError (sys.unraisablehook; pytest's unraisable-exception warning,
which tools/debug_build.sh makes an error) and the function returns instead of reading or
writing past an array.

Run by tools/debug_build.sh in its debug-built copy; exits non-zero when a check fails.
"""
import sys

import numpy as np

import dilconv
from dilconv import _tiers, _tuning
from dilconv._validate import make_spec


def _reported(call) -> set:
    """Exception types reported from kernels while `call()` ran."""
    reported = []
    previous, sys.unraisablehook = sys.unraisablehook, reported.append
    try:
        call()
    finally:
        sys.unraisablehook = previous
    return {type(r.exc_value).__name__ for r in reported}


def main() -> int:
    failures = []
    knobs = _tuning.current()
    for tier in _tiers.SUPPORTED:
        k = _tiers.kernels(tier)
        # The direct forward given an output with one image too few.
        x = np.ones((2, 1, 5, 5), np.float32)
        w = np.ones((1, 1, 3, 3), np.float32)
        out = np.zeros((1, 1, 3, 3), np.float32)
        spec = make_spec(x.shape, w.shape, 1, 0, 1, 1)
        checks = {"direct forward past its output": lambda: k._forward.forward(
            x, w, np.zeros(0, np.float32), out, spec, knobs)}
        # The panel forward packing a bias of one value for four output channels.
        x4 = np.ones((1, 4, 6, 6), np.float32)
        w4 = np.ones((4, 4, 3, 3), np.float32)
        spec4 = make_spec(x4.shape, w4.shape, 1, 1, 1, 1)
        out4 = np.zeros(spec4.output_shape, np.float32)
        checks["panel forward past its bias"] = lambda: k._panel.forward(
            x4, w4, np.zeros(1, np.float32), out4, spec4, knobs)
        for what, call in checks.items():
            kinds = _reported(call)
            if kinds != {"IndexError"}:
                failures.append(f"{tier}: {what} reported {kinds or 'nothing'}")
            else:
                print(f"{tier}: {what}: IndexError reported")
        # A valid call still computes the right result in the debug build.
        with _tiers.use(tier):
            y = dilconv.conv2d(x, w)
        if not (y == 9).all():
            failures.append(f"{tier}: a valid conv2d gave {y.ravel()[:4]}")
    for failure in failures:
        print("FAILED:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
