"""The Hugging Face facet of rg_lru (see ltmdsl.hf.facet): config keys, tensor names and export fields.

RecurrentGemma's recurrent block (transformers' RecurrentGemmaRecurrentBlock with its RecurrentGemmaRglru) is
the temporal block of the layers that `block_types` calls "recurrent". Its keys: `lru_width` (null: hidden_size),
`num_attention_heads` (the blocks of the block-diagonal gates; the attention layers read it too),
`conv1d_width` (K, default 4) and `hidden_activation` (the y branch's activation, shared with the MLP:
gelu_pytorch_tanh, or exact gelu). Its tensors (`linear_y`, `linear_x`, `linear_out`, `conv_1d`,
`rg_lru.recurrent_param`, `rg_lru.input_gate_weight` [H, W/H, W/H], ...) carry the runtime's names under
`temporal_block`.
"""

from __future__ import annotations

from ltmdsl.hf import HFError
from ltmdsl.hf.facet import HFFacet, ReadContext
from ltmdsl.hf.reader import Reader
from ltmdsl.hf.spec import num

#: transformers' hidden_activation -> the y branch's act in ltmdsl's rg_lru (and the MLP's gated activation).
ACTIVATIONS = {"gelu_pytorch_tanh": ("gelu_tanh", "geglu_tanh"), "gelu": ("gelu", "geglu")}


def hidden_activation(r: Reader) -> tuple[str, str]:
    """(rg_lru act, mlp act) from `hidden_activation`, which both blocks apply."""
    value = r.raw("hidden_activation", "gelu_pytorch_tanh")
    if not isinstance(value, str) or value not in ACTIVATIONS:
        r.unsupported("hidden_activation", " or ".join(repr(k) for k in ACTIVATIONS), "gelu_pytorch_tanh")
        value = "gelu_pytorch_tanh"
    return ACTIVATIONS[value]


def read(r: Reader, ctx: ReadContext) -> dict:
    if ctx.family != "recurrent_gemma":
        raise HFError(f"internal: rg_lru has no reader for {ctx.family}")
    heads = r.int("num_attention_heads", 10)
    width = r.int("lru_width", ctx.d_model)
    if width % heads:
        raise r.fail(f"lru_width {width} is not a multiple of num_attention_heads {heads} (the RG-LRU gate blocks)")
    return dict(heads=heads, width=width, d_conv=r.int("conv1d_width", 4, maximum=1024),
                act=hidden_activation(r)[0])


def call(v: dict) -> str:
    return (f"rg_lru(heads = {num(v['heads'])}, width = {num(v['width'])}, d_conv = {num(v['d_conv'])}"
            f"{', act = gelu' if v['act'] == 'gelu' else ''})")


def write(c, fam: str, d: int) -> dict:
    if fam != "recurrent_gemma":
        raise HFError(f"{fam} has no RG-LRU layers")
    act = next(k for k, (rg, _) in ACTIVATIONS.items() if rg == c.act)
    return {"lru_width": c.width, "num_attention_heads": c.heads, "conv1d_width": c.d_conv, "hidden_activation": act}


def misfit(c, fam: str) -> str | None:
    return None if fam == "recurrent_gemma" else f"{fam} has no RG-LRU layers (RecurrentGemma has)"


def traits(c) -> frozenset[str]:
    return frozenset({c.act})


HF = HFFacet(name="rg_lru", label="RG-LRU", families=("recurrent_gemma",),
             modules={"recurrent_gemma": ("temporal_block",)}, read=read, call=call, write=write, misfit=misfit,
             traits=traits)
