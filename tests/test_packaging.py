"""Packaging: every package folder is listed in pyproject.toml, and data files ship as package data."""

import sys
from importlib import resources

import pytest

from paths import ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]


def _folder(package: str):
    for prefix, folder in SETUPTOOLS["package-dir"].items():
        if package == prefix or package.startswith(prefix + "."):
            return ROOT / folder / package[len(prefix):].lstrip(".").replace(".", "/")
    return ROOT / package.replace(".", "/")


def test_every_package_folder_is_listed():
    listed = set(SETUPTOOLS["packages"])
    found = set()
    for package in listed:
        for init in _folder(package).glob("*/__init__.py"):
            found.add(f"{package}.{init.parent.name}")
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"


def test_no_top_level_runtime_or_codegen():
    assert "runtime" not in SETUPTOOLS["packages"] and "codegen" not in SETUPTOOLS["packages"]


def test_grammar_and_templates_are_package_data():
    assert resources.files("ltmdsl.grammar").joinpath("ltm.lark").is_file()
    templates = [p.name for p in resources.files("ltmdsl.codegen").joinpath("templates").iterdir()]
    assert "ssd.jinja" in templates and "attention.jinja" in templates
