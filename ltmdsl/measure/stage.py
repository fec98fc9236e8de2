"""The part of the model one rank holds, as the memory model assumes it (ltmdsl/memory/assemble.py).

Pipeline parallelism: the rank of the memory model's most loaded stage holds the contiguous sub-layers of
that stage (`stage_ranges`), the embedding when it is the first stage (or the last one with tied embeddings)
and the final norm and head when it is the last. Everything else stays on the meta device (no storage).
Full recompute checkpoints a mixer sub-layer together with the FFN right after it, the units the memory
model counts (`_groups`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ltmdsl.ir import ModelIR
from ltmdsl.memory.assemble import checkpoint_units, stage_ranges
from ltmdsl.measure import fakesafe


@dataclass
class Stage:
    """The modules one rank holds and runs."""

    net: nn.Module  # the LTModel (its unheld modules stay on meta)
    index: int
    layers: range
    first: bool
    last: bool
    units: list[list[int]]  # checkpoint units: sub-layer indices (a mixer and the FFN that follows it)
    sizes: dict[str, int] | None = None  # parameter name -> elements on this rank before ZeRO-3 (tp/ep shards)
    fsdp_root: nn.Module | None = None  # FSDP2's root under ZeRO-3 (the net, or under pp its pipeline stage)

    @property
    def root(self) -> nn.Module:
        """The module whose call runs the step's forward hooks: FSDP2's root under ZeRO-3, else the net."""
        return self.net if self.fsdp_root is None else self.fsdp_root

    def numel(self, p: nn.Parameter) -> int:
        """Elements of parameter p this rank's model states cover: its tensor/expert-parallel shard, before
        ZeRO sharding (FSDP2 shards the weights of a ZeRO-3 rank; the memory model divides by N itself)."""
        if self.sizes is None:
            return p.numel()
        return self._by_id()[id(p)]

    def _by_id(self) -> dict[int, int]:
        return {id(q): self.sizes[name] for name, q in self.net.named_parameters(remove_duplicate=False)}

    @property
    def blocks(self) -> list[nn.Module]:
        return [self.net.layers[i] for i in self.layers]

    def held(self) -> list[nn.Module]:
        """The modules with storage on this rank, each once."""
        out: list[nn.Module] = []
        if self.first or (self.last and self.net.lm_head is None):
            out.append(self.net.embed)
        out += self.blocks
        uses = getattr(self.net, "uses", {})  # per-use parameters of the held sub-layers (adapters)
        out += [uses[str(i)] for i in self.layers if str(i) in uses]
        if self.last:
            out.append(self.net.final_norm)
            if self.net.lm_head is not None:
                out.append(self.net.lm_head)
            if getattr(self.net, "mtp", None) is not None:  # multi-token-prediction modules, beside the head
                out.append(self.net.mtp)  # (the memory model's last stage holds them: memory/assemble.py)
        seen, unique = set(), []
        for m in out:
            if id(m) not in seen:
                seen.add(id(m))
                unique.append(m)
        return unique

    def params(self) -> list[nn.Parameter]:
        seen, out = set(), []
        for m in self.held():
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def buffer_bytes(self) -> int:
        """Bytes of the held modules' buffers (computed constants such as Lightning's decay slopes): live with
        the weights but not weights, which the memory model counts as parameters x bytes."""
        seen, total = set(), 0
        for m in self.held():
            for b in m.buffers():
                if id(b) not in seen:
                    seen.add(id(b))
                    total += b.untyped_storage().nbytes()
        return total

    def expert_params(self) -> set[int]:
        """ids of the parameters expert parallelism shards (the MoE's stacked experts)."""
        out = set()
        for block in self.blocks:
            experts = getattr(block.mixer, "experts", None)
            if isinstance(experts, nn.Module):
                out |= {id(p) for p in experts.parameters()}
        return out


def local_sizes(net: nn.Module) -> dict[str, int]:
    """Parameter name -> elements held on this rank (a DTensor's local shard): call after tensor and expert
    parallelism split the model and before FSDP2 shards it."""
    return {name: (p.to_local() if hasattr(p, "to_local") else p).numel()
            for name, p in net.named_parameters(remove_duplicate=False)}


def pipeline_root(net: nn.Module, ir: ModelIR, pp: int, index: int) -> nn.Module:
    """Stage `index` of the meta model cut as ltmdsl.distributed's pipeline cuts it (its sub-layers, the
    embedding on the first stage, the final norm and head on the last): the module FSDP2 shards as the root
    of a ZeRO-3 pipeline rank."""
    from ltmdsl.distributed.pipeline import Stage as PipelineStage

    layers = stage_ranges(len(ir.layers), pp)[index]
    return PipelineStage(net, layers, first=index == 0, last=index == pp - 1)


def materialise(net: nn.Module, ir: ModelIR, pp: int, index: int, sizes: dict[str, int] | None = None,
                fsdp_root: nn.Module | None = None, device: str = "cpu") -> Stage:
    """Give the modules of stage `index` storage (fake, under the caller's FakeTensorMode; real and
    uninitialised on `device` otherwise) and bind the tracing paths of the kinds that need one. `sizes`:
    `local_sizes` of a split model; `fsdp_root`: FSDP2's root under ZeRO-3 (materialised through it, so that
    FSDP2 keeps its sharded parameters in step)."""
    layers = stage_ranges(len(ir.layers), pp)[index]
    stage = Stage(net, index, layers, index == 0, index == pp - 1, checkpoint_units(ir, layers), sizes, fsdp_root)
    if fsdp_root is not None:  # the root's call keeps FSDP2's sharded parameters in step
        fsdp_root.to_empty(device=torch.device(device), recurse=True)
    elif pp == 1:  # the whole model
        net.to_empty(device=torch.device(device), recurse=True)
    else:
        for m in stage.held():
            m.to_empty(device=torch.device(device), recurse=True)
    fakesafe.prepare(stage.blocks)
    return stage
