"""Predicted against traced: the record `ltmdsl memory --measure` prints, and its JSON.

Per component the memory model's bytes on the most loaded GPU (`MemoryReport.per_gpu_components`, the
report's component names; inference splits the cache into kv_cache and recurrent_state), the traced bytes
and the relative difference (traced - predicted) / predicted; then the traced peak, the phase in which it
was reached and the predicted per-GPU total it is compared with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ltmdsl.units import format_bytes


def rel(measured: int, predicted: int) -> float | None:
    """(measured - predicted) / predicted; None when nothing was predicted (0 against 0 is 0.0)."""
    if predicted == 0:
        return 0.0 if measured == 0 else None
    return (measured - predicted) / predicted


@dataclass
class Measurement:
    """Predicted and traced bytes of one budget's step on one rank."""

    model: str
    budget: str | None
    mode: str
    predicted: dict[str, int]
    measured: dict[str, int]
    peak_bytes: int
    peak_phase: str | None
    predicted_per_gpu: int
    stage: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    phases: list[tuple[str, int, int]] = field(default_factory=list)  # (phase, live, peak so far)
    device: str = "fake"  # "fake": traced on fake tensors; else the device the step ran on for real
    allocated_peak: int | None = None  # a real CUDA run: torch.cuda.max_memory_allocated over the step

    @property
    def relative(self) -> dict[str, float | None]:
        return {c: rel(self.measured.get(c, 0), p) for c, p in self.predicted.items()}

    @property
    def peak_relative(self) -> float | None:
        return rel(self.peak_bytes, self.predicted_per_gpu)

    def to_json(self) -> dict:
        return {
            "model": self.model, "budget": self.budget, "mode": self.mode, "stage": self.stage,
            "predicted": dict(self.predicted), "measured": dict(self.measured), "relative": self.relative,
            "peak_bytes": self.peak_bytes, "peak_phase": self.peak_phase,
            "predicted_per_gpu_bytes": self.predicted_per_gpu, "peak_relative": self.peak_relative,
            "seconds": round(self.seconds, 2), "notes": list(self.notes), "device": self.device,
            **({} if self.allocated_peak is None else {
                "allocated_peak_bytes": self.allocated_peak,
                "allocated_peak_relative": rel(self.allocated_peak, self.predicted_per_gpu)}),
        }

    def to_text(self) -> str:
        head = f"model {self.model}, budget {self.budget or '(defaults)'}, {self.mode}"
        where = "traced on fake tensors" if self.device == "fake" else f"run on {self.device}"
        head += f", {where} in {self.seconds:.1f} s (one rank"
        head += f", pipeline stage {self.stage})" if self.stage else ")"
        rows = [("component", "predicted", "traced", "difference")]
        for c, p in self.predicted.items():
            r = self.relative[c]
            rows.append((c, format_bytes(p), format_bytes(self.measured.get(c, 0)),
                         "n/a" if r is None else f"{100 * r:+.2f}%"))
        pr = self.peak_relative
        rows.append(("per-GPU total / traced peak", format_bytes(self.predicted_per_gpu), format_bytes(self.peak_bytes),
                     "n/a" if pr is None else f"{100 * pr:+.2f}%"))
        if self.allocated_peak is not None:
            ar = rel(self.allocated_peak, self.predicted_per_gpu)
            rows.append(("per-GPU total / CUDA allocator peak", format_bytes(self.predicted_per_gpu),
                         format_bytes(self.allocated_peak), "n/a" if ar is None else f"{100 * ar:+.2f}%"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [head, ""]
        for r in rows:
            lines.append("  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(r, widths))))
        lines.append("")
        lines.append(f"traced peak {self.peak_bytes:,} B ({format_bytes(self.peak_bytes)}) during: {self.peak_phase}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)
