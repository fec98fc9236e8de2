"""The model states one rank holds besides its weights in the traced training step, sized as the memory model
counts them (ltmdsl/memory/training.py), and the AdamW step that updates them.

Mixed precision as Megatron does it: the module's parameters are in the weight dtype; each rank keeps
    main gradients   a flat buffer in the gradient dtype (fp32 by default), allocated up front; each parameter's
                     gradient is added into its slice as soon as autograd has accumulated it, then released
    optimizer        optimizer_bytes_per_param / 4 flat fp32 buffers: for AdamW (12 B) the fp32 master weights,
                     exp_avg and exp_avg_sq
Dense parameters and expert parameters are separate buffers, each sharded as the memory model says: gradients
over N ranks under ZeRO-2, optimizer states under ZeRO-1 or Megatron's distributed optimizer (N = dp*cp for
dense, max(1, dp*cp/ep) for expert parameters); a shard holds ceil(P/N) elements. What a sharded rank does not
simulate: the reduce-scatter (a sharded rank adds nothing into its shard, it only releases each gradient) and
the all-gather of updated weights. Under ZeRO-3 the weights are FSDP2's shards (ltmdsl.distributed), gathered
mixer by mixer by its hooks; the main gradients and optimizer states are these flat shards beside them.

The AdamW step runs over the local flat shard in at most CHUNKS chunks (as multi-tensor kernels do), so its
temporaries stay at two fp32 chunks (8/CHUNKS bytes per parameter); the updated fp32 master weights are copied back into the parameters when unsharded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ltmdsl.memory.settings import Settings

CHUNKS = 32  # AdamW runs over a shard in at most this many chunks (fewer ops to trace; small temporaries)
MIN_CHUNK = 1 << 22  # and in chunks of at least this many elements


@dataclass
class FlatStates:
    """One group's (dense or expert) flat gradient and optimizer buffers on this rank."""

    params: list[torch.nn.Parameter]
    sizes: list[int]  # elements of each parameter this rank covers
    grads: torch.Tensor  # [ceil(P/Ng)] in the gradient dtype
    optimizer: list[torch.Tensor]  # o/4 buffers of [ceil(P/No)] fp32: master, exp_avg, exp_avg_sq, ...
    grads_sharded: bool
    optimizer_sharded: bool

    @property
    def numel(self) -> int:
        return sum(self.sizes)


def _shards(s: Settings, expert: bool) -> int:
    n = s.dp * s.cp
    return max(1, n * s.tp // (s.etp * s.ep)) if expert else n  # expert: edp, ltmdsl/memory/training.py


def allocate(dense: list, expert: list, s: Settings, grad_dtype: torch.dtype, numel=None) -> list[FlatStates]:
    """The flat gradient and optimizer buffers of the dense and expert parameter groups (module docstring);
    `numel(p)`: the elements of p this rank covers (its tensor/expert-parallel shard; default p.numel())."""
    numel = numel or (lambda p: p.numel())
    z = s.parallel.zero
    o = 0 if s.optimizer == "none" else s.optimizer_bytes_per_param
    if o % 4:
        raise ValueError(f"{o} optimizer bytes per parameter is not a whole number of fp32 buffers")
    out = []
    for params, is_expert in ((dense, False), (expert, True)):
        if not params:
            continue
        n = _shards(s, is_expert)
        total = sum(numel(p) for p in params)
        g_sharded = z >= 2 and n > 1
        o_sharded = (z >= 1 or s.parallel.distributed_optimizer) and n > 1
        g_len = math.ceil(total / n) if g_sharded else total
        o_len = math.ceil(total / n) if o_sharded else total
        grads = torch.zeros(g_len, dtype=grad_dtype)  # [P or P/N]
        opt = [torch.zeros(o_len, dtype=torch.float32) for _ in range(o // 4)]  # each [P or P/N]
        out.append(FlatStates(params, [numel(p) for p in params], grads, opt, g_sharded, o_sharded))
    return out


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (tensor or expert parallelism), or t itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _as_param(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A DTensor gradient laid out as its parameter (a replicated or partial gradient of a sharded weight is
    redistributed: the collective tensor parallelism runs there)."""
    if hasattr(grad, "placements") and tuple(grad.placements) != tuple(param.placements):
        return grad.redistribute(param.device_mesh, param.placements)
    return grad


def install_grad_hooks(groups: list[FlatStates]) -> list:
    """After autograd accumulates a parameter's gradient: add it into its main-gradient slice (unsharded) and
    release it. Returns the hook handles."""
    handles = []
    for g in groups:
        offset = 0
        for p, n in zip(g.params, g.sizes):
            view = None if g.grads_sharded else g.grads[offset:offset + n]

            def hook(param, view=view):
                if view is not None:
                    view.add_(_local(_as_param(param.grad, param)).reshape(-1))
                param.grad = None

            handles.append(p.register_post_accumulate_grad_hook(hook))
            offset += n
    return handles


@torch.no_grad()
def adamw_step(groups: list[FlatStates], lr: float = 1e-4, betas=(0.9, 0.95), eps: float = 1e-8,
               weight_decay: float = 0.1, step: int = 1) -> None:
    """One AdamW step (decoupled weight decay) on each group's local shard, chunk by chunk (module docstring)."""
    b1, b2 = betas
    bc1, bc2 = 1 - b1**step, 1 - b2**step
    for g in groups:
        if len(g.optimizer) < 3:
            continue  # no optimizer (or one without AdamW's three states): nothing to update
        master, m, v = g.optimizer[:3]
        n = min(master.numel(), g.grads.numel())
        size = max(MIN_CHUNK, math.ceil(n / CHUNKS))
        for c0 in range(0, n, size):
            c1 = min(c0 + size, n)
            grad = g.grads[c0:c1].float()  # [chunk]
            m[c0:c1].mul_(b1).add_(grad, alpha=1 - b1)
            v[c0:c1].mul_(b2).addcmul_(grad, grad, value=1 - b2)
            denom = (v[c0:c1] / bc2).sqrt_().add_(eps)  # [chunk]
            master[c0:c1].mul_(1 - lr * weight_decay).addcdiv_(m[c0:c1], denom, value=-lr / bc1)
        if not g.optimizer_sharded:
            offset = 0
            for p, size in zip(g.params, g.sizes):
                local = _local(p)
                local.copy_(master[offset:offset + size].view_as(local))
                offset += size
        g.grads.zero_()
