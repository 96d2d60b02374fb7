"""Command line: python -m fuzz run | replay | self-test."""
from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys

from dilconv import _tiers

from . import campaign, cases, check, impls, selftest
from .pool import WorkerPool
from .progress import Progress


def _csv(choices):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {','.join(choices)}; got {text!r}")
        return tuple(items)
    return parse


def _shard(text):
    try:
        k, m = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shard must be K/M, got {text!r}") from None
    if not 1 <= k <= m:
        raise argparse.ArgumentTypeError(f"shard K/M needs 1 <= K <= M, got {text!r}")
    return (k, m)


class UsageError(Exception):
    """A bad command line or input file: printed as one line, exit code 2."""


def _impl(name, where="--impl") -> str:
    """`name` if it is an implementation (checked before any work), else a UsageError."""
    if name not in impls.names():
        raise UsageError(f"{where}: unknown implementation {name!r}; choose {impls.REAL}, "
                         f"{impls.TORCH} or a self-test mutant (listed by python -m fuzz "
                         f"self-test --help)")
    if name == impls.TORCH and importlib.util.find_spec("torch") is None:
        raise UsageError(f"{where}: {impls.TORCH} needs PyTorch (pip install torch==2.13.0)")
    return name


def _positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return value
    return parse


def _fraction(text):
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, got {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fuzz", description=(
        "Fuzz lab: cross-check dilconv's kernels against the correlate2d oracle."))
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a random campaign")
    budget = r.add_mutually_exclusive_group()
    budget.add_argument("--cases", type=_positive(int), help="cases to run (default 500)")
    budget.add_argument("--time-budget", type=_positive(float), metavar="SECONDS",
                        help="run until this many seconds have passed")
    r.add_argument("--seed", type=int, help="campaign seed (default: random, printed)")
    r.add_argument("--jobs", type=_positive(int), default=1,
                   help="worker processes running the cases (default 1)")
    r.add_argument("--shard", type=_shard, default=(1, 1), metavar="K/M",
                   help="run only cases i with i %% M == K-1 (deterministic split)")
    r.add_argument("--dtype", type=_csv(cases.DTYPES), default=cases.DTYPES,
                   help=f"dtypes to draw, from {','.join(cases.DTYPES)} (default both)")
    r.add_argument("--ops", type=_csv(cases.OPS), default=cases.OPS,
                   help=f"checks to run, from {','.join(cases.OPS)}")
    r.add_argument("--modes", type=_csv(cases.PADDING_MODES), default=cases.PADDING_MODES,
                   help=f"padding modes to draw, from {','.join(cases.PADDING_MODES)}")
    r.add_argument("--isa", type=_csv(cases.ISAS), default=cases.ISAS,
                   help=f"CPU tiers to draw a case's tier from, among those this CPU "
                        f"supports: {','.join(cases.ISAS)} (default all)")
    r.add_argument("--cross-tiers", type=_fraction, default=cases.GenConfig.cross_tier_rate,
                   metavar="FRACTION",
                   help="fraction of the cases also run on every other supported tier "
                        "(the 'tiers' check: same bits on the FMA tiers, baseline within "
                        f"the bound; default {cases.GenConfig.cross_tier_rate:g})")
    r.add_argument("--max-size", type=_positive(int), default=48,
                   help="largest image height/width (default 48)")
    r.add_argument("--report", metavar="FILE", help="write the JSON report here")
    r.add_argument("--corpus", default="fuzz-corpus", metavar="DIR",
                   help="where shrunk repro files go (default fuzz-corpus)")
    r.add_argument("--impl", default=impls.REAL,
                   help="implementation: dilconv (default), torch, or a self-test mutant's "
                        "name to run the campaign against it")
    r.add_argument("--timeout", type=_positive(float), default=300.0,
                   help="seconds before a case counts as hung")
    r.add_argument("--max-shrinks", type=int, default=3,
                   help="distinct failures to shrink into repro files")
    r.add_argument("--no-progress", action="store_true", help="no progress bar or lines")

    rp = sub.add_parser("replay", help="re-run a repro file, print error vs bound")
    rp.add_argument("file", help="a repro file written by a campaign (fuzz-corpus/*.json)")
    rp.add_argument("--impl",
                    help="implementation (default: the one in the file; dilconv replays a "
                         "mutant's repro on the real library)")
    rp.add_argument("--in-process", action="store_true",
                    help="run here instead of in a worker process (for a debugger)")

    st = sub.add_parser("self-test", help="prove the lab catches deliberately wrong kernels")
    st.add_argument("--seed", type=int, default=0,
                    help="seed of the case stream every mutant runs (default 0)")
    st.add_argument("--budget", type=_positive(int), default=300,
                    help="cases per mutant before it counts as surviving (default 300)")
    st.add_argument("--jobs", type=_positive(int), default=2,
                    help="worker processes (default 2)")
    st.add_argument("--mutants", type=_csv(tuple(selftest.MUTANTS)), default=None,
                    metavar="NAME,...",
                    help="only these mutants (default all): "
                         f"{', '.join(selftest.MUTANTS)}")
    return p


def cmd_run(args) -> int:
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2 ** 31)
    n = args.cases if args.cases is not None or args.time_budget is not None else 500
    gen = cases.GenConfig(dtypes=args.dtype, ops=args.ops, max_size=args.max_size,
                          modes=args.modes, isas=args.isa,
                          cross_tier_rate=args.cross_tiers)
    _impl(args.impl)
    plan = campaign.Plan(seed=seed, n_cases=n, time_budget=args.time_budget, shard=args.shard,
                         gen=gen, impl=args.impl, max_shrinks=args.max_shrinks,
                         corpus=args.corpus)
    what = f"{n} cases" if n is not None else f"{args.time_budget:g} s"
    print(f"fuzz: seed {seed}, {what}, shard {args.shard[0]}/{args.shard[1]}, "
          f"{args.jobs} job(s), impl {args.impl}  (replay the run with --seed {seed})",
          file=sys.stderr, flush=True)
    total = None if n is None else len(range(args.shard[0] - 1, n, args.shard[1]))
    with WorkerPool(args.jobs, timeout=args.timeout) as pool:
        rep = campaign.run(plan, pool, Progress(total=total, enabled=not args.no_progress))
    if args.report:
        campaign.write_report(rep, args.report)
        print(f"report: {args.report}")
    print(campaign.summary(rep))
    if rep["disagreements"]:
        return 1
    return 130 if rep["interrupted"] else 0


def describe(case) -> str:
    """The case as the call it makes."""
    s = {k: cases.api_shape(case, v)
         for k, v in cases.roles(case, cases.shapes(case)).items()}
    x_shape = s["input"][1:] if case["unbatched"] else s["input"]
    kw = cases.call_kwargs(case)
    args = ", ".join(f"{k}={v!r}" for k, v in kw.items())
    lay = case["layouts"]
    lines = [f"case {case['id']} of seed {case['seed']}: {case.get('api', 'conv2d')} "
             f"({case['kind']}, {case['dtype']}, "
             f"values {case['values']}, array seed {case['array_seed']}, "
             f"path {case['path'] or 'chosen by dilconv'}, "
             f"{case['threads']} thread(s), CPU tier {case.get('isa') or _tiers.DEFAULT})",
             f"  input {x_shape} [{lay['input']}], weight {s['weight']} [{lay['weight']}], "
             f"bias {s['bias'] if case['bias'] else None} [{lay['bias']}], grad_output "
             f"{s['grad_output']} [{lay['grad_output']}], out={case['out']}",
             f"  {args}"]
    if case["kind"] == "invalid":
        lines.append(f"  broken on purpose: {case['invalid']} in {case['call']}")
    else:
        lines.append(f"  needs={tuple(case['needs'])}, ops {case['ops']}")
    return "\n".join(lines)


def _read_repro(path) -> dict:
    try:
        with open(path) as f:
            body = json.load(f)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UsageError(f"{path} is not JSON: {exc}") from None
    if not isinstance(body, dict) or body.get("format") != campaign.REPRO_FORMAT \
            or not isinstance(body.get("case"), dict):
        raise UsageError(f"{path} is not a {campaign.REPRO_FORMAT} file")
    return body


def cmd_replay(args) -> int:
    body = _read_repro(args.file)
    impl = _impl(args.impl) if args.impl else _impl(body.get("impl"), f"{args.file}: impl")
    case = body["case"]
    if case.get("isa") is not None and case["isa"] not in cases.ISAS:
        raise UsageError(f"{args.file}: the case runs on CPU tier {case['isa']!r}, which this "
                         f"CPU or build does not run (supported: {', '.join(cases.ISAS)})")
    print(f"replaying {args.file} on {impl}")
    print(describe(case))
    if args.in_process:
        result = check.run_case(case, impls.get(impl))
    else:
        with WorkerPool(1) as pool:
            result = next(iter(pool.run([(0, case, impl)])))[2]
    for op, info in result.get("details", {}).items():
        verdict = "ok" if info["ratio"] <= 1 else "FAIL"
        if info["index"] is None:
            print(f"  {op:<12} empty result  {verdict}")
            continue
        print(f"  {op:<12} max error {info['max_err']:.4g}; worst element {tuple(info['index'])}"
              f": |{info['got']!r} - {info['expected']!r}| = {info['err']:.4g} vs bound "
              f"{info['bound']:.4g} (ratio {info['ratio']:.3g})  {verdict}")
    for op, ratio in result.get("ratios", {}).items():
        if op not in result.get("details", {}):
            print(f"  {op:<12} ratio {ratio:.3g}  {'ok' if ratio <= 1 else 'FAIL'}")
    for f in result["failures"]:
        print(f"  FAILURE {f['op']} {f['kind']}: {f['message']}")
    print("still fails" if result["failures"] else "passes")
    return 1 if result["failures"] else 0


def cmd_self_test(args) -> int:
    with WorkerPool(args.jobs) as pool:
        return selftest.run(pool, seed=args.seed, budget=args.budget, names=args.mutants)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    command = {"run": cmd_run, "replay": cmd_replay, "self-test": cmd_self_test}[args.command]
    try:
        return command(args)
    except UsageError as exc:
        print(f"python -m fuzz {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
