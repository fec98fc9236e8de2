"""What one rank holds of the model states, in bytes, to set beside the memory model's per-GPU figures.

    rank_state_bytes(model, optimizer) -> {"weights": ..., "gradients": ..., "optimizer": ...}

Counted from this rank's local tensors (a DTensor's local shard, not its global size): parameters, their
`.grad`, and the optimizer's per-parameter state tensors (AdamW's m and v; its one-element `step` counter
is bookkeeping the memory model does not count). The distributed optimizer (ZeRO 1) holds state for its
own shard only, which is what is counted. Call it after a step, when gradients and state exist.
"""

from __future__ import annotations

import torch

COMPONENTS = ("weights", "gradients", "optimizer")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _bytes(t: torch.Tensor) -> int:
    t = _local(t)
    return t.numel() * t.element_size()


def rank_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of this rank's weights, gradients and optimizer state (module docstring)."""
    params = list(model.parameters())
    inner = getattr(optimizer, "optim", optimizer)  # the distributed optimizer wraps the local one
    state = sum(_bytes(v) for s in inner.state.values() for k, v in s.items()
                if k != "step" and isinstance(v, torch.Tensor))
    return {
        "weights": sum(_bytes(p) for p in params),
        "gradients": sum(_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer": state,
    }
