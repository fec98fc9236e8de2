"""A run's metrics: one JSON object per optimizer step in DIR/metrics.jsonl, and a plot of them.

Lines are appended and flushed as steps finish. On resume the file is cut back (atomically) to the
checkpoint's step, so a run interrupted between a metrics line and its checkpoint never shows a step twice.
The plot (loss and answer-token accuracy against step) needs matplotlib; without it the run goes on and
says once that no plot was drawn.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ltmdsl import atomic

METRICS = "metrics.jsonl"
PLOT = "training.png"


def read(path: str | os.PathLike) -> list[dict]:
    """The metric lines of a metrics.jsonl (a missing file has none); unreadable lines are an error."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON line ({e.msg})") from None
    return out


def truncate(path: str | os.PathLike, step: int) -> None:
    """Keep only the lines of steps <= `step` (the last checkpoint's)."""
    kept = [m for m in read(path) if m.get("step", 0) <= step]
    atomic.write_text(path, "".join(json.dumps(m) + "\n" for m in kept))


class MetricsLog:
    """Appends one line per step to DIR/metrics.jsonl."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / METRICS
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> str:
        line = json.dumps(record)
        self._file.write(line + "\n")
        self._file.flush()
        return line

    def close(self) -> None:
        self._file.close()


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


MISSING_MATPLOTLIB = "matplotlib is not installed, so no plot was drawn (pip install matplotlib)"


def plot_training(records: list[dict], path: str | os.PathLike, title: str) -> bool:
    """Loss (log scale) and answer-token accuracy against step, written atomically; False without matplotlib."""
    if not have_matplotlib() or not records:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(steps, [r["loss"] for r in records], linewidth=1)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("answer loss (nats)")
    ax_acc.plot(steps, [r["answer_token_acc"] for r in records], linewidth=1)
    ax_acc.set_ylim(0, 1.02)
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("answer-token accuracy (teacher forced)")
    for ax in (ax_loss, ax_acc):
        ax.grid(True, linewidth=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        with atomic.temporary_sibling(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return True
