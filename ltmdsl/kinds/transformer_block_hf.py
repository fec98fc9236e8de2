"""The Hugging Face facet of transformer_block (see ltmdsl.hf.facet): Zamba2's shared transformer block.

Zamba2 (zamba2) keeps the block under a hybrid layer's `shared_transformer` (self_attn, pre_ff_layernorm,
feed_forward with a fused gate_up_proj) and the use's projection as that layer's `linear`. Its family module
(ltmdsl/hf/families/zamba2.py) reads and writes the config and names the tensors (a use's shared part and
adapters live in its block's first hybrid layer), so `read` is not used and `write` holds the block's fields.
"""

from __future__ import annotations

from ltmdsl.hf import HFError
from ltmdsl.hf.facet import HFFacet, ReadContext, Site, Source
from ltmdsl.hf.reader import Reader


def read(r: Reader, ctx: ReadContext) -> dict:
    raise HFError(f"internal: {ctx.family} reads its shared transformer blocks in its family module")


def call(v: dict) -> str:
    raise HFError("internal: zamba2 writes its transformer_block definitions in its family module")


def misfit(c, fam: str) -> str | None:
    if fam != "zamba2":
        return f"{fam} has no shared transformer blocks"
    a, f = c.attn, c.ffn
    if a.heads * a.head_dim != c.d_in or a.v_head_dim != a.head_dim:
        return ("Zamba2's shared block reads cat[h, embeddings] (input = concat_embed) with heads * head_dim = "
                "2 * d_model")
    if a.window is not None or a.qk_norm or a.qkv_bias or a.out_bias or a.rope_dim is not None or a.gate \
            or a.sinks or a.softcap is not None or a.chunk is not None or a.qk_l2_norm \
            or a.temperature_floor is not None or a.query_pre_attn_scalar is not None or a.rope_scaling is not None:
        return "Zamba2's shared attention is plain: no window, biases, qk norm, partial or scaled RoPE or variants"
    if a.scale is None or abs(a.scale - (a.head_dim / 2) ** -0.5) > 1e-12 * a.scale:
        return "Zamba2's shared attention scales its scores by (head_dim / 2)^-1/2"
    if f.activation not in ("geglu", "geglu_tanh", "swiglu") or f.bias:
        return "Zamba2's shared MLP is a gated MLP (gelu, gelu_pytorch_tanh or silu) without biases"
    if not c.out_proj or not c.adapter_rank or not c.ffn_adapters:
        return "Zamba2's shared block always has its per-use linear and an MLP adapter (adapter_rank > 0)"
    if c.attn_adapters and a.kv_heads != a.heads:
        return "Zamba2's k and v adapters need num_key_value_heads = num_attention_heads"
    if c.mid_norm.kind != "rmsnorm" or c.mid_norm.zero_centred:
        return "Zamba2's norms are plain RMSNorms"
    return None


def write(c, fam: str, d: int) -> dict:
    why = misfit(c, fam) or (None if c.d_in == 2 * d else "Zamba2's shared block reads cat[h, embeddings] "
                                                              "(input = concat_embed), 2 * d_model wide")
    if why:
        raise HFError(why)
    acts = {"geglu": "gelu", "geglu_tanh": "gelu_pytorch_tanh", "swiglu": "silu"}
    return {"num_attention_heads": c.attn.heads, "num_key_value_heads": c.attn.kv_heads,
            "intermediate_size": c.ffn.d_ff, "hidden_act": acts[c.ffn.activation], "adapter_rank": c.adapter_rank,
            "use_shared_attention_adapter": c.attn_adapters, "use_mem_rope": c.attn.rope_theta is not None}


def traits(c) -> frozenset[str]:
    return frozenset({"shared_transformer"})


def tensors(facet: HFFacet, rest: str, site: Site) -> Source:
    """Names relative to the hybrid layer (the family module maps the shared part to its owner layer)."""
    return Source((f"{site.block}shared_transformer.{rest}",))


HF = HFFacet(name="transformer_block", label="shared transformer block", families=("zamba2",),
             modules={"zamba2": ("shared_transformer",)}, read=read, call=call, write=write, misfit=misfit,
             traits=traits, tensors=tensors)
