"""The memory model on the example specs, through ltmdsl.load and the `ltmdsl memory` command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import sympy

import ltmdsl
from ltmdsl.cli import main
from ltmdsl.memory import check_budgets, report
from ltmdsl.memory.symbols import B, C, DP, T

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ALL = sorted(p.name for p in EXAMPLES.glob("*.ltm"))


@pytest.mark.parametrize("name", ALL)
def test_every_example_reports_and_checks(name):
    spec = ltmdsl.load(EXAMPLES / name)
    r = report(spec.model, None)
    assert r.total_bytes == sum(r.components.values()) > 0
    for result in check_budgets(spec.ir):
        assert result.message and (result.ok or result.failures)


def test_examples_match_the_hand_built_models(models):
    for name in ("llama-3.1-405b", "jamba-v0.1", "mamba-2.8b", "mistral-7b-v0.1"):
        spec = ltmdsl.load(EXAMPLES / f"{name}.ltm")
        for T in (4096, 262_144, 10**8):
            a = report(spec.model, None, context=T).components
            b = report(models[name], None, context=T).components
            assert a["kv_cache"] == b["kv_cache"] and a["recurrent_state"] == b["recurrent_state"], (name, T)


def test_llama_405b_example_at_100m():
    spec = ltmdsl.load(EXAMPLES / "llama-3.1-405b.ltm")
    r = report(spec.model, None, context=10**8)
    assert r.components["kv_cache"] == 51_609_600_000_000
    assert r.gpus_needed_by_component["kv_cache"] == 646


def run_cli(capsys, *args):
    code = main(["memory", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_table_labels_units_honestly(capsys):
    code, out, err = run_cli(capsys, EXAMPLES / "mamba-2.8b.ltm", "--context", "128Ki")
    assert code == 0, err
    assert "GiB" in out and "recurrent_state" in out and "context 131,072 tokens" in out


def test_cli_json_keys(capsys):
    code, out, _ = run_cli(capsys, EXAMPLES / "llama-3.1-405b.ltm", "--context", "100M", "--json",
                           "--gpu", "H200", "--gpus", "16", "--mode", "inference", "--batch", "1")
    assert code == 0
    data = json.loads(out)
    for key in ("mode", "context", "batch", "components", "total_bytes", "per_gpu_bytes", "gpus_needed",
                "gpu", "max_context", "formulas"):
        assert key in data
    assert data["context"] == 10**8 and data["gpu"]["name"] == "H200"
    assert data["components"]["kv_cache"] == 51_609_600_000_000


def test_cli_several_files_and_plot(capsys, tmp_path):
    png = tmp_path / "mem.png"
    code, out, err = run_cli(capsys, EXAMPLES / "ltm-100m.ltm", EXAMPLES / "llama-3.1-8b.ltm", "--plot", png,
                             "--json")
    assert code == 0, err
    assert len(json.loads(out)) == 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["mem.png"]  # no temporary file left behind


@pytest.mark.parametrize("args, message", [
    (["--context", "12X"], "not a count"), (["--gpu", "H900"], "unknown GPU"),
    (["--budget", "nope"], "no budget named"),
], ids=["context", "gpu", "budget"])
def test_cli_usage_errors_exit_2_without_traceback(capsys, args, message):
    code, _, err = run_cli(capsys, EXAMPLES / "llama-3.1-8b.ltm", *args)
    assert code == 2 and message in err and "Traceback" not in err and ": error: " in err


def test_memory_command_imports_neither_torch_nor_triton():
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "ltmdsl.cli", "memory",
                          str(EXAMPLES / "jamba-v0.1.ltm"), "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    modules = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    assert not {m for m in modules if m.split(".")[0] in ("torch", "triton", "matplotlib")}


def _sympy_bytes(expr, t: int, b: int, c: int, dp: int) -> int:
    """The oracle: sympy's own exact rational arithmetic on a canonical expression, rounded up to bytes."""
    value = sympy.ceiling(expr.xreplace({T: t, B: b, C: c, DP: dp}))
    assert value.is_Integer, value
    return int(value)


@pytest.mark.parametrize("name", ALL, ids=[n.removesuffix(".ltm") for n in ALL])
def test_compiled_bytes_equal_sympy_on_every_budget(name):
    """Every example's budgets (and its defaults), at the budget's context and at 100M tokens: the compiled
    integer functions, built from unevaluated expressions, give exactly the bytes sympy computes from the
    canonical expressions the report prints, for one replica and for every pipeline stage of the plan."""
    spec = ltmdsl.load(EXAMPLES / name)
    gpus = {g.name: g for g in spec.ir.gpus}
    for budget in (None, *spec.ir.budgets):
        model = spec.model if budget is None else spec.ir.model(budget.model)
        ev = report(model, budget, user_gpus=gpus).evaluator
        s = ev.settings
        single, plan = ev.shown_single, ev.shown_plan
        for t in (s.context, 10**8):
            point = (t, s.batch, s.chunk)
            assert ev.single.values(*point)[0] == {c: _sympy_bytes(single[0].combined[c], *point, 1)
                                                    for c in ev.components}, (budget, t)
            if plan is not None:
                assert ev.plan.values(*point, s.dp) == [
                    {c: _sympy_bytes(st.combined[c], *point, s.dp) for c in ev.components} for st in plan], (budget, t)


def test_bytes_above_2_to_the_53_stay_exact():
    """Llama-3.1-405B at 100M tokens and a batch of 100,000: a KV cache of 5.16e18 bytes, past float64's exact
    integers (2^53 ~ 9.0e15), is exactly 100,000 times the 51,609,600,000,000 bytes of one sequence."""
    spec = ltmdsl.load(EXAMPLES / "llama-3.1-405b.ltm")
    r = report(spec.model, None, context=10**8, batch=100_000)
    assert r.components["kv_cache"] == 51_609_600_000_000 * 100_000 > 2**53
    single = r.evaluator.shown_single[0]
    assert r.components == {c: _sympy_bytes(single.combined[c], 10**8, 100_000, r.settings.chunk, 1)
                            for c in r.components}
