"""`fmt` prints canonical text that parses back to the same IR, keeps comments, and is idempotent."""

import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ltmdsl
from paths import EXAMPLES
from ltmdsl import SpecError
from ltmdsl.fmt import format_spec
from ltmdsl.parser import parse
from spec_utils import ir_meaning


def fmt_text(text: str) -> str:
    return format_spec(parse(text, "<t>"))


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.ltm")))
def test_examples_round_trip(name):
    text = (EXAMPLES / name).read_text()
    out = fmt_text(text)
    assert ir_meaning(ltmdsl.loads(out).ir) == ir_meaning(ltmdsl.loads(text).ir)
    assert fmt_text(out) == out, "fmt is idempotent"


def test_comments_are_kept():
    text = "# header\nmodel m {  # trailing\n  vocab=256 # v\n  d_model=64\n  # before layer\n  layer f=mlp(d_ff=8)\n  stack{f}\n}\n# end\n"
    out = fmt_text(text)
    for comment in ("# header", "# trailing", "# v", "# before layer", "# end"):
        assert comment in out
    assert "    vocab = 256  # v" in out.splitlines()


def test_minimal_parentheses():
    out = fmt_text("const a = (1 + 2) * (3 - (4 - 5)) + (-2) ** 2 + -(2 ** 2) + (2 ** 3) ** 2\n")
    assert out == "const a = (1 + 2) * (3 - (4 - 5)) + (-2) ** 2 + -2 ** 2 + (2 ** 3) ** 2\n"


# ---- property: random valid specs round-trip through fmt -------------------------------------

_names = st.sampled_from(["a", "b", "c", "ffn", "ssm", "attn", "x1", "mix"])


@st.composite
def layer_defs(draw):
    kind = draw(st.sampled_from(["attention", "mamba", "mamba2", "mlp", "moe"]))
    if kind == "attention":
        heads = draw(st.sampled_from([1, 2, 4, 8]))
        kv = draw(st.sampled_from([h for h in (1, 2, 4, 8) if heads % h == 0]))
        window = draw(st.sampled_from(["", ", window = 16", ", window = 2Ki"]))
        rope = draw(st.sampled_from(["", ", rope_theta = none", ", rope_theta = 5e5", ", rope_theta = 1000",
                                     ", rope_theta = 5e5, rope_scaling = llama3(factor = 8, low_freq_factor = 1, "
                                     "high_freq_factor = 2 ** 2, original_context = 8Ki)",
                                     ", rope_theta = 1000, rope_dim = 8 // 2", ", rope_dim = none"]))
        return f"attention(heads = {heads}, kv_heads = {kv}{window}{rope})"
    if kind == "mamba":
        return f"mamba(d_state = {draw(st.sampled_from([4, 16]))}, expand = {draw(st.sampled_from([1, 2]))})"
    if kind == "mamba2":
        return f"mamba2(d_state = 16, head_dim = {draw(st.sampled_from([8, 16, 32]))}, chunk = 8)"
    if kind == "mlp":
        act = draw(st.sampled_from(["swiglu", "gelu", "relu2"]))
        return f"mlp(d_ff = {draw(st.integers(1, 300))} * 2, act = {act})"
    return f"moe(experts = 4, top_k = {draw(st.integers(1, 4))}, d_ff = 32)"


@st.composite
def specs(draw):
    names = draw(st.lists(_names, min_size=1, max_size=4, unique=True))
    other = draw(st.sampled_from(["B", "é", "Ω", "中", "ß", "_", "1"]))  # non-ASCII symbols must stay quoted
    minuses = draw(st.integers(0, 80))  # runs of unary minus, written spaced or glued (the guard allows 64)
    glued = minuses <= 60 and draw(st.booleans())
    run = "-" * minuses if glued else "- " * minuses
    defs = {n: draw(layer_defs()) for n in names}
    sep = draw(st.sampled_from([" ", "\n        ", "  "]))

    def items(depth):
        out = []
        for _ in range(draw(st.integers(1, 3))):
            choice = draw(st.integers(0, 2 if depth < 2 else 0))
            if choice == 0:
                out.append(draw(st.sampled_from(names)))
            elif choice == 1:
                out.append(f"repeat {draw(st.integers(1, 3))} {{ {' '.join(items(depth + 1))} }}")
            else:
                out.append('pattern "' + "".join(draw(st.lists(st.sampled_from("A" + other), min_size=1, max_size=5)))
                           + '"')
        return out

    lines = ["# generated", f"const sign = {run}1", "model gen {", f"    vocab = {draw(st.integers(2, 600))} * sign * sign",
             f"    d_model = {draw(st.sampled_from(['64', '32 * 2', '2 ** 6', '128 / 2']))}"]
    lines += [f"    layer {n} = {d}  # {n}" for n, d in defs.items()]
    lines.append(f'    legend {{ A = {names[0]}, "{other}" = {names[-1]} }}')
    lines.append("    stack {" + sep + sep.join(items(0)) + sep + "}")
    lines.append("}")
    return "\n".join(lines) + "\n"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs())
def test_random_specs_round_trip(text):
    try:
        original = ltmdsl.loads(text)
    except SpecError as e:  # a generated spec may be invalid (an unused layer, say): fmt must keep that too
        with pytest.raises(SpecError) as again:
            ltmdsl.loads(fmt_text(text))
        assert [d.message for d in again.value.errors] == [d.message for d in e.errors]
        return
    out = fmt_text(text)
    assert ir_meaning(ltmdsl.loads(out).ir) == ir_meaning(original.ir)
    assert fmt_text(out) == out


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300).map(lambda b: b.decode("latin-1"))))
def test_garbage_only_raises_spec_error(text):
    with contextlib.suppress(SpecError):  # anything else (a KeyError, a RecursionError) fails the test
        ltmdsl.loads(text + "\n")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["model", "m", "{", "}", "(", ")", "=", "stack", "layer", "mlp", "d_ff", "1",
                                 "repeat", "pattern", '"A"', "legend", "budget", "for", "on", "x", "require",
                                 "inference", "context", ",", "1M", "GB", "**", "-", "/", "none", "use"]),
                max_size=40))
def test_token_soup_only_raises_spec_error(tokens):
    with contextlib.suppress(SpecError):
        ltmdsl.loads(" ".join(tokens) + "\n")


def test_fmt_output_parses_for_non_ascii_symbols_and_minus_runs():
    text = 'const a = ' + "- " * 70 + '1\nmodel m { vocab = 256 d_model = 64 layer f = mlp(d_ff = 8) legend { "é" = f }' \
           ' stack { pattern "éé" } }\n'
    out = fmt_text(text)
    assert '"é" = f' in out and "--" not in out
    assert ir_meaning(ltmdsl.loads(out).ir) == ir_meaning(ltmdsl.loads(text).ir)
    assert fmt_text(out) == out


def test_comments_stay_in_their_block():
    text = ("model m {\n    vocab = 256\n    d_model = 64\n    layer f = mlp(d_ff = 8)\n    stack {\n        f\n"
            "        # end of stack\n    }\n    # end of model\n}\n\n# about the budget\nbudget b for m {\n"
            "    inference context = 4Ki\n    # end of budget\n}\n")
    lines = fmt_text(text).splitlines()
    assert lines.index("# about the budget") == lines.index("budget b for m {") - 1
    assert lines.index("        # end of stack") < lines.index("    }") < lines.index("    # end of model")
    assert lines[lines.index("    # end of budget") + 1] == "}"


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.ltm")))
def test_every_example_is_canonical(name, capsys):
    """CI runs `ltmdsl fmt --check` on every bundled example through this test."""
    from ltmdsl.cli import main

    assert main(["fmt", "--check", str(EXAMPLES / name)]) == 0, capsys.readouterr().err
