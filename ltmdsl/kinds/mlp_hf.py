"""The Hugging Face facet of mlp (see ltmdsl.hf.facet): config keys, tensor names and export fields.

A dense MLP follows each mixer in Llama, Mistral, Qwen2, Qwen3, Jamba and Bamba (SwiGLU; `intermediate_size`,
Llama's and Bamba's `mlp_bias`), and is a layer of its own in Nemotron-H (relu2, `mlp_bias`). The
Llama-style families and Jamba share `intermediate_size` with their experts, so the family reads it once
(`ReadContext.shared["d_ff"]`). Its tensors `gate_proj`, `up_proj`, `down_proj` keep the runtime's names
under `mlp` (Jamba, Bamba: `feed_forward`; Nemotron-H: `mixer`). Qwen3-Next's dense MLP (its layers without
experts) reads `intermediate_size` itself.
"""

from __future__ import annotations

from ltmdsl.hf import HFError
from ltmdsl.hf.facet import HFFacet, ReadContext
from ltmdsl.hf.reader import Reader
from ltmdsl.hf.spec import num

SWIGLU_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "jamba", "bamba")


def read(r: Reader, ctx: ReadContext) -> dict:
    fam = ctx.family
    if fam in ("llama", "mistral", "qwen2", "qwen3", "jamba"):
        return dict(d_ff=ctx.shared["d_ff"], act="swiglu", bias=r.bool("mlp_bias", False) if fam == "llama" else False)
    if fam == "bamba":
        return dict(d_ff=r.int("intermediate_size", 14336), act="swiglu", bias=r.bool("mlp_bias", False))
    if fam == "qwen3_next":  # the dense MLP of mlp_only_layers and of layers off decoder_sparse_step
        return dict(d_ff=r.int("intermediate_size", 5632), act="swiglu", bias=False)
    if fam == "nemotron_h":
        r.expect("mlp_hidden_act", lambda v: v == "relu2", "'relu2'", "relu2")
        values = dict(d_ff=r.int("intermediate_size", 21504), act="relu2", bias=r.bool("mlp_bias", False)) \
            if ctx.present else {}
        r.raw("intermediate_size", None)
        r.raw("mlp_bias", None)
        return values
    raise HFError(f"internal: mlp has no reader for {fam}")


def call(v: dict) -> str:
    return f"mlp(d_ff = {num(v['d_ff'])}, act = {v['act']}{', bias = true' if v.get('bias') else ''})"


def write(f, fam: str, d: int) -> dict:
    if fam in SWIGLU_FAMILIES:
        if f.activation != "swiglu":
            raise HFError("Jamba's MLPs and experts use swiglu" if fam == "jamba" else "Bamba's MLPs use swiglu"
                          if fam == "bamba" else f"MLP activation {f.activation} has no counterpart in Llama-style "
                          "families (swiglu only)")
        out = {"intermediate_size": f.d_ff}
        if fam in ("llama", "bamba"):
            out["mlp_bias"] = f.bias
        return out
    if fam == "qwen3_next":
        if f.activation != "swiglu" or f.bias:
            raise HFError("Qwen3-Next's MLPs use swiglu without biases")
        return {"intermediate_size": f.d_ff}
    if fam == "nemotron_h":
        if f.activation != "relu2":
            raise HFError("Nemotron-H MLPs use relu2")
        return {"intermediate_size": f.d_ff, "mlp_bias": f.bias}
    raise HFError(f"{fam} has no dense MLP layers")


def misfit(f, fam: str) -> str | None:
    if fam == "qwen3_next":
        return None if f.activation == "swiglu" and not f.bias else "Qwen3-Next's MLPs use swiglu without biases"
    if fam == "nemotron_h":
        return None if f.activation == "relu2" else f"its activation is {f.activation}; Nemotron-H MLPs use relu2"
    if fam in (*SWIGLU_FAMILIES, "mixtral"):
        return None if f.activation == "swiglu" else f"its activation is {f.activation}; the family uses swiglu"
    return f"{fam} has no dense MLP layers"


def traits(f) -> frozenset[str]:
    return frozenset({f.activation} | ({"bias"} if f.bias else set()))


HF = HFFacet(name="mlp", label="MLP", families=SWIGLU_FAMILIES + ("nemotron_h", "qwen3_next"),
             modules={**{f: ("mlp",) for f in ("llama", "mistral", "qwen2", "qwen3", "qwen3_next")},
                      "jamba": ("feed_forward",), "bamba": ("feed_forward",), "nemotron_h": ("mixer",)},
             read=read, call=call, write=write, misfit=misfit, traits=traits)
