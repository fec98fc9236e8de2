"""Dependencies match the facets: the core install (lark, sympy, jinja2) runs check, show, fmt, memory,
compile and import-hf of a config; a command that needs an extra says which one to install (exit 2, one
line, no traceback). Each case runs in a subprocess whose imports of the optional packages fail, as on a
machine where only `pip install ltmdsl` ran, and which fails if any of them got imported anyway."""

import subprocess
import sys

import pytest

from paths import ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

OPTIONAL = ("torch", "numpy", "safetensors", "triton", "matplotlib", "tqdm")

#: Runs `ltmdsl ARGS` (or the Python code after `--api`) with every optional package refused at import.
BLOCKED = f"""
import sys
OPTIONAL = {set(OPTIONAL)!r}

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in OPTIONAL:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, Refuse())
if sys.argv[1] == "--api":
    exec(sys.argv[2])
    code = 0
else:
    from ltmdsl.cli import main
    code = main(sys.argv[1:])
imported = sorted(m for m in sys.modules if m.split(".")[0] in OPTIONAL)
assert not imported, f"optional packages imported: {{imported}}"
sys.exit(code)
"""

SPEC = "examples/ltm-100m.ltm"


def blocked(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKED, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("args", [
    ("check", SPEC), ("show", SPEC), ("fmt", SPEC), ("memory", SPEC), ("memory", SPEC, "--json"),
    ("emit", SPEC), ("import-hf", "tests/hf/configs/Jamba-v0.1.json"),
], ids=["check", "show", "fmt", "memory", "memory-json", "emit", "import-hf"])
def test_core_commands_run_without_the_optional_packages(args):
    run = blocked(*args)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() and "Traceback" not in run.stderr


def test_compile_writes_kernels_without_the_optional_packages(tmp_path):
    run = blocked("compile", SPEC, "-o", str(tmp_path / "kernels"))
    assert run.returncode == 0, run.stderr
    assert any((tmp_path / "kernels").iterdir())


@pytest.mark.parametrize("args, package, extra", [
    (("memory", SPEC, "--plot", "PLOT"), "matplotlib", "plot"),
    (("stream", SPEC, "--tokens", "4"), "torch", "runtime"),
    (("export-hf", "examples/tiny-jamba.ltm", "OUT"), "safetensors", "runtime"),
], ids=["memory-plot", "stream", "export-hf"])
def test_a_command_whose_extra_is_missing_names_it(tmp_path, args, package, extra):
    args = [str(tmp_path / a) if a in ("PLOT", "OUT") else a for a in args]
    run = blocked(*args)
    assert run.returncode == 2
    assert run.stderr == (f"ltmdsl {args[0]}: error: this needs {package}, which is not installed; install the "
                          f"'{extra}' extra: pip install 'ltmdsl[{extra}]'\n")
    assert not list(tmp_path.iterdir())  # refused before writing anything


def test_the_api_names_the_extra_for_build():
    run = blocked("--api", f"import ltmdsl\nltmdsl.build({SPEC!r})")
    assert run.returncode == 1
    assert run.stderr.strip().endswith("ModuleNotFoundError: this needs torch, which is not installed; install the "
                                       "'runtime' extra: pip install 'ltmdsl[runtime]'")


def test_pyproject_extras_match_the_facets():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = lambda reqs: {r.split(">")[0].split(";")[0].split("[")[0].strip() for r in reqs}  # noqa: E731
    assert names(project["dependencies"]) == {"lark", "sympy", "jinja2"}
    extras = project["optional-dependencies"]
    assert names(extras["runtime"]) == {"torch", "safetensors", "numpy", "tqdm"}
    assert names(extras["triton"]) == {"ltmdsl", "triton"} and "ltmdsl[runtime]" in extras["triton"]
    assert names(extras["plot"]) == {"matplotlib"}
    assert extras["all"] == ["ltmdsl[runtime,triton,plot]"] and "ltmdsl[all]" in extras["dev"]
    # every package the CLI maps to an extra is in that extra
    from ltmdsl.cli import EXTRAS

    for package, extra in EXTRAS.items():
        assert package in names(extras[extra]), (package, extra)
