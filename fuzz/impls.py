"""The implementation table: what a campaign runs its cases on, by name.

- "dilconv": the real library;
- "torch": PyTorch (torch==2.13.0, when installed) behind dilconv's signatures
  (`dilconv.testing.TorchReference`), which checks the lab itself (generator, oracle,
  padding modes, bounds) against PyTorch; its errors are not dilconv's, so run it without
  the "invalid" op;
- every other name is a self-test mutant (see `mutants`).
"""
from __future__ import annotations

import dilconv

REAL = "dilconv"
TORCH = "torch"


def names() -> list:
    from .mutants import MUTANTS
    return [REAL, TORCH] + list(MUTANTS)


def get(name: str):
    if name == REAL:
        return dilconv
    if name == TORCH:
        from dilconv.testing import TorchReference
        return TorchReference(threads=1)     # tiny cases; the workers are the parallelism
    from .mutants import MUTANTS
    try:
        return MUTANTS[name]
    except KeyError:
        raise ValueError(f"unknown implementation {name!r}; choose from {names()}") from None
