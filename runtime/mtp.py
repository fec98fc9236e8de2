"""DeepSeek-V3's multi-token-prediction modules (ltmdsl.ir.MTPConfig), run as an extra head of the model.

Module k (1-based) sees the previous depth's hidden states h [B, T', d] (the main model's, after its final
norm, for k = 1) and the embeddings of the tokens k positions ahead, e [B, T', d]:

    x  = proj([norm_h(h) ; norm_e(e)])         [B, T', 2d] -> [B, T', d]   (DeepSeek-V3 paper, eq. 21)
    x  = x + branch_j(norm_j(x)) for the block's sub-layers (mixer, then FFN), causal over the T' positions
    h' = x (fed to module k + 1);  logits = head(norm_o(x))                   (the main model's head)

Parameter names under `mtp.{k-1}.`: `norm_h`, `norm_e`, `proj.weight` [d, 2d], `layers.{j}.` (as the stack's
sub-layers) and `norm_o`. DeepSeek's published checkpoints hold the same module with the two halves of the
projection's input the other way round (`eh_proj` over [norm(e) ; norm(h)], `enorm`, `hnorm`,
`shared_head.norm`); ltmdsl.hf maps them (ltmdsl/hf/families/deepseek_v3.py).
"""

from __future__ import annotations

import torch
from torch import nn

from ltmdsl.ir import MTPConfig
from ltmdsl.runtime import initializers as init
from ltmdsl.runtime.kernels import Kernels
from ltmdsl.runtime.kinds import layer_places
from ltmdsl.runtime.norm import Norm


class MTPModule(nn.Module):
    """One multi-token-prediction module: forward(h [B,T,d], e [B,T,d]) -> (x [B,T,d], norm_o(x) [B,T,d])."""

    def __init__(self, cfg: MTPConfig, d: int, residual_scale: float, kernels: Kernels):
        super().__init__()
        from ltmdsl.runtime.model import Block  # the model module imports this one

        self.residual_scale = residual_scale
        self.norm_h = Norm(cfg.norm, d, kernels)
        self.norm_e = Norm(cfg.norm, d, kernels)
        self.proj = nn.Linear(2 * d, d, bias=False)
        self.layers = nn.ModuleList(Block(layer, d, kernels, place)
                                    for layer, place in zip(cfg.block, layer_places(cfg.block)))
        self.norm_o = Norm(cfg.norm, d, kernels)

    def init_weights(self, gen: torch.Generator) -> None:
        self.norm_h.init_weights(gen)
        self.norm_e.init_weights(gen)
        init.linear_(self.proj, gen)
        for block in self.layers:
            block.init_weights(gen)
        self.norm_o.init_weights(gen)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.proj(torch.cat([self.norm_h(h, None)[0], self.norm_e(e, None)[0]], dim=-1))  # [B, T, d]
        pending = None
        for block in self.layers:
            normed, x = block.norm(x, None) if pending is None else block.norm(pending, x)
            pending = block.branch(block.mixer(normed, None, 0), self.residual_scale)  # [B, T, d]
        normed, x = self.norm_o(x, None) if pending is None else self.norm_o(pending, x)
        return x, normed


def mtp_logits(model, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """input_ids [B, T] -> one logits tensor per module k = 1..depth, [B, T - k, V]: row i predicts token
    i + k + 1 (the main model's logits, row i, predict token i + 1). Depths beyond T - 1 give no rows."""
    if model.mtp is None:
        raise ValueError(f"model {model.ir.name} has no multi-token-prediction modules (mtp = mtp(...))")
    T = input_ids.shape[1]
    h = model(input_ids, output="hidden")  # [B, T, d], after the final norm
    e = model.embed(input_ids)  # [B, T, d]
    if model.ir.embed_scale != 1.0:
        e = e * model.ir.embed_scale
    out = []
    for k, module in enumerate(model.mtp, start=1):
        n = max(T - k, 0)
        h, normed = module(h[:, :n], e[:, k:k + n])  # [B, n, d]
        out.append(model.head(normed))  # [B, n, V]
    return out
