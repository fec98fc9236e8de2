"""Golden diagnostics: every bad spec in tests/golden_errors gives exactly the recorded messages and exit code.

Regenerate after an intended change with LTMDSL_UPDATE_GOLDEN=1 and review the diff. The list of registered
layer kinds some messages end with is recorded as `(kinds: <registered kinds>)`, so registering a kind does not
change a golden file.
"""

import os
from pathlib import Path

import pytest

from ltmdsl.cli import main
from ltmdsl.kinds import REGISTRY

GOLDEN = Path(__file__).parent / "golden_errors"
CASES = sorted(p.stem for p in GOLDEN.glob("*.ltm"))


@pytest.mark.parametrize("case", CASES)
def test_golden_error(case, monkeypatch, capsys):
    monkeypatch.chdir(GOLDEN)
    code = main(["check", f"{case}.ltm"])
    out = capsys.readouterr()
    got = out.err.replace(f"(kinds: {', '.join(REGISTRY)})", "(kinds: <registered kinds>)") + f"exit {code}\n"
    expected_file = GOLDEN / f"{case}.err"
    if os.environ.get("LTMDSL_UPDATE_GOLDEN"):
        expected_file.write_text(got)
    assert got == expected_file.read_text()
    assert code != 0, "a golden error case must fail"
    assert out.out == "", "nothing is printed on stdout for an invalid spec"


def test_catalogue_is_large():
    assert len(CASES) >= 20
