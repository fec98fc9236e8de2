"""Literals, units and hostile input: the parser either returns a tree or raises SpecError, fast."""

import os
import stat
import time

import pytest

import ltmdsl
from ltmdsl import SpecError
from ltmdsl.evaluate import Scope, evaluate
from ltmdsl.parser import parse

BASE = "model m {{\n    vocab = 256\n    d_model = {d}\n    layer ffn = mlp(d_ff = 8)\n    stack {{ ffn }}\n}}\n"


def value(text: str):
    spec = parse(f"const x = {text}\n", "<t>")
    return evaluate(spec.items[0].value, Scope({}))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("100M", 100_000_000), ("128Ki", 131_072), ("4K", 4_000), ("2Gi", 2**31), ("1T", 10**12),
        ("80 GB", 80 * 10**9), ("80GB", 80 * 10**9), ("40GiB", 40 * 2**30), ("512 MiB", 2**29), ("1 TiB", 2**40),
        ("1.5Ki", 1536), ("2.5K", 2500), ("1_000", 1000), ("1e-5", 1e-5), ("5e5", 500000.0),
        ("4096 / 32", 128), ("7 // 2", 3), ("cdiv(2560, 16)", 160), ("min(3, 1, 2)", 1), ("2 ** 10", 1024),
        ("-3 ** 2", -9), ("(1 + 2) * 3", 9), ("10 % 4", 2), ("true", True), ("none", None),
    ],
    ids=lambda v: str(v),
)
def test_literal_values(text, expected):
    got = value(text)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("text, message", [
    ("10 / 3", "is not an integer"),
    ("1.0001K", "not a whole number"),
    ("1 / 0", "division by zero"),
    ("2 ** 2 ** 2 ** 2 ** 2", "too large"),
    ("cdiv(1.5, 2)", "integers"),
    ("nope(3)", "unknown function"),
])
def test_expression_errors(text, message):
    with pytest.raises(SpecError, match=message):
        ltmdsl.loads(BASE.format(d=text))


HOSTILE = {
    "binary_junk": bytes(range(256)) * 20,
    "invalid_utf8": b"model m {\n  vocab = \xff\xfe\n}\n",
    "nul_bytes": b"model m {\x00}",
    "deep_nesting": b"model m { vocab = " + b"(" * 100_000 + b"1" + b")" * 100_000 + b" }",
    "deep_braces": b"{" * 100_000,
    "long_number": b"model m { vocab = " + b"9" * 5000 + b" }",
    "megabyte_identifier": b"model " + b"a" * 2**20 + b" { }",
    "long_sum": b"model m { vocab = 1" + b" + 1" * 20_000 + b" }",
    "unary_chain": b"model m { vocab = " + b"- " * 20_000 + b"1 }",
    "huge_power": b"model m { vocab = 9 ** 9 ** 9 ** 9 }",
    "huge_repeat": BASE.format(d=64).replace("{ ffn }", "{ repeat 10G { ffn } }").encode(),
    "empty": b"",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_input_is_refused_cleanly(name, tmp_path):
    path = tmp_path / "hostile.ltm"
    path.write_bytes(HOSTILE[name])
    before = set(os.listdir(tmp_path))
    start = time.perf_counter()
    with pytest.raises(SpecError) as info:
        ltmdsl.load(path)
    assert time.perf_counter() - start < 5.0, "hostile input must not hang the parser"
    assert set(os.listdir(tmp_path)) == before, "nothing is written"
    assert info.value.diagnostics and info.value.render()


@pytest.mark.parametrize("target", ["missing", "directory"])
def test_missing_path_and_directory(target, tmp_path):
    path = tmp_path / "nope.ltm" if target == "missing" else tmp_path
    with pytest.raises(SpecError, match="no such file|is a directory"):
        ltmdsl.load(path)


def test_syntax_error_has_position_and_caret():
    with pytest.raises(SpecError) as info:
        ltmdsl.loads("model m {\n    vocab = 256 @ 2\n}\n")
    d = info.value.diagnostics[0]
    assert (d.line, d.col) == (2, 17)
    assert info.value.render().splitlines()[-1].strip() == "^"


def test_identifier_named_x_is_allowed():
    spec = ltmdsl.loads(BASE.format(d="x").replace("    vocab = 256\n", "    vocab = 256\n    x = 64\n"))
    assert spec.model.d_model == 64


@pytest.mark.parametrize("text, expected", [("4096", 4096), ("100M", 10**8), ("128Ki", 131072), ("1e6", 10**6),
                                            ("1_000", 1000)])
def test_command_line_counts_use_the_spec_syntax(text, expected):
    from ltmdsl.evaluate import parse_count

    assert parse_count(text) == expected


@pytest.mark.parametrize("text", ["0", "1.5", "abc", "64ki", "9" * 50, "-3"])
def test_bad_command_line_counts(text):
    from ltmdsl.evaluate import parse_count

    with pytest.raises(ValueError):
        parse_count(text)


@pytest.mark.parametrize("state", ["fresh", "corrupt", "disabled"])
def test_grammar_cache_is_the_users_and_never_in_the_way(state, tmp_path):
    """The analysed grammar is kept in $XDG_CACHE_HOME/ltmdsl/grammar, private (60 ms of every run), one file per
    Lark and Python version; a damaged cache is rebuilt and LTMDSL_NO_CACHE leaves none. Each case in a fresh
    interpreter, since the parser is built once a process."""
    import subprocess
    import sys

    import lark

    version = f"lark{lark.__version__}-py{sys.version_info[0]}{sys.version_info[1]}"
    cache = tmp_path / "ltmdsl" / "grammar" / f"ltm-{version}.lark-cache"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    env.pop("LTMDSL_NO_CACHE", None)
    if state == "corrupt":
        cache.parent.mkdir(parents=True)
        cache.write_bytes(b"not a cache\n\x80\x04garbage")
    if state == "disabled":
        env["LTMDSL_NO_CACHE"] = "1"
    code = "from ltmdsl.parser import parse; print(type(parse('model m { d_model = 8 }', 'x.ltm')).__name__)"
    for _ in range(2):  # the second run reads what the first wrote
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "SpecFile" and not out.stderr
    if state == "disabled":
        assert not cache.exists()
    else:
        assert cache.read_bytes()[:64].split(b"\n")[0].isalnum()  # Lark's header: the grammar's hash
        assert stat.S_IMODE(cache.parent.stat().st_mode) == 0o700
