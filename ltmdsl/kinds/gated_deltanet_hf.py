"""The Hugging Face facet of gated_deltanet (see ltmdsl.hf.facet): config keys, tensor names and export fields.

Gated DeltaNet is Qwen3-Next's linear-attention mixer (transformers' Qwen3NextGatedDeltaNet, under
`linear_attn`), configured by `linear_num_key_heads`, `linear_num_value_heads`, `linear_key_head_dim`,
`linear_value_head_dim` and `linear_conv_kernel_dim`; its conv has no bias and its gated RMSNorm uses
`rms_norm_eps` (the sub-layer norm's eps in ltmdsl). Its tensors (`in_proj_qkvz`, `in_proj_ba`, `conv1d`,
`dt_bias`, `A_log`, `norm`, `out_proj`) have the runtime's names and layouts (both projections grouped by key
head as transformers' `fix_query_key_value_ordering` splits them), so they are copied as they are. The gated
norm's weight scales by w (not 1 + w, unlike Qwen3-Next's other norms).

Qwen3.5 (model types qwen3_5, qwen3_5_moe: transformers' Qwen3_5GatedDeltaNet) reads the same keys and
computes the same layer, but keeps four separate projections: `in_proj_qkv` ([q | k | v], each all heads in
order), `in_proj_z`, `in_proj_b` and `in_proj_a` (one row per value head). They become the runtime's grouped
`in_proj_qkvz` / `in_proj_ba` through op "rows" (per key head g: q_g, k_g, its r = Hv/Hk value heads' v and z
rows; then b and a rows likewise), which needs the layer's head counts (`Site.layer`).
"""

from __future__ import annotations

from ltmdsl.hf import HFError
from ltmdsl.hf.facet import HFFacet, ReadContext, Site, Source, copy_tensor
from ltmdsl.hf.reader import Reader
from ltmdsl.hf.spec import num

#: The WY-form chunk the import writes: transformers' torch_chunk_gated_delta_rule and flash-linear-attention's
#: chunk_gated_delta_rule both use 64 (a runtime tiling choice: the computed values do not depend on it).
CHUNK = 64

#: The families whose decoder layers are Qwen3-Next's (transformers' Qwen3.5 text config and modules subclass
#: Qwen3-Next's): the same config keys for Gated DeltaNet, gated attention, the MLP and the MoE.
QWEN3_NEXT_STYLE = ("qwen3_next", "qwen3_5", "qwen3_5_moe")


def read(r: Reader, ctx: ReadContext) -> dict:
    if ctx.family not in QWEN3_NEXT_STYLE:
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
    if fam not in QWEN3_NEXT_STYLE:
        raise HFError(f"{fam} has no Gated DeltaNet layers")
    if g.conv_bias:
        raise HFError("Qwen3-Next's Gated DeltaNet conv has no bias (conv_bias = true has no counterpart)")
    return {"linear_num_key_heads": g.key_heads, "linear_num_value_heads": g.value_heads,
            "linear_key_head_dim": g.head_dim, "linear_value_head_dim": g.v_head_dim,
            "linear_conv_kernel_dim": g.d_conv}


def misfit(g, fam: str) -> str | None:
    if fam not in QWEN3_NEXT_STYLE:
        return f"{fam} has no Gated DeltaNet layers"
    return "Qwen3-Next's Gated DeltaNet conv has no bias" if g.conv_bias else None


def traits(g) -> frozenset[str]:
    return frozenset()


def split_rows(g) -> dict[str, tuple[tuple[str, ...], tuple[tuple[int, int, int], ...]]]:
    """Qwen3.5's separate projections -> row blocks of the runtime's grouped ones (module docstring):
    runtime parameter -> (checkpoint modules, (part, start, stop) blocks in the runtime's row order)."""
    hk, dk, dv, r = g.key_heads, g.head_dim, g.v_head_dim, g.value_heads // g.key_heads
    kd = g.key_dim
    qkvz = tuple(block for h in range(hk) for block in (
        (0, h * dk, (h + 1) * dk), (0, kd + h * dk, kd + (h + 1) * dk),  # q_h, k_h
        (0, 2 * kd + h * r * dv, 2 * kd + (h + 1) * r * dv), (1, h * r * dv, (h + 1) * r * dv)))  # v, z of its heads
    ba = tuple(block for h in range(hk) for block in ((0, h * r, (h + 1) * r), (1, h * r, (h + 1) * r)))
    return {"in_proj_qkvz.weight": (("in_proj_qkv", "in_proj_z"), qkvz),
            "in_proj_ba.weight": (("in_proj_b", "in_proj_a"), ba)}


def tensors(facet: HFFacet, rest: str, site: Site) -> Source:
    """Qwen3-Next: names as the runtime's; Qwen3.5: the grouped projections from its separate ones."""
    if site.family == "qwen3_next" or rest not in ("in_proj_qkvz.weight", "in_proj_ba.weight"):
        return copy_tensor(facet, rest, site)
    if site.layer is None:
        raise HFError(f"internal: {site.family}'s {rest} needs the layer's head counts (Site.layer)")
    modules, rows = split_rows(site.layer)[rest]
    block = f"{site.block}{facet.modules[site.family][0]}."
    return Source(tuple(f"{block}{m}.weight" for m in modules), "rows", rows)


HF = HFFacet(name="gated_deltanet", label="Gated DeltaNet", families=QWEN3_NEXT_STYLE,
             modules={f: ("linear_attn",) for f in QWEN3_NEXT_STYLE},
             read=read, call=call, write=write, misfit=misfit, traits=traits, tensors=tensors)
