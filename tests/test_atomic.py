"""ltmdsl/atomic.py: output folders are replaced only when provably ltmdsl's own, swapped in whole, with
ordinary file modes, and concurrent writers of one folder neither fail nor leave folders behind."""

import json
import os
import subprocess
import sys

import pytest

from ltmdsl import atomic
from ltmdsl.cli import main
from paths import EXAMPLES

TINY = str(EXAMPLES / "tiny-hybrid.ltm")


def _write(folder, files):
    with atomic.directory(folder) as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text)


def _forged_record(folder, listed):
    record = {"format": atomic.OUTPUT_FORMAT,
              "files": {name: {"size": 1, "sha256": "0" * 64} for name in listed}}
    (folder / atomic.OUTPUT_RECORD).write_text(json.dumps(record))


def _foreign_manifest(folder):
    (folder / "manifest.json").write_text('{"kernels": []}')


def _forged_partial_record(folder):
    _forged_record(folder, ["manifest.json"])


def _forged_full_record(folder):  # lists every file, but not with their real contents
    _forged_record(folder, ["notes.txt"])


def _garbage_record(folder):
    (folder / atomic.OUTPUT_RECORD).write_text("[1, 2")


@pytest.mark.parametrize("forge", [_foreign_manifest, _forged_partial_record, _forged_full_record, _garbage_record],
                         ids=["manifest.json", "record-without-the-user-file", "record-with-wrong-hash", "garbage"])
def test_user_files_beside_a_forged_manifest_survive_compile(tmp_path, capsys, forge):
    out = tmp_path / "kernels"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    forge(out)
    before = sorted(os.listdir(out))
    assert main(["compile", TINY, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not an earlier ltmdsl output" in err and "Traceback" not in err
    assert (out / "notes.txt").read_text() == "keep me" and sorted(os.listdir(out)) == before
    assert sorted(os.listdir(tmp_path)) == ["kernels"]


def test_own_output_is_replaced_and_empty_folder_is_fine(tmp_path, capsys):
    out = tmp_path / "kernels"
    out.mkdir()
    assert main(["compile", TINY, "-o", str(out)]) == 0
    first = sorted(os.listdir(out))
    assert atomic.OUTPUT_RECORD in first and "manifest.json" in first
    assert main(["compile", TINY, "-o", str(out), "--target", "interpreter"]) == 0
    assert json.loads((out / "manifest.json").read_text())["target"] == "interpreter"
    assert sorted(os.listdir(tmp_path)) == ["kernels"]


def test_an_edited_own_output_is_not_replaced(tmp_path, capsys):
    out = tmp_path / "o"
    _write(out, {"a.txt": "1"})
    (out / "a.txt").write_text("my edit")
    with pytest.raises(atomic.NotOwnOutput, match="was changed"):
        _write(out, {"a.txt": "2"})
    assert (out / "a.txt").read_text() == "my edit"


def test_an_extra_folder_is_not_replaced(tmp_path):
    out = tmp_path / "o"
    _write(out, {"a.txt": "1"})
    (out / "mine").mkdir()
    with pytest.raises(atomic.NotOwnOutput, match="folder ltmdsl did not write, mine"):
        _write(out, {"a.txt": "2"})
    assert (out / "mine").is_dir()


@pytest.mark.parametrize("where", ["inside", "target"])
def test_symlinks_are_refused(tmp_path, where):
    out = tmp_path / "o"
    _write(out, {"a.txt": "1"})
    if where == "inside":
        (out / "link").symlink_to(tmp_path)
        target = out
    else:
        target = tmp_path / "link"
        target.symlink_to(out)
    with pytest.raises(atomic.NotOwnOutput, match="symlink"):
        _write(target, {"a.txt": "2"})
    assert (out / "a.txt").read_text() == "1"


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077], ids=["022", "027", "077"])
def test_written_files_get_the_mode_open_would_give(tmp_path, mask):
    old = os.umask(mask)
    try:
        _write(tmp_path / "o", {"a.txt": "1"})
        atomic.write_text(tmp_path / "f.txt", "x")
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    plain = os.stat(tmp_path / "plain.txt").st_mode & 0o777
    assert plain == 0o666 & ~mask
    assert os.stat(tmp_path / "o" / "a.txt").st_mode & 0o777 == plain
    assert os.stat(tmp_path / "f.txt").st_mode & 0o777 == plain
    assert os.stat(tmp_path / "o").st_mode & 0o777 == 0o777 & ~mask


def test_four_concurrent_compiles_into_one_folder(tmp_path):
    out = tmp_path / "kernels"
    cmd = [sys.executable, "-m", "ltmdsl.cli", "compile", TINY, "-o", str(out)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    for out_text, err, rc in results:
        assert rc == 0, err
    assert sorted(os.listdir(tmp_path)) == ["kernels"]  # no stray .tmp or .old folders
    atomic.check_replaceable(out)  # a complete own output


def _make_unwritable(folder):
    """Read-only for this user; root ignores modes, so it gets the immutable attribute (chattr +i)."""
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
        return lambda: os.chmod(folder, 0o755)
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a folder immutable here")
    return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.mark.parametrize("command", ["compile", "export-hf"])
@pytest.mark.parametrize("dest", ["/proc/x/out", "{ro}/out"], ids=["proc", "read-only-dir"])
def test_unwritable_outputs_are_clear_errors(tmp_path, capsys, dest, command):
    ro = tmp_path / "ro"
    ro.mkdir()
    restore = _make_unwritable(ro) if dest.startswith("{ro}") else (lambda: None)
    src = TINY
    if command == "export-hf":
        src = str(tmp_path / "llama.ltm")
        (tmp_path / "llama.ltm").write_text(
            "model l {\n vocab = 64\n d_model = 32\n norm = rmsnorm(eps = 1e-5)\n"
            " layer a = attention(heads = 2, kv_heads = 1)\n layer f = mlp(d_ff = 64, act = swiglu)\n"
            " stack { a f }\n}\n")
    try:
        code = main([command, src, dest.format(ro=ro)] if command == "export-hf" else
                    [command, src, "-o", dest.format(ro=ro)])
    finally:
        restore()
    err = capsys.readouterr().err
    assert code == 2 and "error: cannot write" in err and "Traceback" not in err
    assert os.listdir(ro) == []
