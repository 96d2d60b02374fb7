"""Command line: python -m bench [options]. See `python -m bench --help`."""
from __future__ import annotations

import argparse
import json
import sys

from . import layers as layers_mod
from .impls import ScipyOracle
from .peers import PEERS
from .plot import matplotlib_missing
from .report import render, text_table
from .run import Settings, run

EPILOG = """\
ratio = peer time / dilconv time (> 1: dilconv is faster). Each measurement is the median of
at least --repeat calls and at least --min-time seconds of calls, after a warm-up; the
implementations of one layer are timed round-robin in this one process on the same arrays,
and every peer's output is checked against dilconv's before it is timed.

examples:
  python -m bench                                   # the default suite, float32, 1 and 2 threads
  python -m bench --suite all --json perf.json      # float32 and float64
  python -m bench --layers aspp_r18,dw_d4 --ops backward --threads 2
  python -m bench --from-json perf.json --plot perf.png   # re-render a saved run
"""


def _csv(kind, choices=None):
    """argparse type: a comma-separated list of `kind`, each among `choices` if given."""
    def parse(text):
        items = [kind(item.strip()) for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError("give at least one value")
        if choices is not None:
            bad = [item for item in items if item not in choices]
            if bad:
                raise argparse.ArgumentTypeError(
                    f"unknown {', '.join(map(str, bad))}; choose from {', '.join(choices)}")
        return items
    return parse


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text):
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Time dilconv's conv2d forward and backward against PyTorch (oneDNN), "
                    "ONNX Runtime (MLAS), JAX (XLA), a numpy im2col+matmul peer and the "
                    "scipy oracle on real layers, with the CPU's own multiply-add peak "
                    "and copy bandwidth as yardsticks.")
    p.add_argument("--suite", default="default", choices=sorted(layers_mod.SUITES),
                   help="named set of layers, dtypes and threads (see --list); "
                        "default: %(default)s")
    p.add_argument("--layers", type=_csv(str, list(layers_mod.LAYERS)),
                   help="comma-separated layer names (overrides the suite's layers)")
    p.add_argument("--ops", type=_csv(str, layers_mod.OPS), default=list(layers_mod.OPS),
                   help="forward,backward (default both)")
    p.add_argument("--threads", type=_csv(_positive_int),
                   help="comma-separated thread counts (default: the suite's, 1,2)")
    p.add_argument("--dtype", type=_csv(str, layers_mod.DTYPES),
                   help="float32,float64 (default: the suite's)")
    p.add_argument("--repeat", type=_positive_int, default=Settings.repeat,
                   help="minimum timed calls per measurement (default %(default)s)")
    p.add_argument("--min-time", type=_non_negative, default=Settings.min_time,
                   help="minimum seconds of timed calls per measurement (default "
                        "%(default)s); fast calls are repeated more, up to "
                        f"{Settings.max_repeat} times")
    p.add_argument("--peers", type=_csv(str, list(PEERS) + ["none"]), default=list(PEERS),
                   help="peers to compare with: " + ",".join(PEERS) + " (default all; "
                        "each one not installed is skipped with a note) or none")
    p.add_argument("--scipy-limit", type=_non_negative, default=1.0,
                   help="skip the scipy oracle where one call would take longer than this "
                        "many seconds by its cost model (default %(default)s)")
    p.add_argument("--peak-size", type=_positive_int, default=Settings.peak_size,
                   help="matrix size of the numpy matmul that measures the GEMM peak "
                        "(default %(default)s)")
    p.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of the ratios (matplotlib)")
    p.add_argument("--from-json", metavar="PATH",
                   help="do not measure: print (and --plot) a report saved with --json")
    p.add_argument("--list", action="store_true", help="list suites, layers and peers")
    p.add_argument("--long", action="store_true",
                   help="one table line per implementation, with every number")
    p.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    return p


def list_everything() -> str:
    suites = text_table(
        ["suite", "layers", "dtypes", "threads", "what"],
        [[name, ",".join(s.layers) if len(s.layers) < 3 else f"{len(s.layers)} layers",
          ",".join(s.dtypes), ",".join(map(str, s.threads)), s.what]
         for name, s in layers_mod.SUITES.items()], left=5)
    layers = text_table(
        ["layer", "input", "weight", "args", "what"],
        [[layer.name, "x".join(map(str, layer.input)), "x".join(map(str, layer.weight)),
          layer.describe(), layer.what] for layer in layers_mod.LAYERS.values()], left=5)
    layers += f"\n{layers_mod.NOTATION}"
    peers = []
    for name, cls in PEERS.items():
        reason = cls().missing()
        peers.append([name, cls.title, "available" if reason is None else reason])
    return "\n\n".join([suites, layers, text_table(["peer", "what", "status"], peers, 3)])


def _make_peers(names: list, scipy_limit: float) -> list:
    return [ScipyOracle(scipy_limit) if name == "scipy" else PEERS[name]()
            for name in names if name != "none"]


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.list:
        print(list_everything())
        return 0
    if args.from_json:
        with open(args.from_json) as f:
            report = json.load(f)
    else:
        suite = layers_mod.SUITES[args.suite]
        settings = Settings(repeat=args.repeat, min_time=args.min_time,
                            peak_size=args.peak_size)
        report = run(layers_mod.select(args.suite, args.layers), args.ops,
                     args.dtype or list(suite.dtypes), args.threads or list(suite.threads),
                     _make_peers(args.peers, args.scipy_limit), settings,
                     progress=not args.quiet,
                     command=["python", "-m", "bench"] + list(sys.argv[1:] if argv is None
                                                              else argv))
    print(render(report, long=args.long))
    if args.json and not args.from_json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"\nwrote {args.json}")
    if args.plot:
        reason = matplotlib_missing()
        if reason:
            print(f"\nplot skipped: {reason}")
        else:
            from .plot import plot
            plot(report, args.plot)
            print(f"wrote {args.plot}")
    return 0
