"""`require` lines beyond one byte component: sums of byte components and FLOP limits.

The values a limit measures are checked against the report's own components and `compute.flops` (the sum
of the components it names), and the largest context a failing limit allows is checked exactly: the limit
holds there and fails one token later.
"""

from __future__ import annotations

import json

import pytest

import ltmdsl
from ltmdsl.cli import main
from ltmdsl.memory import check_budgets, flops, report
from paths import EXAMPLES

SPEC = """
model m {
    vocab = 256
    d_model = 64
    layer attn = attention(heads = 4, kv_heads = 1)
    layer swa = attention(heads = 4, kv_heads = 2, window = 64)
    layer ssm = mamba2(d_state = 16, head_dim = 16, chunk = 16)
    stack { attn swa ssm }
}
budget b for m {
    inference context = 1M, kv_dtype = fp8
    require LIMIT
}
"""


def spec_with(limit: str):
    return ltmdsl.loads(SPEC.replace("LIMIT", limit), name="limits.ltm")


@pytest.mark.parametrize("name, phase, components", [
    ("decode_flops", "per_token", ("projections", "head", "attention", "ssm")),
    ("mixing_flops", "per_token", ("attention", "ssm")),
    ("prefill_flops", "prefill", ("projections", "head", "attention", "ssm")),
], ids=["decode", "mixing", "prefill"])
@pytest.mark.parametrize("context", [1, 100, 65_536, 10**8])
def test_flop_quantity_is_the_sum_of_its_flops_components(name, phase, components, context):
    spec = spec_with(f"{name} <= 1")
    ev = report(spec.model, spec.budget("b")).evaluator
    expected = flops(spec.model, context)
    assert ev.value(name, context, 1) == sum(expected[phase][c] for c in components)


def test_summed_bytes_limit_measures_the_sum_and_solves_its_largest_context():
    spec = spec_with("kv_cache + recurrent_state < 32 MB")
    (lim,) = spec.budget("b").limits
    assert (lim.parts, lim.bound, lim.measure) == (("kv_cache", "recurrent_state"), 32 * 10**6 - 1, "bytes")
    (result,) = check_budgets(spec.ir)
    r = result.report
    assert result.failures[0].value == r.components["kv_cache"] + r.components["recurrent_state"]
    ev, mc = r.evaluator, result.failures[0].max_context
    assert ev.limit_value(lim, mc, 1) <= lim.bound < ev.limit_value(lim, mc + 1, 1)
    assert "limits.ltm:12:5: error: budget b (context 1,000,000): kv_cache + recurrent_state is" in result.message
    assert result.to_json()["failures"][0]["max_bytes"] == lim.bound


def test_failing_flop_limit_names_flops_and_the_largest_context():
    spec = spec_with("mixing_flops <= 2 * 4 * (16 + 16) * 1000")  # global attention alone: 256 T
    (result,) = check_budgets(spec.ir)
    (failure,) = result.failures
    ev = result.report.evaluator
    assert failure.measure == "flops" and failure.value == ev.value("mixing_flops", 10**6, 1)
    mc = failure.max_context
    assert ev.value("mixing_flops", mc, 1) <= 256_000 < ev.value("mixing_flops", mc + 1, 1)
    assert "limits.ltm:12:5: error: budget b (context 1,000,000): mixing_flops is" in result.message
    assert "FLOPs, over the limit of 2.56e+05 FLOPs" in result.message
    assert result.to_json()["failures"][0]["max_flops"] == 256_000
    assert "require mixing_flops <= 2.56e+05 FLOPs: " in result.report.to_text()


def test_flop_limit_failure_exits_three_with_caret(tmp_path, capsys):
    path = tmp_path / "f.ltm"
    path.write_text(SPEC.replace("LIMIT", "decode_flops <= 1000"))
    assert main(["check", str(path)]) == 3
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"{path}:12:5: error: budget b (context 1,000,000): decode_flops is")
    assert err[1:] == ["        require decode_flops <= 1000", "        ^"]


def test_ltm_100m_asserts_magics_two_claims():
    """Cache + state within 8 GB at 100M tokens on one H100, and sequence mixing under 1/1000 of
    Llama-3.1-405B's attention per decoded token, measured on the 405B example itself."""
    llama = ltmdsl.load(EXAMPLES / "llama-3.1-405b.ltm").model
    attention_405b = flops(llama, 10**8)["per_token"]["attention"]
    assert attention_405b == 126 * 2 * 128 * (128 + 128) * 10**8  # 2 * H * (D + Dv) * T per layer
    spec = ltmdsl.load(EXAMPLES / "ltm-100m.ltm")
    (serve, _train) = check_budgets(spec.ir)
    assert serve.ok and serve.budget == "serve_100m"
    r = serve.report
    assert r.settings.context == 10**8 and r.settings.gpus == 1 and r.settings.gpu.name == "H100"
    assert r.components["kv_cache"] + r.components["recurrent_state"] <= 8 * 10**9
    mixing = r.flops["per_token"]["attention"] + r.flops["per_token"]["ssm"]
    assert 1000 * mixing <= attention_405b
    limits = {lim.component: lim for lim in r.limits}
    assert limits["kv_cache + recurrent_state"].bound == 8 * 10**9
    assert limits["mixing_flops"].bound == attention_405b // 1000
    assert json.dumps(r.to_json())
