"""The documentation cannot rot: the README's commands and snippets run, CI runs the README's test command,
and the repository cites only what it contains."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from paths import ROOT

README = (ROOT / "README.md").read_text()


def section(text: str, heading: str) -> str:
    """The body of the `## heading` section of a Markdown text, up to the next `## ` heading."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"README.md has no '## {heading}' section"
    return match.group(1)


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def test_readme_test_command_activates_the_venv_and_is_what_ci_runs():
    blocks = [b.strip() for b in code_blocks(README, "bash") if "pytest" in b]
    assert len(blocks) == 1, "the README gives one test command"
    command = blocks[0]
    # a new shell has no venv on PATH: the command must activate it itself
    assert command.startswith(". .venv/bin/activate && "), command
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci, f".ci/run must run the README's test command exactly: {command!r}"


def test_readme_train_snippet_runs(tmp_path):
    """The "Train it" snippet, extracted verbatim and run from the checkout in a fresh interpreter: the loss
    goes down, the checkpoint round-trips, and nothing is written into the checkout."""
    blocks = code_blocks(section(README, "Train it"), "python")
    assert len(blocks) == 1
    snippet = blocks[0]
    assert "model.loss" in snippet and "AdamW" in snippet and "checkpoint.save" in snippet
    before = set(ROOT.iterdir())
    done = subprocess.run([sys.executable, "-c", snippet], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.fullmatch(r"loss \d+\.\d{3} -> \d+\.\d{3}\n", done.stdout), done.stdout
    assert set(ROOT.iterdir()) <= before, "the snippet wrote into the checkout"


REFERENCE_CITATION = re.compile(r"REFERENCE\.md")
CITING_SUFFIXES = {".py", ".jinja", ".lark", ".md", ".ltm", ".toml", ".sh", ".cfg", ".txt"}


def test_no_citation_of_files_outside_the_repository():
    """Comments and docs cite papers and state facts; the shared reference notes outside the repository are no source."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    offenders = []
    for name in tracked.stdout.splitlines():
        path = ROOT / name
        if path.suffix in CITING_SUFFIXES and path.is_file() and path.name != "test_docs.py":
            for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if REFERENCE_CITATION.search(line):
                    offenders.append(f"{name}:{n}")
    assert offenders == []


def test_benchmark_results_hold_each_section_once():
    text = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    headings = [line for line in text.splitlines() if line.startswith("#")]
    repeated = sorted({h for h in headings if headings.count(h) > 1})
    assert repeated == [], f"benchmarks/RESULTS.md repeats: {repeated}"
