"""The Hugging Face facet of gated_deltanet (see ltmdsl.hf.facet): config keys, tensor names and export fields.

Gated DeltaNet is Qwen3-Next's linear-attention mixer (transformers' Qwen3NextGatedDeltaNet, under
`linear_attn`), configured by `linear_num_key_heads`, `linear_num_value_heads`, `linear_key_head_dim`,
`linear_value_head_dim` and `linear_conv_kernel_dim`; its conv has no bias and its gated RMSNorm uses
`rms_norm_eps` (the sub-layer norm's eps in ltmdsl). Its tensors (`in_proj_qkvz`, `in_proj_ba`, `conv1d`,
`dt_bias`, `A_log`, `norm`, `out_proj`) have the runtime's names and layouts (both projections grouped by key
head as transformers' `fix_query_key_value_ordering` splits them), so they are copied as they are. The gated
norm's weight scales by w (not 1 + w, unlike Qwen3-Next's other norms).
"""

from __future__ import annotations

from ltmdsl.hf import HFError
from ltmdsl.hf.facet import HFFacet, ReadContext
from ltmdsl.hf.reader import Reader
from ltmdsl.hf.spec import num

#: The WY-form chunk the import writes: transformers' torch_chunk_gated_delta_rule and flash-linear-attention's
#: chunk_gated_delta_rule both use 64 (a runtime tiling choice: the computed values do not depend on it).
CHUNK = 64


def read(r: Reader, ctx: ReadContext) -> dict:
    if ctx.family != "qwen3_next":
        raise HFError(f"internal: gated_deltanet has no reader for {ctx.family}")
    key_heads, value_heads = r.int("linear_num_key_heads", 16), r.int("linear_num_value_heads", 32)
    head_dim, v_head_dim = r.int("linear_key_head_dim", 128), r.int("linear_value_head_dim", 128)
    d_conv = r.int("linear_conv_kernel_dim", 4)
    if value_heads % key_heads:
        raise r.fail(f"'linear_num_value_heads' ({value_heads}) must be a multiple of 'linear_num_key_heads' "
                     f"({key_heads}): each key head serves the same number of value heads")
    return dict(key_heads=key_heads, value_heads=value_heads, head_dim=head_dim, v_head_dim=v_head_dim,
                d_conv=d_conv)


def call(v: dict) -> str:
    return (f"gated_deltanet(key_heads = {num(v['key_heads'])}, value_heads = {num(v['value_heads'])}, "
            f"head_dim = {num(v['head_dim'])}, v_head_dim = {num(v['v_head_dim'])}, d_conv = {num(v['d_conv'])}, "
            f"chunk = {num(CHUNK)})")


def write(g, fam: str, d: int) -> dict:
    if fam != "qwen3_next":
        raise HFError(f"{fam} has no Gated DeltaNet layers")
    if g.conv_bias:
        raise HFError("Qwen3-Next's Gated DeltaNet conv has no bias (conv_bias = true has no counterpart)")
    return {"linear_num_key_heads": g.key_heads, "linear_num_value_heads": g.value_heads,
            "linear_key_head_dim": g.head_dim, "linear_value_head_dim": g.v_head_dim,
            "linear_conv_kernel_dim": g.d_conv}


def misfit(g, fam: str) -> str | None:
    if fam != "qwen3_next":
        return f"{fam} has no Gated DeltaNet layers"
    return "Qwen3-Next's Gated DeltaNet conv has no bias" if g.conv_bias else None


def traits(g) -> frozenset[str]:
    return frozenset()


HF = HFFacet(name="gated_deltanet", label="Gated DeltaNet", families=("qwen3_next",),
             modules={"qwen3_next": ("linear_attn",)},
             read=read, call=call, write=write, misfit=misfit, traits=traits)
