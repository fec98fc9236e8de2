"""Live bytes over the traced step: a MemTracker plus named snapshots, so each component is a difference of
two snapshots and the peak is known together with the phase in which it was reached.

`torch.distributed._tools.mem_tracker.MemTracker` sees every storage created under it (and the modules and
tensors given to `track_external`) and drops it when the storage is freed, on fake tensors as on real ones.
Its "peak" snapshot is monotonic, so the phase of the peak is the last phase after which the peak grew.

MemTracker also keeps per-module statistics, and takes a module called a second time at the top level of a
step for the next iteration, which it refuses; a submodule called several times within one module call it
follows (torch's `_pre_fw_hook`, its case 3). A shared block's modules run once per use, so every traced
forward runs inside one module call of its own (`tracked_call`): the shared modules are then submodules of
that call, used as often as the stack uses them. Only the totals are read here; the wrapper allocates nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

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


class _Call(nn.Module):
    """One traced forward as a module call (module docstring); a fresh instance per call, so that it is never
    itself a module called twice."""

    def forward(self, fn, *args):
        return fn(*args)


def tracked_call(fn, *args):
    """fn(*args) inside a module call of its own, so that MemTracker follows modules that fn runs more than
    once (a shared block's uses); the arguments are held for the call, as the caller holds them anyway."""
    return _Call()(fn, *args)
