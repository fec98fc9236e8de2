"""Live bytes over the traced step: a MemTracker plus named snapshots, so each component is a difference of
two snapshots and the peak is known together with the phase in which it was reached.

`torch.distributed._tools.mem_tracker.MemTracker` sees every storage created under it (and the modules and
tensors given to `track_external`) and drops it when the storage is freed, on fake tensors as on real ones.
Its "peak" snapshot is monotonic, so the phase of the peak is the last phase after which the peak grew.

`StepTracker` is MemTracker counting storages only. Here only its totals are read (current and peak),
never its per-module statistics, whose upkeep costs every dispatched op a walk over every module called so
far (O(ops x modules): a third of tiny-hybrid's traced step under cProfile) and refuses a module called a
second time at the top level of a step (taken for the next iteration), as a shared block's modules are, once
per use. Its module hooks do nothing: the storages and their totals are tracked by the same dispatch mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch.distributed._tools.mem_tracker import MemTracker

TOTAL = "Total"  # MemTracker's key for all categories together


def _total(snapshot: dict) -> int:
    return sum(dev.get(TOTAL, 0) for dev in snapshot.values())


@dataclass
class Timeline:
    """A MemTracker (entered by the caller, inside the FakeTensorMode) and the snapshots taken so far."""

    tracker: object
    marks: list[tuple[str, int, int]] = field(default_factory=list)  # (phase, live bytes, peak so far)

    def live(self) -> int:
        """Live bytes now (storages are dropped when their last reference goes, so no collection is needed)."""
        return _total(self.tracker.get_tracker_snapshot("current"))

    def peak(self) -> int:
        return _total(self.tracker.get_tracker_snapshot("peak"))

    def mark(self, phase: str) -> int:
        """Record the end of `phase`; returns the live bytes."""
        live = self.live()
        self.marks.append((phase, live, self.peak()))
        return live

    def peak_phase(self) -> str | None:
        """The phase during which the peak was reached (the last one after which it grew)."""
        best, prev = None, -1
        for phase, _live, peak in self.marks:
            if peak > prev:
                best, prev = phase, peak
        return best



class StepTracker(MemTracker):
    """MemTracker without per-module statistics (module docstring): the same storage accounting and totals."""

    def _pre_fw_hook(self, module, inputs) -> None:
        pass

    def _post_fw_hook(self, module, inputs, outputs) -> None:
        pass

    def _pre_bw_hook(self, module, args) -> None:
        pass

    def _post_bw_hook(self, module, args) -> None:
        pass
