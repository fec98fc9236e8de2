"""Bytes against context, log-log, one panel per spec, with GPU capacity lines.

Each panel sweeps T over 1K to 1G tokens (100 points, geometric) at the report's batch and draws every
non-zero component of one replica plus their total, and horizontal lines at the capacity of 1 GPU, of
an 8-GPU node and of the budget's GPU count. Matplotlib is imported here only, with the Agg backend,
and the PNG is written atomically (a temporary file in the same folder, then os.replace), so a reader
never sees half an image.
"""

from __future__ import annotations

from ltmdsl import atomic


from ltmdsl.memory.report import MemoryReport

SWEEP_POINTS = 100
SWEEP_RANGE = (10**3, 10**9)
#: One colour per component name, the same in every panel.
COLOURS = {"weights": "C0", "kv_cache": "C1", "recurrent_state": "C2", "activations": "C3", "logits": "C4",
           "gradients": "C5", "optimizer": "C6"}


def sweep_contexts(points: int = SWEEP_POINTS, lo: int = SWEEP_RANGE[0], hi: int = SWEEP_RANGE[1]) -> list[int]:
    """`points` integer contexts spaced geometrically from lo to hi (inclusive)."""
    ratio = (hi / lo) ** (1 / (points - 1))
    return sorted({round(lo * ratio**i) for i in range(points)} | {hi})


def plot_reports(reports: list[MemoryReport], path: str) -> None:
    """Draw one log-log panel per report and write the PNG atomically to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sweep_contexts()
    fig, axes = plt.subplots(1, len(reports), figsize=(6.5 * len(reports), 5), squeeze=False, sharey=True)
    for ax, r in zip(axes[0], reports):
        data = r.sweep(contexts)
        for name in r.components:
            ys = data[name]
            if any(ys):
                ax.plot(contexts, [max(y, 1) for y in ys], label=name, color=COLOURS.get(name))
        ax.plot(contexts, data["total"], color="black", linewidth=2, label="total")
        cap = r.settings.gpu.memory_bytes
        counts = sorted({1, 8, r.settings.gpus})
        for n in counts:
            ax.axhline(n * cap, linestyle="--", linewidth=0.8, color="grey")
            ax.text(contexts[0], n * cap * 1.1, f"{n} x {r.settings.gpu.name}", fontsize=7, color="grey")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("context T (tokens)")
        ax.set_title(f"{r.model} ({r.settings.mode}, B={r.settings.batch})", fontsize=10)
        ax.grid(True, which="major", linewidth=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("bytes (one replica)")
    fig.tight_layout()
    try:
        with atomic.temporary_sibling(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)
