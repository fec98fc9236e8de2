"""Diagnostics: safe for a terminal, pointing at the line the lexer means, short for hostile input, said once."""

import time

import pytest

import ltmdsl
from ltmdsl import SpecError
from ltmdsl.cli import main
from ltmdsl.errors import Diagnostic, escape, split_lines

GOOD = "model m {\n    vocab = 256\n    d_model = 64\n    layer f = mlp(d_ff = 8)\n    stack { f }\n}\n"


def errors_of(text: str) -> list:
    with pytest.raises(SpecError) as info:
        ltmdsl.loads(text)
    return info.value.errors


@pytest.mark.parametrize("evil", ["\x1b[2J", "\x1b]0;owned\x07", "\x9b31m", "\x00", "\x7f", "\u202e"],
                         ids=["csi", "osc-title", "c1-csi", "nul", "del", "bidi-override"])
def test_control_characters_are_escaped_everywhere(evil, tmp_path, capsys):
    path = tmp_path / "evil.ltm"
    # in a comment on the failing line, in a legend symbol string and in the bad character itself
    path.write_text(f'model m {{ vocab = 256 d_model = 64 layer f = mlp(d_ff = 8)\n'
                    f'legend {{ "{evil}" = g }} stack {{ f }} }}  # {evil}\n', encoding="utf-8")
    assert main(["check", str(path)]) == 1
    err = capsys.readouterr().err
    assert evil not in err
    assert escape(evil) in err


def test_caret_stays_under_the_column_after_escapes():
    d = Diagnostic("f", 1, 5, "m", source_line="ab\x1bcdef")
    line, caret = d.render().splitlines()[1:]
    assert line[caret.index("^")] == "d"


@pytest.mark.parametrize("sep", ["\r", "\u2028", "\u2029", "\x0c", "\x85", "\x1c"],
                         ids=["cr", "u2028", "u2029", "ff", "nel", "fs"])
def test_line_of_the_caret_matches_the_lexer(sep):
    # the break sits in a comment (where the lexer does not end a line); the error is two lines further down
    text = f"# one{sep}still the first line\nmodel m {{\n    vocab = $\n}}\n"
    (d,) = errors_of(text)
    assert (d.line, d.col) == (3, 13)
    assert d.source_line == "    vocab = $"
    assert split_lines(text)[d.line - 1] == d.source_line


def test_crlf_lines_show_without_the_cr():
    (d,) = errors_of(GOOD.replace("\n", "\r\n").replace("d_ff = 8", "d_ff = $"))
    assert d.render().splitlines()[1] == "        layer f = mlp(d_ff = $)"


def test_a_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.ltm"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode())
    assert ltmdsl.load(path).model.d_model == 64
    assert ltmdsl.loads("\ufeff" + GOOD).model.d_model == 64
    (d,) = errors_of("\ufeffmodel m { vocab = $ }\n")
    assert (d.line, d.col) == (1, 19) and d.source_line.startswith("model")


def test_long_lines_are_shown_as_a_window_around_the_caret():
    d = Diagnostic("f", 1, 50_001, "m", source_line="a" * 50_000 + "$" + "b" * 50_000)
    _, line, caret = d.render().splitlines()
    assert len(line) < 250
    assert line[caret.index("^")] == "$"
    assert len(Diagnostic("f", 1, 1, "x" * 10**6).render()) < 500


def test_a_4_mib_pattern_is_linear_and_short():
    body = "X" * (4 * 2**20 - 200)
    text = GOOD.replace("stack { f }", f'legend {{ F = f }}\n    stack {{ pattern "F{body}" }}')
    start = time.perf_counter()
    errors = errors_of(text)
    elapsed = time.perf_counter() - start
    assert len(errors) == 1 and "'X' is not in the legend" in errors[0].message
    assert len(SpecError(errors).render()) < 1000
    assert elapsed < 20, f"{elapsed:.1f} s"


def test_a_huge_valid_pattern_stops_at_the_sub_layer_limit():
    text = GOOD.replace("stack { f }", f'legend {{ F = f }}\n    stack {{ pattern "{"F" * 200_000}" }}')
    (d,) = errors_of(text)
    assert "more than 100000 sub-layers" in d.message


def test_a_legend_typo_is_reported_once():
    text = GOOD.replace("stack { f }", 'legend { F = ff, G = f }\n    stack { pattern "FGFGFF" f }')
    (d,) = errors_of(text)
    assert "legend symbol 'F' names unknown layer 'ff'" in d.message


def test_an_unknown_pattern_symbol_is_reported_once_with_a_count():
    text = GOOD.replace("stack { f }", 'legend { F = f }\n    stack { pattern "FXFXX" }')
    (d,) = errors_of(text)
    assert "'X' is not in the legend (3 times in this pattern)" in d.message
    assert d.col == len('    stack { pattern "F') + 1


def test_a_broken_layer_is_reported_once_whatever_the_path_to_it():
    text = GOOD.replace("layer f = mlp(d_ff = 8)", "layer f = mlp(d_ff = 8)\n    layer a = attention(heads = 4, kv_heads = 5)"
                        ).replace("stack { f }", "stack { a(window = 8) a f }")
    (d,) = errors_of(text)
    assert "multiple of kv_heads (5)" in d.message


def test_a_long_legend_symbol_is_not_echoed_in_full():
    (d,) = errors_of(GOOD.replace("stack { f }", 'legend { "' + "Z" * 100_000 + '" = f }\n    stack { f }'))
    assert "(100000 characters)" in d.message and len(d.message) < 200
