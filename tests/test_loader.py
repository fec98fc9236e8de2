"""ltmdsl/loader.py: an explicit path loader and text loader, safe file reading for `use`, and the
standalone text (root + imports) that checkpoints embed, which must always load back to the same IR."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import ltmdsl
from ltmdsl import SpecError
from ltmdsl.parser import MAX_FILE_BYTES
from paths import EXAMPLES, ROOT
from spec_utils import ir_meaning
from test_fmt import specs

#: Characters Python's str.splitlines() (and Unicode) treat as line breaks, which the grammar does not.
LINE_SEPARATORS = ["\r", "\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e"]


def _with_use(text: str, comments: list[str]) -> tuple[str, str]:
    """(root, lib): the spec's vocab moved into a constant of an imported file, comments injected in both."""
    import re

    vocab = re.search(r"vocab = (\d+)", text).group(1)
    root_lines = text.replace(f"vocab = {vocab}", "vocab = lib_vocab").split("\n")
    use_line = f'use "lib.ltm"  # {comments[0]}'
    root = "\n".join([f"# {comments[1]}", use_line, f"# {comments[2]}"] + root_lines)
    lib = f"# {comments[3]}\nconst lib_vocab = {vocab}  # {comments[4]}\n# {comments[5]}"
    return root, lib


_comment = st.builds(lambda a, sep, b: f"{a}{sep}{b}", st.sampled_from(["note", "", "x = 1"]),
                     st.sampled_from(LINE_SEPARATORS),
                     st.sampled_from(['model junk {', 'use "missing.ltm"', "}", "const q = ", "é ✓ ½"]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs(), st.lists(_comment, min_size=6, max_size=6), st.booleans())
def test_standalone_text_loads_back_to_the_same_ir(text, comments, trailing_newline):
    with tempfile.TemporaryDirectory() as d:
        root, lib = _with_use(text, comments)
        Path(d, "lib.ltm").write_text(lib + ("\n" if trailing_newline else ""), encoding="utf-8", newline="")
        Path(d, "root.ltm").write_text(root, encoding="utf-8", newline="")
        try:
            spec = ltmdsl.load(Path(d, "root.ltm"))
        except SpecError:
            assume(False)  # the corpus holds invalid specs too (an unused layer, say)
        standalone = spec.model.source_text
        again = ltmdsl.loads(standalone, name="standalone.ltm")
        assert ir_meaning(again.ir) == ir_meaning(spec.ir)


@pytest.mark.parametrize("sep", LINE_SEPARATORS, ids=[f"U+{ord(c):04X}" for c in LINE_SEPARATORS])
def test_checkpoint_of_a_spec_with_a_line_separator_in_a_comment_loads(tmp_path, sep):
    from ltmdsl.runtime.checkpoint import save

    (tmp_path / "lib.ltm").write_text("const v = 256\n")
    body = (EXAMPLES / "tiny-hybrid.ltm").read_text().replace("vocab = 256", "vocab = v")
    (tmp_path / "m.ltm").write_text(f'# a comment{sep}model junk {{\nuse "lib.ltm"\n' + body, newline="")
    model = ltmdsl.build(tmp_path / "m.ltm")
    save(model, tmp_path / "m.safetensors")
    again = ltmdsl.load_checkpoint(tmp_path / "m.safetensors")
    assert model_meaning(again.ir) == model_meaning(model.ir)


def model_meaning(ir):
    from spec_utils import _strip

    return _strip(ir.to_json())


# ---- one loader for paths, one for text: nothing guesses ------------------------------------------

def test_load_takes_only_paths(tmp_path, monkeypatch):
    weird = tmp_path / "we{ird}.ltm"
    weird.write_text((EXAMPLES / "tiny-hybrid.ltm").read_text())
    assert ltmdsl.load(str(weird)).model.name == "tiny_hybrid"  # braces in a file name are a file name
    with pytest.raises(SpecError, match="no such file"):
        ltmdsl.load("model m {\n vocab = 2\n}\n")
    with pytest.raises(TypeError, match="loads"):
        ltmdsl.load(b"model m {}")


def test_loads_takes_only_text(tmp_path, monkeypatch):
    monkeypatch.chdir(EXAMPLES)
    with pytest.raises(SpecError) as e:
        ltmdsl.loads("tiny-hybrid.ltm")  # parsed as spec text, never opened
    assert all(d.file == "<string>" for d in e.value.diagnostics)
    with pytest.raises(TypeError, match="load"):
        ltmdsl.loads(Path("tiny-hybrid.ltm"))


def test_checkpoint_spec_metadata_is_text_never_a_path(tmp_path):
    from safetensors.torch import save_file
    import torch

    victim = tmp_path / "victim.ltm"
    victim.write_text((EXAMPLES / "tiny-hybrid.ltm").read_text())
    save_file({"x": torch.zeros(1)}, str(tmp_path / "c.safetensors"),
              metadata={"ltmdsl.spec": str(victim), "ltmdsl.model": "tiny_hybrid"})
    with pytest.raises(SpecError):  # the path string does not parse as a spec; the file is not read
        ltmdsl.load_checkpoint(tmp_path / "c.safetensors")


# ---- `use` and the command line read only regular files, and only as much as the limit --------------

def _check(path, timeout=60):
    return subprocess.run([sys.executable, "-m", "ltmdsl.cli", "check", str(path)], capture_output=True,
                          text=True, timeout=timeout, cwd=path.parent)


def test_a_fifo_does_not_hang_check(tmp_path):
    os.mkfifo(tmp_path / "pipe.ltm")
    (tmp_path / "m.ltm").write_text('use "pipe.ltm"\n' + (EXAMPLES / "tiny-hybrid.ltm").read_text())
    r = _check(tmp_path / "m.ltm")
    assert r.returncode == 1 and "not a regular file" in r.stderr and "Traceback" not in r.stderr
    r = _check(tmp_path / "pipe.ltm")
    assert r.returncode == 2 and "not a regular file" in r.stderr


@pytest.mark.parametrize("target", ["/proc/self/environ", "/proc/self/status", "/dev/zero", "/dev/null"])
def test_system_files_are_refused_and_never_echoed(tmp_path, target):
    (tmp_path / "m.ltm").write_text(f'use "{target}"\n' + (EXAMPLES / "tiny-hybrid.ltm").read_text())
    r = _check(tmp_path / "m.ltm")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "system file" in r.stderr or "not a regular file" in r.stderr
    assert "PATH=" not in r.stderr and "Uid:" not in r.stderr


def _bytes_read() -> int:
    """Bytes this process has read through read() system calls (Linux /proc/self/io)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux /proc/self/io")
def test_oversized_files_are_refused_without_reading_them(tmp_path):
    big = tmp_path / "big.ltm"
    with open(big, "wb") as f:
        f.truncate(64 * 2**20)  # sparse: 64 MiB
    (tmp_path / "m.ltm").write_text('use "big.ltm"\n' + (EXAMPLES / "tiny-hybrid.ltm").read_text())
    for path in (big, tmp_path / "m.ltm"):
        before = _bytes_read()
        with pytest.raises(SpecError, match="limited to"):
            ltmdsl.load(path)
        assert _bytes_read() - before <= MAX_FILE_BYTES + 1 + 2**20  # the limit + 1, plus the small files


# ---- the runtime and the code generator take IR and never import the parser --------------------

def test_runtime_and_codegen_do_not_import_the_parser():
    code = ("import ltmdsl.runtime, ltmdsl.codegen, sys\n"
            "import ltmdsl.runtime.build, ltmdsl.runtime.checkpoint, ltmdsl.codegen.cache\n"
            "bad = [m for m in ('lark', 'ltmdsl.parser', 'ltmdsl.loader') if m in sys.modules]\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr


def test_runtime_build_refuses_paths_and_text():
    from ltmdsl.runtime.build import build

    with pytest.raises(TypeError, match="ModelIR"):
        build(str(EXAMPLES / "tiny-hybrid.ltm"))


def test_check_reads_a_file_whose_name_looks_like_spec_text(tmp_path, capsys):
    from ltmdsl.cli import main

    weird = tmp_path / "we{ird}\nname.ltm"
    weird.write_text((EXAMPLES / "tiny-hybrid.ltm").read_text())
    assert main(["check", str(weird)]) == 0


def test_every_public_name_resolves():
    for name in ltmdsl.__all__:
        assert getattr(ltmdsl, name) is not None and name in dir(ltmdsl)
    with pytest.raises(AttributeError):
        ltmdsl.no_such_name
