"""Fuzz lab: random campaigns cross-checking dilconv's kernels against the correlate2d oracle.

Run it as ``python -m fuzz run|replay|self-test`` (see ``python -m fuzz --help`` and the
README). Layout:

- `cases`: the case generator (a case is a small JSON-able dict; its arrays come from a seed),
  argument forms, memory layouts and deliberately invalid calls;
- `oracle`: expected results and per-element error bounds, for every padding mode;
- `check`: runs one case against an implementation and reports every disagreement;
- `impls`: the implementation table: the real dilconv and the self-test's mutants;
- `pool`: long-lived worker processes that survive (and report) crashing kernels;
- `campaign`: the campaign loop, progress, shrinking, the corpus and the JSON report;
- `selftest`: runs the campaign against every mutant and checks each one is caught.
"""
