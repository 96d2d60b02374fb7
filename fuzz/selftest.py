"""Self-test: the campaign must catch every mutant, and pass the real dilconv.

Every mutant runs the same seeded case stream (stopping at its first failure); a mutant
survives if `budget` cases pass. The real library runs as a control first: a lab that flags
correct code would make the kills meaningless. A mutant whose bug this CPU cannot show (a
tier it does not run) is listed as not applicable.
"""
from __future__ import annotations

import sys
import time

from . import campaign, impls
from .mutants import MUTANTS


def run(pool, seed=0, budget=300, control_cases=200, names=None, stream=None) -> int:
    """Print the mutant / killed table; 0 if every mutant was killed and the control
    passed."""
    stream = stream or sys.stdout
    start = time.monotonic()
    control = campaign.run(campaign.Plan(seed=seed, n_cases=control_cases, impl=impls.REAL,
                                         max_shrinks=0), pool)
    control_ok = control["disagreements"] == 0
    rows = []
    for name in names or MUTANTS:
        mutant = MUTANTS[name]
        if mutant.unavailable:
            rows.append((name, "n/a", "0", f"skipped: {mutant.unavailable}",
                         mutant.description))
            continue
        plan = campaign.Plan(seed=seed, n_cases=budget, impl=name, stop_on_failure=True,
                             max_shrinks=0)
        rep = campaign.run(plan, pool)
        hits = [f for f in rep["failures"]
                if mutant.expect_kind is None or f["kind"] == mutant.expect_kind]
        if hits:
            f = hits[0]
            how = f"case {f['case_id']}: {f['op']} {f['kind']}"
            rows.append((name, "yes", str(rep["cases_run"]), how, mutant.description))
        else:
            rows.append((name, "NO", str(rep["cases_run"]), "survived", mutant.description))
    width = max(len(r[0]) for r in rows)
    print(f"{'mutant':<{width}}  killed  cases  first failure / bug", file=stream)
    for name, killed, n, how, desc in rows:
        print(f"{name:<{width}}  {killed:<6}  {n:>5}  {how}  [{desc}]", file=stream)
    killed = sum(r[1] == "yes" for r in rows)
    tried = sum(r[1] != "n/a" for r in rows)
    print(f"control: real dilconv, {control['cases_run']} cases, "
          f"{control['disagreements']} disagreements ({'ok' if control_ok else 'FAILED'})",
          file=stream)
    skipped = f" ({len(rows) - tried} not applicable on this CPU)" if tried < len(rows) else ""
    print(f"killed {killed}/{tried} mutants{skipped} in {time.monotonic() - start:.1f} s, "
          f"seed {seed}, budget {budget} cases/mutant", file=stream)
    if not control_ok:
        for f in control["failures"][:5]:
            print(f"  control case {f['case_id']} {f['op']} {f['kind']}: {f['message'][:200]}",
                  file=stream)
    return 0 if control_ok and killed == tried else 1

