"""The campaign loop: generate cases, run them in workers, count, shrink failures, report."""
from __future__ import annotations

import collections
import hashlib
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from . import cases, check, impls
from .pool import WorkerPool
from .progress import Progress
from .shrink import shrink

REPRO_FORMAT = "dilconv-fuzz-repro/1"


@dataclass
class Plan:
    """What to run: which cases (seed, count or time budget, shard) on which implementation."""

    seed: int = 0
    n_cases: int = None
    time_budget: float = None
    shard: tuple = (1, 1)            # (k, m): this run takes case i when i % m == k - 1
    gen: cases.GenConfig = field(default_factory=cases.GenConfig)
    impl: str = impls.REAL
    stop_on_failure: bool = False
    max_shrinks: int = 3             # distinct failures (op, kind) to shrink and save
    shrink_budget: int = 300         # case runs per shrink
    corpus: str = "fuzz-corpus"

    def indices(self):
        k, m = self.shard
        stream = itertools.count() if self.n_cases is None else range(self.n_cases)
        return (i for i in stream if i % m == k - 1)


class Tally:
    """Counts by category, failures (the first MAX_KEPT in full), worst ratios, CPU time."""

    MAX_KEPT = 1000

    def __init__(self):
        self.counts = collections.defaultdict(collections.Counter)
        self.failures = []
        self.n_failures = 0
        self.worst = {}
        self.cpu_s = 0.0
        self.total = 0

    def add(self, case, result):
        self.total += 1
        self.cpu_s += result.get("cpu_s", 0.0)
        c = self.counts
        c["status"][result["status"]] += 1
        c["kind"][case["kind"]] += 1
        if case["kind"] == "invalid":
            c["invalid_by_kind"][case["invalid"]] += 1
        else:
            for key in ("api", "dtype", "padding_mode", "padding_form", "path", "threads",
                        "edge", "tier", "isa", "values", "out", "unbatched"):
                c["by_" + key][str(case[key])] += 1
            c["by_path_tile_pixels"][f"{case['path']}:{case['tile_pixels']}"] += 1
            c["by_threads_min_macs"][f"{case['threads']}:{case['min_macs_per_thread']}"] += 1
            c["by_isa_path"][f"{case['isa']}:{case['path']}"] += 1
            for name, layout in case["layouts"].items():
                c["by_layout"][f"{name}:{layout}"] += 1
        for op in result["checked"]:
            c["by_op"][op] += 1
            c["by_api_op"][f"{case.get('api', 'conv2d')}/{op}"] += 1
            c["by_op_dtype_mode"][f"{op}/{case['dtype']}/{case['padding_mode']}"] += 1
        for op, ratio in result["ratios"].items():
            if ratio > self.worst.get(op, (-1.0,))[0]:
                self.worst[op] = (ratio, case["id"])
        for f in result["failures"]:
            self.n_failures += 1
            c["failures_by_op_kind"][f"{f['op']}/{f['kind']}"] += 1
            if len(self.failures) < self.MAX_KEPT:
                self.failures.append({"case_id": case["id"], "case_seed": cases.case_seed(
                    case["seed"], case["id"]), **f, "case": case})

    @property
    def n_failed_cases(self):
        return self.counts["status"]["fail"]


def environment() -> dict:
    import dilconv
    import scipy
    from dilconv import _tiers
    from dilconv._threads import get_num_threads
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(dilconv.__file__), timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"python": sys.version.split()[0], "numpy": np.__version__,
            "scipy": scipy.__version__, "dilconv": dilconv.__version__,
            "dilconv_path": os.path.dirname(dilconv.__file__), "git_commit": commit,
            "platform": platform.platform(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "omp_threads": get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "tuning_knobs": check.available_knobs(),
            "cpu_tiers": {"default": _tiers.DEFAULT, "why": _tiers.REASON,
                          "supported": list(_tiers.SUPPORTED)}}


def run(plan: Plan, pool: WorkerPool, progress: Progress = None) -> dict:
    """Run the plan; shrink the first failures into repro files; return the report."""
    tally = Tally()
    start = time.monotonic()
    deadline = None if plan.time_budget is None else start + plan.time_budget

    def tasks():
        for i in plan.indices():
            if deadline is not None and time.monotonic() >= deadline:
                return
            yield i, cases.generate(plan.seed, i, plan.gen), plan.impl

    interrupted = False
    try:
        for _, case, result in pool.run(tasks()):
            tally.add(case, result)
            if progress:
                progress.update(tally.total, tally.n_failed_cases)
            if plan.stop_on_failure and result["status"] == "fail":
                break
    except KeyboardInterrupt:           # report what ran so far
        interrupted = True
    wall = time.monotonic() - start
    if progress:
        progress.close()
    repros = [] if interrupted else shrink_failures(plan, pool, tally)
    rep = report(plan, tally, wall, pool.jobs, repros)
    rep["interrupted"] = interrupted
    return rep


def signature(failure) -> tuple:
    return (failure["op"], failure["kind"])


def shrink_failures(plan, pool, tally) -> list:
    """Shrink the first failure of each (op, kind), up to plan.max_shrinks; save repros."""
    done, repros = set(), []
    for failure in tally.failures:
        sig = signature(failure)
        if sig in done or len(done) >= plan.max_shrinks:
            continue
        done.add(sig)
        small, result, steps = shrink(failure["case"], sig, plan.impl, pool,
                                      plan.shrink_budget)
        path = save_repro(plan, failure, small, result, steps)
        failure["repro"] = path
        repros.append(path)
        print(f"shrunk case {failure['case_id']} ({sig[0]}: {sig[1]}) in {steps} runs -> "
              f"{path}", file=sys.stderr)
    return repros


def save_repro(plan, failure, small, result, steps) -> str:
    os.makedirs(plan.corpus, exist_ok=True)
    body = {"format": REPRO_FORMAT, "impl": plan.impl, "campaign_seed": plan.seed,
            "case": small, "original_case": failure["case"], "shrink_runs": steps,
            "failure": {k: v for k, v in failure.items() if k not in ("case", "repro")},
            "shrunk_failures": result["failures"], "environment": environment()}
    text = json.dumps(body, indent=1, sort_keys=True, default=_json_default)
    digest = hashlib.sha1(json.dumps(small, sort_keys=True).encode()).hexdigest()[:10]
    path = os.path.join(plan.corpus, f"{plan.impl}-{failure['op']}-{failure['kind']}-"
                                     f"{digest}.json")
    with open(path, "w") as f:
        f.write(text)
    return path


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def report(plan, tally, wall, jobs, repros) -> dict:
    cores = min(jobs, os.cpu_count() or 1)
    return {
        "impl": plan.impl,
        "seed": plan.seed,
        "cases_requested": plan.n_cases,
        "time_budget_s": plan.time_budget,
        "shard": f"{plan.shard[0]}/{plan.shard[1]}",
        "jobs": jobs,
        "config": asdict(plan.gen),
        "cases_run": tally.total,
        "cases_failed": tally.n_failed_cases,
        "disagreements": tally.n_failures,
        "counts": {k: dict(sorted(v.items())) for k, v in sorted(tally.counts.items())},
        "coverage": coverage(plan, tally),
        "worst_ratio_by_op": {op: {"ratio": r, "case_id": i}
                              for op, (r, i) in sorted(tally.worst.items())},
        "failures": tally.failures[:200],
        "failures_truncated": tally.n_failures - len(tally.failures[:200]),
        "repros": repros,
        "throughput": {"wall_s": round(wall, 3),
                       "cases_per_s": round(tally.total / wall, 1) if wall else None,
                       "cases_per_s_per_core": round(tally.total / wall / cores, 1)
                       if wall else None,
                       "worker_cpu_s": round(tally.cpu_s, 3),
                       "cases_per_cpu_s": round(tally.total / tally.cpu_s, 1)
                       if tally.cpu_s else None,
                       "cores_used": cores},
        "environment": environment(),
    }


def coverage(plan, tally) -> dict:
    """What the run exercised, per dimension the plan asked for, and what it never did."""
    c = tally.counts
    # With one tier there is nothing to cross-check.
    ops = tuple(op for op in plan.gen.ops if op != "tiers" or len(cases.ISAS) > 1)
    wanted = {"ops": (ops, c["by_op"]), "apis": (plan.gen.apis, c["by_api"]),
              "dtypes": (plan.gen.dtypes, c["by_dtype"]),
              "padding_forms": (cases.PADDING_FORMS, c["by_padding_form"]),
              "paths": (tuple(map(str, cases.DRAWN_PATHS)), c["by_path"]),
              "threads": (tuple(map(str, cases.THREADS)), c["by_threads"]),
              "isas": (plan.gen.isas, c["by_isa"])}
    result = {name: {k: counts[k] for k in keys} for name, (keys, counts) in wanted.items()}
    result["padding_modes"] = {m: c["by_padding_mode"][m] for m in plan.gen.modes}
    missing = [f"{name}:{k}" for name, counts in result.items() for k, n in counts.items()
               if not n]
    result["never_exercised"] = missing
    return result


def write_report(rep: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rep, f, indent=1, default=_json_default)
    os.replace(tmp, path)


def _counted(counts: dict) -> str:
    """{'forward': 120, 'adjoint': 80} as 'forward 120, adjoint 80' (largest first)."""
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{k} {v}" for k, v in items) or "none"


def summary(rep: dict) -> str:
    t = rep["throughput"]
    counts = rep["counts"]
    lines = [f"{'INTERRUPTED after ' if rep.get('interrupted') else ''}"
             f"{rep['cases_run']} cases ({_counted(counts.get('kind', {}))}) on "
             f"{rep['impl']}, seed {rep['seed']}, shard {rep['shard']}, {rep['jobs']} job(s)",
             f"time: {t['wall_s']} s, {t['cases_per_s']} cases/s "
             f"({t['cases_per_s_per_core']} per core, {t['cases_per_cpu_s']} per CPU-second)",
             f"checked by op: {_counted(counts.get('by_op', {}))}",
             f"by api: {_counted(counts.get('by_api', {}))}; by padding mode: "
             f"{_counted(counts.get('by_padding_mode', {}))}",
             f"by CPU tier: {_counted(counts.get('by_isa', {}))}; cross-checked on every "
             f"tier ({', '.join(cases.ISAS)}): {counts.get('by_op', {}).get('tiers', 0)} "
             f"cases"]
    if rep["coverage"]["never_exercised"]:
        lines.append(f"never exercised: {', '.join(rep['coverage']['never_exercised'])}")
    worst = ", ".join(f"{op} {v['ratio']:.3g}" for op, v in rep["worst_ratio_by_op"].items())
    lines.append(f"worst error / bound: {worst or 'none'}")
    lines.append(f"disagreements: {rep['disagreements']} in {rep['cases_failed']} case(s)")
    for f in rep["failures"][:10]:
        lines.append(f"  case {f['case_id']} {f['op']} {f['kind']}: "
                     f"{f['message'].splitlines()[0][:160]}")
    for path in rep["repros"]:
        lines.append(f"  repro: {path}   (python -m fuzz replay {path})")
    status = counts.get("status", {})
    # The closing line CI runners read: cases passed / failed.
    lines.append(f"fuzz: {status.get('pass', 0)} passed, {status.get('fail', 0)} failed")
    return "\n".join(lines)
