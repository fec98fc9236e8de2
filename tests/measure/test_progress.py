"""The trace's progress counter (ltmdsl/measure/progress.py): it counts the step's ops on a terminal, shows
nothing elsewhere, and the traced bytes are the same with it as without it."""

from __future__ import annotations

import io

import pytest

import ltmdsl
from ltmdsl.measure import measure
from tests.measure.test_measure import DENSE


class Terminal(io.StringIO):
    """stderr as a terminal, so that tqdm draws the bar."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def spec():
    return ltmdsl.loads(DENSE)


@pytest.mark.parametrize("budget", ["train", "serve"])
def test_the_counter_changes_no_traced_byte(spec, budget):
    b = next(x for x in spec.budgets if x.name == budget)
    plain, shown = measure(spec.model, b), measure(spec.model, b, progress=True)
    assert plain.measured == shown.measured and plain.peak_bytes == shown.peak_bytes
    assert plain.peak_phase == shown.peak_phase


def test_the_counter_counts_the_steps_ops_on_a_terminal(spec, monkeypatch):
    from ltmdsl.measure import progress

    seen = []
    real = progress.OpProgress.__exit__

    def close(self, *exc):  # what the bar had counted when the step ended
        real(self, *exc)
        seen.append(self.bar.n)

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    monkeypatch.setattr(progress.OpProgress, "__exit__", close)
    b = next(x for x in spec.budgets if x.name == "train")
    m = measure(spec.model, b, progress=True)
    (ops,) = seen
    assert ops > 1000  # the step's forward, backward and AdamW step, every op counted
    assert "tracing dense (training, 256 tokens)" in terminal.getvalue() and m.measured["weights"] > 0


def test_no_counter_off_a_terminal(spec, capsys):
    b = next(x for x in spec.budgets if x.name == "serve")
    measure(spec.model, b, progress=True)  # pytest's captured stderr is not a terminal
    assert "tracing" not in capsys.readouterr().err
