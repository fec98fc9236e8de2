"""A progress counter over the traced step: the aten ops it has dispatched, their rate and the time so far.

A trace can take from seconds to over an hour (Jamba-v0.1's serve_256k, one rank of tp 2: 71 minutes), all of
it fake-tensor dispatch, so the count of dispatched ops is the step's progress. `OpProgress` is a dispatch mode
entered inside the FakeTensorMode, under the MemTracker: it counts each op and passes it on unchanged (it
creates no tensor and keeps none, so the traced bytes are the same with it or without). It shows no total:
`cost.estimate_ops`, which refuses steps too large to trace, counts a sub-layer's work in coarser steps
(the aten ops of three examples' steps were 3.8 to 12.3 times its estimate), too loosely for a percentage.
"""

from __future__ import annotations

import sys

from torch.utils._python_dispatch import TorchDispatchMode

EVERY = 512  # ops between two updates of the counter (an update costs far more than passing an op on)


class OpProgress(TorchDispatchMode):
    """Counts the ops dispatched under it into a tqdm counter on stderr (shown only on a terminal)."""

    def __init__(self, desc: str):
        super().__init__()
        self.desc, self.pending, self.bar = desc, 0, None

    def __enter__(self):
        from tqdm import tqdm

        self.bar = tqdm(desc=self.desc, unit="op", unit_scale=True, file=sys.stderr, disable=None, leave=False,
                        dynamic_ncols=True)
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.pending += 1
        if self.pending >= EVERY:
            self._flush()
        return func(*args, **(kwargs or {}))

    def _flush(self) -> None:
        self.bar.update(self.pending)
        self.pending = 0

    def __exit__(self, *exc):
        try:
            self._flush()
            self.bar.close()
        finally:
            super().__exit__(*exc)
