"""Build the model on the meta device and give each rank only its shards, with the single-process weights.

    model = build_meta(ir, torch.float32)      # parameters are shapes only: no memory anywhere
    ... tensor_parallel / data_parallel turn parameters into sharded DTensors (still meta) ...
    materialize(model, "cpu", seed=0)          # allocate this rank's shards, then the model's seeded init

`materialize` runs the model's own `init_weights(seed)`: every draw is made in full on the CPU in the
single-process order, and `runtime.initializers.assign_` keeps only this rank's shard of it. Ranks hold
one full parameter at a time (while it is drawn), never the full model, and the weights equal those of
`ltmdsl.runtime.build.build(ir, seed=seed)` exactly.
"""

from __future__ import annotations

import torch

from ltmdsl.ir import ModelIR
from ltmdsl.runtime.kernels import TORCH_KERNELS
from ltmdsl.runtime.model import LTModel


def build_meta(ir: ModelIR, dtype: torch.dtype) -> LTModel:
    """The LTModel of `ir` with meta parameters in `dtype` (torch back end)."""
    with torch.device("meta"):
        model = LTModel(ir, TORCH_KERNELS)
    return model.to(dtype=dtype)


def materialize(model: LTModel, device: torch.device | str, seed: int) -> LTModel:
    """Allocate the (local shards of the) parameters on `device` and fill them by the seeded init."""
    model.to_empty(device=device)
    model.init_weights(seed)
    return model
