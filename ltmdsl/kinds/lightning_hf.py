"""The Hugging Face facet of lightning (see ltmdsl.hf.facet): config keys, tensor names and export fields.

Lightning attention is the mixer of MiniMax's `linear_attention` layers (transformers' MiniMaxLightningAttention,
model_type minimax). It shares its keys with the softmax layers: `num_attention_heads` (default 32), `head_dim`
(default hidden_size / heads), `hidden_act` (the activation on the qkv projection, and the experts'; only silu,
as the family reads it) and `block_size` (the block length of transformers' parallel form, default 256: our
`chunk`, which does not change the result). Every MiniMax lightning layer has the sigmoid output gate, an
RMSNorm over all heads with transformers' default eps 1e-6, and slopes scaled by depth (its layer_idx among
num_hidden_layers, our `depth_decay`). Its tensors `qkv_proj`, `output_gate`, `norm`, `out_proj` carry the
runtime's names under `self_attn`. transformers also saves four computed buffers per layer (`slope_rate` [H, 1, 1]
and the block decay tables `query_decay`, `key_decay` [H, C, 1], `diagonal_decay` [1, H, C, C]): `buffers`
computes them as MiniMaxLightningAttention does, in float32, so import checks a checkpoint's against them and
export writes them.
"""

from __future__ import annotations

from ltmdsl.hf import HFError
from ltmdsl.hf.facet import HFFacet, ReadContext
from ltmdsl.hf.reader import Reader
from ltmdsl.hf.spec import num

#: MiniMaxRMSNorm's default eps, which MiniMaxLightningAttention's norm uses (no config key sets it).
NORM_EPS = 1e-6
MAX_BLOCK = 1 << 20


def read(r: Reader, ctx: ReadContext) -> dict:
    if ctx.family != "minimax":
        raise HFError(f"internal: lightning has no reader for {ctx.family}")
    heads = r.int("num_attention_heads", 32)
    if not r.present("head_dim") and ctx.d_model % heads:
        raise r.fail(f"hidden_size {ctx.d_model} is not a multiple of num_attention_heads {heads}; set head_dim")
    head_dim = r.int("head_dim", ctx.d_model // heads if ctx.d_model % heads == 0 else None)
    return dict(heads=heads, head_dim=head_dim, chunk=r.int("block_size", 256, maximum=MAX_BLOCK))


def call(v: dict) -> str:
    return (f"lightning(heads = {num(v['heads'])}, head_dim = {num(v['head_dim'])}, act = silu, "
            f"chunk = {num(v['chunk'])})")


def _misfit(c) -> str | None:
    if c.act != "silu" or not c.gate or not c.depth_decay or c.norm_eps != NORM_EPS:
        return (f"MiniMax's lightning layers apply silu, the output gate, depth-scaled slopes and an RMSNorm with "
                f"eps {NORM_EPS:g}")
    return None


def write(c, fam: str, d: int) -> dict:
    if fam != "minimax":
        raise HFError(f"{fam} has no lightning attention layers")
    why = _misfit(c)
    if why:
        raise HFError(why)
    return {"num_attention_heads": c.heads, "head_dim": c.head_dim, "block_size": c.chunk}


def misfit(c, fam: str) -> str | None:
    return _misfit(c) if fam == "minimax" else f"{fam} has no lightning attention layers (MiniMax has)"


def traits(c) -> frozenset[str]:
    return frozenset()


def buffers(c, site, place) -> dict:
    """MiniMaxLightningAttention's buffers for this layer (its place: layer_idx `place.depth` of
    num_hidden_layers `place.depths`), with transformers' float32 arithmetic (get_slope_rate, decay_factors)."""
    import torch

    H, C = c.heads, c.chunk
    factor = 1 - place.depth / (place.depths - 1 + 1e-5) + 1e-5 if c.depth_decay else 1.0
    rate = ((1 / (2 ** (8 / H))) ** (torch.arange(H) + 1) * factor)[:, None, None].float()  # [H, 1, 1]
    steps = torch.arange(C) + 1  # [C]
    query_decay = torch.exp(-rate * steps[:, None])  # [H, C, 1]
    key_decay = torch.exp(-rate * (C - steps[:, None]))  # [H, C, 1]
    diagonal = rate * (steps[:, None] - steps[None, :])[None, None, :, :]  # [1, H, C, C]
    diagonal = torch.exp(torch.where(diagonal >= 0, -diagonal, float("-inf")))
    return {"slope_rate": rate, "query_decay": query_decay, "key_decay": key_decay, "diagonal_decay": diagonal}


HF = HFFacet(name="lightning", label="lightning attention", families=("minimax",), modules={"minimax": ("self_attn",)},
             read=read, call=call, write=write, misfit=misfit, traits=traits, buffers=buffers)
