"""The fuzz lab: generator, campaign, crash handling, shrinking,
replay, and the self-test (every mutant must be caught)."""
import io
import json

import pytest

import dilconv
from dilconv import _tiers
from fuzz import campaign, cases, check, impls, selftest
from fuzz.__main__ import main
from fuzz.mutants import MUTANTS, Mutant, real_forward
from fuzz.pool import WorkerPool
from fuzz.progress import Progress


@pytest.fixture(scope="module")
def pool():
    with WorkerPool(2, timeout=120) as p:
        yield p


def test_case_stream_is_reproducible_and_shards_partition_it():
    cfg = cases.GenConfig()
    first = [cases.generate(7, i, cfg) for i in range(50)]
    assert first == [json.loads(json.dumps(cases.generate(7, i, cfg))) for i in range(50)]
    assert first != [cases.generate(8, i, cfg) for i in range(50)]
    shards = [list(campaign.Plan(n_cases=50, shard=(k, 3)).indices()) for k in (1, 2, 3)]
    assert sorted(sum(shards, [])) == list(range(50))


def test_generator_covers_the_parameter_space_and_its_geometry_matches_dilconv():
    cfg = cases.GenConfig()
    seen = {key: set() for key in ("api", "padding_form", "padding_mode", "edge", "path",
                                   "threads", "dtype", "values", "out", "kind", "unbatched")}
    for i in range(1500):
        case = cases.generate(3, i, cfg)
        for key in seen:
            seen[key].add(case.get(key))
        assert cases.is_valid(case), case
        assert max(case["h"], case["w"]) <= cfg.max_size
        if case["api"] == "conv2d" and case["padding_mode"] == "zeros":
            s = cases.shapes(case)
            kw = cases.call_kwargs(case)
            del kw["padding_mode"]
            assert dilconv.output_shape(s["input"], s["weight"], **kw) == s["grad_output"]
    assert seen["padding_form"] == set(cases.PADDING_FORMS)
    assert seen["padding_mode"] == set(cases.PADDING_MODES)
    assert seen["edge"] == set(cases.EDGES)
    assert seen["unbatched"] == {True, False} and seen["threads"] == {1, 2}
    assert seen["path"] == set(cases.DRAWN_PATHS) and seen["api"] == set(cases.APIS)


def test_each_case_draws_a_supported_tier_without_changing_the_rest():
    cfg = cases.GenConfig()
    only = cases.GenConfig(isas=cases.ISAS[:1], cross_tier_rate=1.0)
    drawn, crossed = set(), 0
    for i in range(400):
        case, other = cases.generate(2, i, cfg), cases.generate(2, i, only)
        assert case["isa"] in cases.ISAS and other["isa"] == cases.ISAS[0]
        drawn.add(case["isa"])
        crossed += "tiers" in case["ops"]
        if case["kind"] == "valid" and len(cases.ISAS) > 1:
            assert "tiers" in other["ops"]
        strip = ("isa", "ops")
        assert {k: v for k, v in case.items() if k not in strip} == {
            k: v for k, v in other.items() if k not in strip}
    assert drawn == set(cases.ISAS)
    if len(cases.ISAS) > 1:     # a quarter of the valid cases (nine in ten) by default
        assert 0.15 < crossed / 400 < 0.3, crossed


def test_case_knobs_split_small_planes_and_are_restored():
    from dilconv import _tuning
    from dilconv._tiers import _gemm
    assert set(check.available_knobs()) <= set(_tuning.KNOBS)
    before = len(_gemm.plane_tiles(10, 9, 4, _tuning.current())), _tuning.current()
    with check.case_tuning({"tile_pixels": 7, "min_macs_per_thread": 1, "path": "gemm"}):
        knobs = _tuning.current()
        tiles = _gemm.plane_tiles(10, 9, 4, knobs)
        covered = sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in tiles)
        assert len(tiles) > before[0] and covered == 90
        assert (knobs.flat_span_elements, knobs.depthwise_task_pixels, knobs.path,
                knobs.min_macs_per_thread) == (7, 7, "gemm", 1)
    assert (len(_gemm.plane_tiles(10, 9, 4, _tuning.current())), _tuning.current()) == before
    for tier in cases.ISAS:
        with check.case_tuning({"isa": tier}):
            assert _tiers.current() == tier
    assert _tiers.current() == _tiers.DEFAULT


def _crossed_case(**changes):
    """A conv2d case of every valid op, cross-checked on every tier, with `changes`."""
    cfg = cases.GenConfig(cross_tier_rate=1.0, invalid_rate=0.0)
    case = next(c for c in (cases.generate(21, i, cfg) for i in range(200))
                if c["api"] == "conv2d" and c["n"] >= 1 and c["path"] == "direct"
                and c["kh"] * c["kw"] > 1 and set(c["needs"]) == {"input", "weight", "bias"}
                and c["padding_mode"] == "zeros" and not c["unbatched"])
    return cases.replace(case, **changes)


class _BaselineOff(Mutant):
    """Baseline results 1% off: within no bound."""

    def forward(self, call, mode):
        y = real_forward(call, mode)
        return y * 1.01 if _tiers.current() == "baseline" else y


@pytest.mark.skipif(len(cases.FMA_ISAS) < 2 or "baseline" not in cases.ISAS,
                    reason="this CPU runs fewer than two FMA tiers")
def test_cross_tier_check_compares_bits_and_bounds():
    for isa in cases.ISAS:
        case = _crossed_case(isa=isa)
        result = check.run_case(case, dilconv)
        assert result["status"] == "pass" and "tiers" in result["checked"], result["failures"]
        # Tier bugs the case's own tier does not show: one ulp on the last FMA tier, the
        # baseline out of bounds.
        bits = check.run_case(case, MUTANTS["tier_one_ulp_off"])["failures"]
        assert bits and {(f["op"], f["kind"]) for f in bits} == {("tiers", "bits")}, bits
        assert all(cases.FMA_ISAS[-1] in f["message"] for f in bits)
        off = check.run_case(case, _BaselineOff())["failures"]
        if isa == "baseline":
            assert {f["op"] for f in off} >= {"forward", "adjoint"}, off
        else:
            assert [(f["op"], f["kind"]) for f in off] == [("tiers", "mismatch")], off
            assert "forward on baseline" in off[0]["message"]
    # Without the op, no other tier runs.
    quiet = _crossed_case(isa=cases.FMA_ISAS[0])
    quiet["ops"].remove("tiers")
    assert check.run_case(quiet, MUTANTS["tier_one_ulp_off"])["status"] == "pass"


def test_every_invalid_call_raises_a_named_error():
    base = next(c for c in (cases.generate(5, i, cases.GenConfig(ops=("invalid",)))
                            for i in range(100)) if c["n"] >= 1)
    for name in cases.INVALID:
        for fn in ("conv2d", "conv2d_backward"):
            case = cases.replace(base, invalid=name, call=cases.INVALID[name].call or fn)
            result = check.run_case(case, dilconv)
            assert result["status"] == "pass", (name, result["failures"])


def test_progress_without_a_terminal_prints_plain_lines():
    out = io.StringIO()
    progress = Progress(total=10, stream=out, every=0.0)
    progress.update(5, 1)
    progress.close()
    lines = out.getvalue().splitlines()
    assert lines and "\r" not in out.getvalue() and "1 failures" in lines[-1]


def test_short_campaign_agrees_with_the_oracle_and_covers_everything(pool):
    rep = campaign.run(campaign.Plan(seed=11, n_cases=300), pool)
    assert rep["disagreements"] == 0, rep["failures"][:3]
    assert rep["cases_run"] == 300
    assert rep["coverage"]["never_exercised"] == []
    assert set(rep["counts"]["by_op"]) == set(cases.OPS)
    assert set(rep["counts"]["by_isa"]) == set(cases.ISAS)
    assert min(rep["coverage"]["isas"].values()) > 0
    assert rep["environment"]["cpu_tiers"]["supported"] == list(cases.ISAS)
    assert rep["throughput"]["cases_per_cpu_s"] > 0
    for op, worst in rep["worst_ratio_by_op"].items():
        assert worst["ratio"] <= 1, op


def test_oracle_agrees_with_torch_on_every_api_and_padding_mode():
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    impl = impls.get(impls.TORCH)           # in this process: no torch import per worker
    ops = tuple(op for op in cases.VALID_OPS if op != "determinism")
    # Non-zero modes only (conv_transpose2d cases still pad with zeros).
    cfg = cases.GenConfig(ops=ops, modes=("reflect", "replicate", "circular"))
    checked = {}
    try:
        for i in range(60):
            case = cases.generate(12, i, cfg)
            result = check.run_case(case, impl)
            assert result["status"] == "pass", (case, result["failures"])
            for key in (case["padding_mode"], case["api"]):
                checked[key] = checked.get(key, 0) + 1
    finally:
        torch.set_num_threads(threads)
    assert min(checked.get(k, 0) for k in cases.PADDING_MODES + cases.APIS) >= 4, checked


def test_crash_is_reported_with_its_case_shrunk_and_replayed(pool, tmp_path, capsys):
    name = "segfault_on_wide_dilation"
    plan = campaign.Plan(seed=1, n_cases=30, impl=name, max_shrinks=1,
                         corpus=str(tmp_path))
    rep = campaign.run(plan, pool)
    crashes = [f for f in rep["failures"] if f["kind"] == "crash"]
    assert crashes and rep["cases_run"] == 30
    for f in crashes:
        assert cases.pair(f["case"]["dilation"])[1] >= 6
        assert "SIGSEGV" in f["message"] and "string_at" in f["message"]
    (path,) = rep["repros"]
    repro = json.load(open(path))
    small = repro["case"]
    assert (small["groups"], small["cg"], small["og"], small["h"], small["kh"]) == (1,) * 5
    assert cases.pair(small["dilation"]) == (1, 6)
    assert main(["replay", path]) == 1
    assert "still fails" in capsys.readouterr().out
    assert main(["replay", path, "--impl", "dilconv"]) == 0


def test_mismatch_shrinks_to_a_minimal_case(pool, tmp_path):
    plan = campaign.Plan(seed=4, n_cases=20, impl="bias_doubled", max_shrinks=1,
                         corpus=str(tmp_path), stop_on_failure=True)
    rep = campaign.run(plan, pool)
    (path,) = rep["repros"]
    small = json.load(open(path))["case"]
    assert small["bias"] and small["n"] == 1
    for key in ("groups", "cg", "og", "h", "w", "kh", "kw"):
        assert small[key] == 1, key
    assert small["padding"] == 0


@pytest.mark.skipif(len(cases.FMA_ISAS) < 2, reason="this CPU runs fewer than two FMA tiers")
def test_tier_disagreement_shrinks_and_replays_on_its_tier(pool, tmp_path, capsys):
    plan = campaign.Plan(seed=6, n_cases=60, impl="tier_one_ulp_off", max_shrinks=1,
                         corpus=str(tmp_path), stop_on_failure=True)
    rep = campaign.run(plan, pool)
    (path,) = rep["repros"]
    repro = json.load(open(path))
    small, original = repro["case"], repro["original_case"]
    assert repro["failure"]["op"] == "tiers" and repro["failure"]["kind"] == "bits"
    assert small["isa"] == original["isa"] and "tiers" in small["ops"]
    assert (small["n"], small["h"] * small["w"]) <= (original["n"], original["h"] *
                                                     original["w"])
    assert main(["replay", path]) == 1
    out = capsys.readouterr().out
    assert f"CPU tier {small['isa']}" in out and "FAILURE tiers bits" in out
    assert main(["replay", path, "--impl", "dilconv"]) == 0


def test_self_test_kills_every_mutant(pool):
    out = io.StringIO()
    assert selftest.run(pool, seed=0, stream=out) == 0, out.getvalue()
    text = out.getvalue()
    tried = [name for name, mutant in MUTANTS.items() if not mutant.unavailable]
    assert f"killed {len(tried)}/{len(tried)} mutants" in text
    assert " NO " not in text
    rows = {line.split()[0]: line for line in text.splitlines()}
    for name in ("tier_one_ulp_off", "tier_selector_one_too_low"):
        if name in tried:             # killed by the cross-tier check
            assert rows[name].split()[1] == "yes" and "tiers bits" in rows[name]
    for name, op in (("depthwise_grad_weight_skips_last_row", "grad_weight"),
                     ("depthwise_grad_input_kernel_not_turned", "grad_input")):
        assert rows[name].split()[1] == "yes" and f": {op} mismatch" in rows[name], rows[name]


def test_cli_run_writes_the_report(tmp_path):
    report = tmp_path / "r.json"
    isa = cases.ISAS[-1]
    code = main(["run", "--cases", "40", "--seed", "3", "--jobs", "1", "--no-progress",
                 "--dtype", "float32", "--isa", isa, "--cross-tiers", "0",
                 "--report", str(report)])
    rep = json.loads(report.read_text())
    assert code == 0 and rep["cases_run"] == 40 and rep["seed"] == 3
    assert set(rep["counts"]["by_dtype"]) == {"float32"}
    assert set(rep["counts"]["by_isa"]) == {isa} and "tiers" not in rep["counts"]["by_op"]
    assert rep["config"]["isas"] == [isa] and rep["config"]["cross_tier_rate"] == 0
    assert {"throughput", "environment", "coverage", "failures"} <= set(rep)


def test_cli_run_prints_readable_summary_lines(capsys):
    assert main(["run", "--cases", "20", "--seed", "5", "--jobs", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "{" not in out and "}" not in out and "Counter" not in out, out
    assert "checked by op: " in out and out.strip().splitlines()[-1].startswith("fuzz: ")
    assert "by CPU tier: " in out and "cross-checked on every tier" in out


@pytest.mark.parametrize("argv, words", [
    (["run", "--impl", "bogus", "--cases", "1"], ["unknown implementation 'bogus'"]),
    (["replay", "missing.json"], ["cannot read missing.json"]),
    (["replay", "missing.json", "--impl", "bogus"], ["cannot read missing.json"]),
    (["replay", "NOTJSON"], ["is not JSON"]),
    (["replay", "WRONG"], ["not a dilconv-fuzz-repro/1 file"]),
    (["replay", "BADIMPL"], ["unknown implementation 'nope'"]),
    (["replay", "BADISA"], ["CPU tier 'v9'", "supported: " + ", ".join(cases.ISAS)]),
])
def test_cli_errors_are_one_line_and_exit_2(argv, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "NOTJSON").write_text("not json")
    (tmp_path / "WRONG").write_text("{}")
    (tmp_path / "BADIMPL").write_text(json.dumps({"format": campaign.REPRO_FORMAT,
                                                  "impl": "nope", "case": {}}))
    (tmp_path / "BADISA").write_text(json.dumps({"format": campaign.REPRO_FORMAT,
                                                 "impl": "dilconv", "case": {"isa": "v9"}}))
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m fuzz "), captured.err
    assert "Traceback" not in captured.err + captured.out
    for word in words:
        assert word in err[0]


def test_cli_every_option_has_help():
    from fuzz.__main__ import parser
    p = parser()
    subparsers = next(a for a in p._actions if a.dest == "command").choices
    for name, sub in subparsers.items():
        for action in sub._actions:
            assert action.help, (name, action.dest)
