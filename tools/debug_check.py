"""Checks that the kernels of a DILCONV_DEBUG=1 build test their indices: an index out of
range raises IndexError (or, inside a kernel's nogil inner function, is reported as one
and the function returns) instead of reading or writing past an array.

Run by tools/debug_build.sh in its debug-built copy; exits non-zero when a check fails.
"""
import sys

import numpy as np

import dilconv
from dilconv import _tiers
from dilconv._validate import make_spec


def main() -> int:
    failures = []
    for tier in _tiers.SUPPORTED:
        k = _tiers.kernels(tier)
        # pack_weights indexes the weight with the packed array's sizes: a packed array
        # with one input channel too many reads w[..., ci=2, ...] of a 2-channel weight.
        w = np.ones((4, 2, 3, 3), np.float32)
        blocks = -(-4 // k._panel.MR)
        wp = np.empty((1, blocks, 9, 3, k._panel.MR), np.float32)
        bp = np.empty((1, blocks, k._panel.MR), np.float32)
        try:
            k._panel.pack_weights(w, np.zeros(0, np.float32), wp, bp)
            failures.append(f"{tier}: pack_weights read past the weight without an error")
        except IndexError as e:
            print(f"{tier}: pack_weights past the weight: IndexError({e})")

        # The direct forward given an output with one image too few: its inner function
        # (noexcept nogil) reports the IndexError and returns before writing.
        x = np.ones((2, 1, 5, 5), np.float32)
        w = np.ones((1, 1, 3, 3), np.float32)
        out = np.zeros((1, 1, 3, 3), np.float32)
        spec = make_spec(x.shape, w.shape, 1, 0, 1, 1)
        reported = []
        previous, sys.unraisablehook = sys.unraisablehook, reported.append
        try:
            k._forward.forward(x, w, np.zeros(0, np.float32), out, spec, 1)
        finally:
            sys.unraisablehook = previous
        kinds = {type(r.exc_value).__name__ for r in reported}
        if kinds != {"IndexError"}:
            failures.append(f"{tier}: the direct forward past its output reported {kinds or 'nothing'}")
        else:
            print(f"{tier}: direct forward past its output: IndexError reported "
                  f"{len(reported)} time(s)")
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
