"""CPU tiers: which build of the kernels runs.

setup.py builds every kernel module once per tier of the target architecture, as
dilconv._kern_<tier>.<module> (flags in _tier_table.py). The tier is chosen once, at
import, from the running CPU: the highest tier built whose features the CPU and the OS
support (dilconv._cpu.cpu_features(), which checks the OS's saved register state), or a
lower one named by DILCONV_ISA. A tier the CPU lacks is never imported: its module init
alone may hold instructions the CPU cannot run.

Code that runs kernels imports them from here (`from ._tiers import _panel`): these are
proxies that look every attribute up in the tier in use, which is the import-time choice
or, for the calling thread or task only, the tuning's `tier` knob (`use(tier)`, or
`dilconv._tuning.tuning(tier=...)`; tests run the public API on each tier that way). The
kernels compute their plans from their own constants (MR, the block size), so a plan and
the code that runs it always come from the same tier.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import types
from typing import Dict, Iterator, List, Optional, Tuple

from . import _cpu, _tuning
from ._tier_table import PACKAGE, TEST_ONLY, TIERS

KERNEL_MODULES = ("_forward", "_backward", "_gemm", "_flat", "_panel", "_depthwise")
ENV = "DILCONV_ISA"


def _is_built(tier: str) -> bool:
    try:
        return importlib.util.find_spec(f"dilconv.{PACKAGE.format(tier)}._panel") is not None
    except ImportError:
        return False


FEATURES: Dict[str, bool] = _cpu.cpu_features()
# Tiers of this build, lowest first; those the running CPU can run.
BUILT: Tuple[str, ...] = tuple(t for t in TIERS if _is_built(t))


def missing_features(tier: str) -> List[str]:
    """The CPU features `tier` needs that the running CPU (or OS) lacks."""
    return [f for f in TIERS[tier][1] if not FEATURES.get(f, False)]


SUPPORTED: Tuple[str, ...] = tuple(t for t in BUILT if not missing_features(t))


def check(tier: object, name: str = "tier") -> str:
    """`tier` if this build has it and the CPU runs it; else ValueError naming `name`."""
    if tier not in TIERS:
        raise ValueError(f"{name}={tier!r} is not a CPU tier: expected one of "
                         f"{', '.join(TIERS)} (this CPU supports {', '.join(SUPPORTED)})")
    if tier not in BUILT:
        raise ValueError(f"{name}={tier!r}: this build of dilconv has no {tier} kernels "
                         f"(built: {', '.join(BUILT)}; supported here: {', '.join(SUPPORTED)})")
    missing = missing_features(tier)
    if missing:
        raise ValueError(f"{name}={tier!r}: this CPU lacks {', '.join(missing)}, which "
                         f"{tier} needs (supported tiers: {', '.join(SUPPORTED)})")
    return tier


# The tier to run when none is asked for.
BEST: str = [t for t in SUPPORTED if t not in TEST_ONLY][-1]


def _choose() -> Tuple[str, str]:
    value = os.environ.get(ENV, "").strip()
    if not value:
        return BEST, f"the highest tier this CPU supports; {ENV} is not set"
    tier = check(value, ENV)
    return tier, f"{ENV}={value}" + ("" if tier == BEST else f"; the CPU supports {BEST}")


DEFAULT, REASON = _choose()
_loaded: Dict[str, types.SimpleNamespace] = {}


def current() -> str:
    """The tier the calling thread's kernels run on (the tuning's, else DEFAULT)."""
    return tier_of(_tuning.current())


def tier_of(tuning) -> str:
    """The tier `tuning` runs on: its own, else DEFAULT."""
    return DEFAULT if tuning.tier is None else tuning.tier


def kernels(tier: Optional[str] = None) -> types.SimpleNamespace:
    """The kernel modules of `tier` (None: the tier in use), as attributes `_panel`, ...

    >>> from dilconv import _tiers
    >>> _tiers.kernels("baseline")._panel.__name__
    'dilconv._kern_baseline._panel'
    """
    tier = current() if tier is None else tier
    found = _loaded.get(tier)
    if found is None:
        check(tier)
        package = f"dilconv.{PACKAGE.format(tier)}"
        found = types.SimpleNamespace(**{name: importlib.import_module(f"{package}.{name}")
                                         for name in KERNEL_MODULES})
        _loaded[tier] = found
    return found


def of(tuning) -> types.SimpleNamespace:
    """The kernel modules of `tuning`'s tier (see tier_of), as `kernels` gives them."""
    return kernels(tier_of(tuning))


@contextlib.contextmanager
def use(tier: Optional[str]) -> Iterator[str]:
    """Run the enclosed calls of this thread (or asyncio task) on `tier` (None: the
    import-time choice): `dilconv._tuning.tuning(tier=...)`, so other threads keep their
    own tier.

    >>> import numpy as np, dilconv
    >>> from dilconv import _tiers
    >>> with _tiers.use("baseline"):
    ...     dilconv.conv2d(np.ones((1, 1, 3, 3)), np.ones((1, 1, 2, 2))).tolist()
    [[[[4.0, 4.0], [4.0, 4.0]]]]
    """
    with _tuning.tuning(tier=tier):
        if tier is not None:
            kernels(tier)
        yield current()


class _Kernel:
    """One kernel module of the tier in use: attributes are looked up at each access."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "_name", name)

    # Every attribute, looked up on every kernel call: __getattribute__, since the normal
    # lookup that __getattr__ follows fails with an exception first (half a microsecond).
    def __getattribute__(self, attr: str):
        return getattr(getattr(kernels(), object.__getattribute__(self, "_name")), attr)

    # Setting (tests' monkeypatch) changes the module of the tier in use: undo it on the
    # same tier.
    def __setattr__(self, attr: str, value) -> None:
        setattr(getattr(kernels(), object.__getattribute__(self, "_name")), attr, value)

    def __delattr__(self, attr: str) -> None:
        delattr(getattr(kernels(), object.__getattribute__(self, "_name")), attr)

    def __repr__(self) -> str:
        return f"<kernel module {object.__getattribute__(self, '_name')} of the tier in use>"


_forward = _Kernel("_forward")
_backward = _Kernel("_backward")
_gemm = _Kernel("_gemm")
_flat = _Kernel("_flat")
_panel = _Kernel("_panel")
_depthwise = _Kernel("_depthwise")

# Import the chosen tier now: a broken build fails at `import dilconv`, not at a first call.
kernels(DEFAULT)
