"""The command line: exit codes, JSON output, atomic fmt, and the promise that check never loads torch."""

import json
import subprocess
import sys

import pytest

from paths import EXAMPLES, ROOT
from ltmdsl.cli import main

TINY = str(EXAMPLES / "tiny-hybrid.ltm")


def test_check_valid_file_exits_zero(capsys):
    assert main(["check", "--no-budgets", TINY]) == 0
    assert "ok: model tiny_hybrid: 26 sub-layers" in capsys.readouterr().out


def test_check_invalid_file_exits_one(tmp_path, capsys):
    bad = tmp_path / "bad.ltm"
    bad.write_text("model m {\n  vocab = 1\n  d_model = 8\n  stack { nope }\n}\n")
    assert main(["check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:4:11: error: unknown layer or block 'nope'" in err


def test_usage_errors_exit_two(tmp_path):
    assert main(["check", str(tmp_path / "missing.ltm")]) == 2
    with pytest.raises(SystemExit) as info:
        main(["check"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2


def test_show_json_has_the_promised_fields(capsys):
    assert main(["show", "--json", str(EXAMPLES / "mixtral-8x7b.ltm")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["name"] == "mixtral_8x7b"
    assert data["params_total"] == 46_702_792_704 and data["params_active"] < data["params_total"]
    assert len(data["layers"]) == 64
    assert {"index", "kind", "params"} <= set(data["layers"][0])


def test_show_table_totals(capsys):
    assert main(["show", str(EXAMPLES / "llama-3.1-8b.ltm")]) == 0
    out = capsys.readouterr().out
    assert "params_total" in out and "8,030,261,248" in out
    assert "rope=500000 llama3x8@8192" in out  # Llama 3.1's rope scaling: 8x the 8192-token context
    assert main(["show", str(EXAMPLES / "bamba-9b.ltm")]) == 0
    out = capsys.readouterr().out
    assert out.count("rope=10000 rope_dim=64") == 3  # Bamba's three attention layers rotate half of each head


def test_show_names_moe_variants_norms_and_scalars(tmp_path, capsys):
    path = tmp_path / "g.ltm"
    path.write_text("model g { vocab = 64 d_model = 16 norm = rmsnorm(eps = 1e-6, zero_centred = true)\n"
                    "embed_scale = d_model ** 0.5 logit_cap = 30.0\n"
                    "layer a = attention(heads = 2, post_norm = rmsnorm(eps = 1e-6, zero_centred = true))\n"
                    "layer e = moe(experts = 4, d_ff = 8, shared_d_ff = 8, shared_gate = true)\n"
                    "stack { a e } }\n")
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "post_norm=rmsnorm (1+w)" in out and "final   rmsnorm (1+w)" in out
    assert "shared=8 gated" in out and "embed_scale=4 logit_cap=30" in out


def test_fmt_check_and_write(tmp_path, capsys):
    path = tmp_path / "m.ltm"
    path.write_text("model m{vocab=4 d_model=8 layer f=mlp(d_ff=2) stack{f}}\n")
    assert main(["fmt", "--check", str(path)]) == 1
    assert main(["fmt", "-w", str(path)]) == 0
    assert main(["fmt", "--check", str(path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ltm"], "no temporary files left behind"


def test_fmt_of_invalid_syntax_writes_nothing(tmp_path):
    path = tmp_path / "m.ltm"
    path.write_text("model m {\n")
    assert main(["fmt", "-w", str(path)]) == 1
    assert path.read_text() == "model m {\n"


def test_check_and_memory_do_not_import_torch():
    code = (
        "import sys\n"
        "from ltmdsl.cli import main\n"
        f"main(['check', {str(EXAMPLES / 'llama-3.1-405b.ltm')!r}])\n"
        f"main(['memory', {str(EXAMPLES / 'ltm-100m.ltm')!r}, '--json'])\n"
        "bad = [m for m in ('torch', 'triton') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def test_console_script_help():
    proc = subprocess.run([sys.executable, "-m", "ltmdsl.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for command in ("check", "show", "fmt", "memory", "stream", "compile", "import-hf"):
        assert command in proc.stdout


def test_failing_budget_exits_three_and_names_what_fits(tmp_path, capsys):
    text = (EXAMPLES / "llama-3.1-8b.ltm").read_text().replace("inference context = 128Ki", "inference context = 10M")
    path = tmp_path / "llama.ltm"
    path.write_text(text)
    assert main(["check", str(path)]) == 3
    err = capsys.readouterr().err
    assert "budget serve_128k" in err and "per_gpu" in err and "largest context that fits" in err


def test_every_example_checks_with_its_budgets(capsys):
    files = sorted(str(p) for p in EXAMPLES.glob("*.ltm"))
    assert main(["check", *files]) == 0


BUDGET_SPEC = """model m {
    vocab = 256
    d_model = 4096
    layer attn = attention(heads = 32)
    stack { repeat 32 { attn } }
}
budget serve for m {
    inference context = 100M, batch = 1
    on 1 x H100
    require per_gpu <= 80 GB
}
"""


FAILING_REQUIRE = """model m {
    vocab = 256
    d_model = 64
    layer attn = attention(heads = 4)
    layer ffn = mlp(d_ff = 128)
    stack { attn ffn }
}
budget b for m {
    inference context = 1M, batch = 1
    on 1 x H100
    require kv_cache <= 1 MiB
}
"""


def test_budget_failure_is_printed_once_with_its_line_and_caret(tmp_path, capsys):
    path = tmp_path / "b.ltm"
    path.write_text(BUDGET_SPEC)
    assert main(["check", str(path)]) == 3
    err = capsys.readouterr().err
    assert err.count("error:") == 1, err  # the capacity check adds nothing to a stricter require per_gpu
    lines = err.splitlines()
    assert lines[0].startswith(f"{path}:10:5: error: budget serve (context 100,000,000): per_gpu is")
    assert lines[1] == "        require per_gpu <= 80 GB"
    assert lines[2] == "        ^"
    assert err.count("largest context") == 1


def test_a_looser_require_still_gets_the_capacity_check(tmp_path, capsys):
    path = tmp_path / "b.ltm"
    path.write_text(BUDGET_SPEC.replace("per_gpu <= 80 GB", "per_gpu <= 100 TB"))
    assert main(["check", str(path)]) == 3
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "per_gpu (H100 capacity)" in err
    assert "    budget serve for m {" in err.splitlines()


@pytest.mark.parametrize("value, shown", [("1e23", "100,000,000,000,000,000,000,000"), ("2.5e3", "2,500")], ids=str)
def test_memory_counts_are_exact(value, shown, capsys):
    # 1e23 tokens overflow the example's budget: the report is still printed, with exit 3 as `check` gives
    assert main(["memory", TINY, "--context", value]) in (0, 3)
    assert f"context {shown} tokens" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["1.5", "1e-3", "4096.5"], ids=str)
def test_memory_refuses_non_integer_counts(value, capsys):
    assert main(["memory", TINY, "--context", value]) == 2
    assert "ltmdsl memory: error:" in capsys.readouterr().err


@pytest.mark.parametrize("gpu", ["h100", "A100", "a100_80gb"])
def test_gpu_names_have_one_spelling(gpu, capsys):
    assert main(["memory", TINY, "--gpu", gpu]) == 2
    assert "unknown GPU" in capsys.readouterr().err


FMT_INPUT = "model m{vocab=4 d_model=8 layer f=mlp(d_ff=2) stack{f}}\n"


def test_fmt_write_goes_through_a_symlink(tmp_path):
    target = tmp_path / "real.ltm"
    target.write_text(FMT_INPUT)
    link = tmp_path / "link.ltm"
    link.symlink_to(target)
    assert main(["fmt", "-w", str(link)]) == 0
    assert link.is_symlink(), "the link stays a link"
    assert main(["fmt", "--check", str(target)]) == 0


def test_fmt_write_keeps_the_mode(tmp_path):
    path = tmp_path / "secret.ltm"
    path.write_text(FMT_INPUT)
    path.chmod(0o600)
    assert main(["fmt", "-w", str(path)]) == 0
    assert main(["fmt", "--check", str(path)]) == 0
    assert path.stat().st_mode & 0o777 == 0o600


def test_fmt_write_refuses_a_read_only_file(tmp_path, capsys):
    path = tmp_path / "ro.ltm"
    path.write_text(FMT_INPUT)
    path.chmod(0o444)
    assert main(["fmt", "-w", str(path)]) == 2
    assert "read-only" in capsys.readouterr().err
    assert path.read_text() == FMT_INPUT


def test_fmt_takes_several_files(tmp_path, capsys):
    paths = [tmp_path / f"{n}.ltm" for n in "ab"]
    for p in paths:
        p.write_text(FMT_INPUT)
    assert main(["fmt", "--check", *map(str, paths)]) == 1
    assert capsys.readouterr().err.count("not in canonical form") == 2
    assert main(["fmt", "-w", *map(str, paths)]) == 0
    assert main(["fmt", "--check", *map(str, paths)]) == 0
@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["text", "json"])
@pytest.mark.parametrize("edit", [
    pytest.param(lambda t: t, id="require-fails"),
    pytest.param(lambda t: t.replace("require kv_cache <= 1 MiB", "").replace("1 x H100", "1 x A100_40GB")
                 .replace("context = 1M", "context = 200M"), id="over-gpu-capacity"),
])
def test_memory_exits_three_like_check_when_the_budget_fails(tmp_path, capsys, edit, json_flag):
    path = tmp_path / "m.ltm"
    path.write_text(edit(FAILING_REQUIRE))
    assert main(["check", str(path)]) == 3
    capsys.readouterr()
    assert main(["memory", str(path), *json_flag]) == 3
    out = capsys.readouterr().out
    assert ("FAILS by" in out or "does NOT fit" in out) if not json_flag else json.loads(out)["fits"] is False


def test_memory_exits_zero_when_the_budget_holds(tmp_path, capsys):
    path = tmp_path / "m.ltm"
    path.write_text(FAILING_REQUIRE.replace("1 MiB", "1 GiB"))
    assert main(["memory", str(path)]) == 0
    assert "ok" in capsys.readouterr().out


def test_memory_says_what_the_plan_needs_in_words(tmp_path, capsys):
    """Never `under this plan: None`: a plan that no data-parallel size makes fit says so, and a count says
    how it is made (tp*pp*cp x dp)."""
    text = (EXAMPLES / "llama-3.1-405b.ltm").read_text()
    assert main(["memory", str(EXAMPLES / "llama-3.1-405b.ltm")]) == 0
    out = capsys.readouterr().out
    assert "under this plan: 1,024 = tp*pp*cp 1,024 x dp 1, the smallest dp that fits" in out
    path = tmp_path / "l.ltm"
    path.write_text(text.replace("on 1024 x H100 with tp = 8, pp = 4, cp = 32", "on 8 x H100 with tp = 8"))
    assert main(["memory", str(path)]) == 3
    out = capsys.readouterr().out
    assert "None" not in out
    assert "under this plan (tp=8 pp=1 cp=1): no number of GPUs fits, since no data-parallel size does" in out


def test_recompute_none_is_accepted(tmp_path, capsys):
    """`none` is a keyword (it evaluates to no value) and also one of recompute's choices."""
    path = tmp_path / "r.ltm"
    path.write_text(FAILING_REQUIRE.replace("inference context = 1M, batch = 1",
                                            "training context = 1024, batch = 1, recompute = none")
                    .replace("require kv_cache <= 1 MiB", "require per_gpu <= 80 GB"))
    assert main(["check", str(path)]) == 0, capsys.readouterr().err
