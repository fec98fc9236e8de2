"""The Hugging Face facet of mlp (see ltmdsl.hf.facet): config keys, tensor names and export fields.

A dense MLP follows each mixer in Llama, Mistral, Qwen2, Qwen3, Jamba and Bamba (SwiGLU; `intermediate_size`,
Llama's and Bamba's `mlp_bias`), and is a layer of its own in Nemotron-H (relu2, `mlp_bias`). The
Llama-style families and Jamba share `intermediate_size` with their experts, so the family reads it once
(`ReadContext.shared["d_ff"]`). Its tensors `gate_proj`, `up_proj`, `down_proj` keep the runtime's names
under `mlp` (Jamba, Bamba: `feed_forward`; Nemotron-H: `mixer`). Granite-4.0-H without experts
(`num_local_experts` 0) has only its `shared_mlp`: a SwiGLU of `shared_intermediate_size` whose gate and up rows
share `input_linear` (gate first), and `output_linear`. Qwen3-Next's dense MLP (its layers without
experts) reads `intermediate_size` itself.

LFM2 (SwiGLU after every mixer, no bias) sizes its MLP as transformers' Lfm2MLP does: with
`block_auto_adjust_ff_dim` (default true), d_ff = int(2 * intermediate_size / 3), then
int(block_ffn_dim_multiplier * d_ff) rounded up to a multiple of `block_multiple_of` (a null multiplier, which
would skip both, is refused as transformers 5 refuses it);
`block_ff_dim` (the original configs' name) replaces intermediate_size as Lfm2Config does. Its tensors sit
under `feed_forward` as `w1` (gate), `w3` (up) and `w2` (down). RecurrentGemma's MLP (`mlp_block`) is a GeGLU
with biases, intermediate_size // 2 wide, whose GELU is `hidden_activation` (tanh form: geglu_tanh). DeepSeek-V2 / V3's
dense first layers (first_k_dense_replace) have a SwiGLU MLP of `intermediate_size` under `mlp`; so do
Qwen3.5's layers and Kimi-Linear's dense ones, which its published layout keeps under `block_sparse_moe`.
"""

from __future__ import annotations

from ltmdsl.hf import HFError
from ltmdsl.hf.facet import HFFacet, ReadContext, Site, Source, copy_tensor
from ltmdsl.hf.reader import Reader
from ltmdsl.hf.spec import num, show_value

SWIGLU_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "jamba", "bamba")
#: DeepSeek-V2 / V3 (DeepseekV2MLP / DeepseekV3MLP under `mlp`; mlp_bias refused by the family) -> the default
#: intermediate_size of its config class.
DEEPSEEK = {"deepseek_v2": 11008, "deepseek_v3": 18432}


def read(r: Reader, ctx: ReadContext) -> dict:
    fam = ctx.family
    if fam in ("llama", "mistral", "qwen2", "qwen3", "jamba"):
        return dict(d_ff=ctx.shared["d_ff"], act="swiglu", bias=r.bool("mlp_bias", False) if fam == "llama" else False)
    if fam == "bamba":
        return dict(d_ff=r.int("intermediate_size", 14336), act="swiglu", bias=r.bool("mlp_bias", False))
    if fam in ("qwen3_next", "qwen3_5"):  # Qwen3-Next's mlp_only_layers / off decoder_sparse_step; Qwen3.5's
        return dict(d_ff=r.int("intermediate_size", 5632), act="swiglu", bias=False)
    if fam in DEEPSEEK:  # the dense MLP of the first first_k_dense_replace layers
        return dict(d_ff=r.int("intermediate_size", DEEPSEEK[fam]), act="swiglu", bias=False)
    if fam == "kimi_linear":  # KimiLinearMLP of the "dense" mlp_layer_types
        return dict(d_ff=r.int("intermediate_size", 9216), act="swiglu", bias=False)
    if fam == "nemotron_h":
        r.expect("mlp_hidden_act", lambda v: v == "relu2", "'relu2'", "relu2")
        values = dict(d_ff=r.int("intermediate_size", 21504), act="relu2", bias=r.bool("mlp_bias", False)) \
            if ctx.present else {}
        r.raw("intermediate_size", None)
        r.raw("mlp_bias", None)
        return values
    if fam == "lfm2":
        return dict(d_ff=_lfm2_d_ff(r), act="swiglu", bias=False)
    if fam == "recurrent_gemma":  # RecurrentGemmaMlp: intermediate_size // 2 wide, biases, hidden_activation
        return dict(d_ff=r.int("intermediate_size", 3 * 2560, minimum=2) // 2, act=ctx.shared["act"], bias=True)
    if fam == "xlstm":  # xLSTMFeedForward: SiLU-gated, hidden_size * ffn_proj_factor rounded up
        return dict(d_ff=_xlstm_d_ff(r, ctx.d_model), act="swiglu", bias=ctx.shared["bias"])
    if fam == "granitemoehybrid":  # shared_mlp alone (num_local_experts 0): SwiGLU, no bias
        return dict(d_ff=ctx.shared["shared_d_ff"], act="swiglu", bias=False)
    if fam == "falcon_h1":  # FalconH1MLP: SwiGLU of intermediate_size, mlp_bias (its multipliers fold into weights)
        return dict(d_ff=r.int("intermediate_size", 14336), act="swiglu", bias=r.bool("mlp_bias", False))
    raise HFError(f"internal: mlp has no reader for {fam}")


def _xlstm_d_ff(r: Reader, d: int) -> int:
    """xLSTMFeedForward's up_proj_dim: hidden_size * ffn_proj_factor rounded up to ffn_round_up_to_multiple_of."""
    factor = r.float("ffn_proj_factor", 2.667)
    multiple = r.int("ffn_round_up_to_multiple_of", 64, maximum=1 << 20)
    d_ff = int(((d * factor + multiple - 1) // multiple) * multiple)
    if not 1 <= d_ff <= 2**31 - 1:
        raise r.fail(f"the MLP width from 'ffn_proj_factor' {show_value(factor)} and 'ffn_round_up_to_multiple_of' "
                     f"{multiple} is {d_ff}, not a positive size")
    return d_ff


def _lfm2_d_ff(r: Reader) -> int:
    """Lfm2MLP's width from intermediate_size (or block_ff_dim) and the block_* sizing keys."""
    size = r.int("intermediate_size", 12288)
    if r.present("block_ff_dim"):  # Lfm2Config pops it into intermediate_size
        size = r.int("block_ff_dim")
    r.raw("block_ff_dim", None)
    r.expect("block_use_swiglu", lambda v: v in (None, True), "true (transformers' Lfm2MLP is SwiGLU)")
    for key in ("block_mlp_init_scale", "block_out_init_scale", "block_use_xavier_init"):
        r.raw(key, None)  # initialisation only
    multiple = r.int("block_multiple_of", 256)
    if "block_ffn_dim_multiplier" in r.cfg and r.cfg["block_ffn_dim_multiplier"] is None:
        r.used.add("block_ffn_dim_multiplier")  # Lfm2MLP would skip the rounding; transformers 5 refuses null
        raise r.fail("'block_ffn_dim_multiplier' must be a number (transformers' Lfm2Config refuses null)")
    multiplier = r.float("block_ffn_dim_multiplier", 1.0)
    if not r.bool("block_auto_adjust_ff_dim", True):
        return size
    d_ff = int(multiplier * int(2 * size / 3))
    d_ff = multiple * ((d_ff + multiple - 1) // multiple)
    if not 1 <= d_ff <= 2**31 - 1:
        raise r.fail(f"the MLP width from 'intermediate_size' {size}, 'block_ffn_dim_multiplier' "
                     f"{show_value(multiplier)} and 'block_multiple_of' {multiple} is {d_ff}, not a positive size")
    return d_ff


def call(v: dict) -> str:
    return f"mlp(d_ff = {num(v['d_ff'])}, act = {v['act']}{', bias = true' if v.get('bias') else ''})"


def write(f, fam: str, d: int) -> dict:
    if fam == "recurrent_gemma":
        why = misfit(f, fam)
        if why:
            raise HFError(why)
        return {"intermediate_size": 2 * f.d_ff}
    if fam == "lfm2":
        if f.activation != "swiglu" or f.bias:
            raise HFError("LFM2's MLPs use swiglu without bias")
        return {"intermediate_size": f.d_ff, "block_auto_adjust_ff_dim": False}
    if fam == "xlstm":
        why = misfit(f, fam)
        if why:
            raise HFError(why)
        return _xlstm_ffn(f.d_ff, d)
    if fam in SWIGLU_FAMILIES:
        if f.activation != "swiglu":
            raise HFError("Jamba's MLPs and experts use swiglu" if fam == "jamba" else "Bamba's MLPs use swiglu"
                          if fam == "bamba" else f"MLP activation {f.activation} has no counterpart in Llama-style "
                          "families (swiglu only)")
        out = {"intermediate_size": f.d_ff}
        if fam in ("llama", "bamba"):
            out["mlp_bias"] = f.bias
        return out
    if fam in ("qwen3_next", "qwen3_5"):
        if f.activation != "swiglu" or f.bias:
            raise HFError("Qwen3-Next's MLPs use swiglu without biases")
        return {"intermediate_size": f.d_ff}
    if fam in DEEPSEEK or fam == "kimi_linear":
        if f.activation != "swiglu" or f.bias:
            raise HFError("DeepSeek's and Kimi-Linear's MLPs use swiglu without biases")
        return {"intermediate_size": f.d_ff}
    if fam == "nemotron_h":
        if f.activation != "relu2":
            raise HFError("Nemotron-H MLPs use relu2")
        return {"intermediate_size": f.d_ff, "mlp_bias": f.bias}
    if fam == "granitemoehybrid":
        why = misfit(f, fam)
        if why:
            raise HFError(why)
        return {"shared_intermediate_size": f.d_ff, "num_local_experts": 0}
    if fam == "falcon_h1":
        why = misfit(f, fam)
        if why:
            raise HFError(why)
        return {"intermediate_size": f.d_ff, "mlp_bias": f.bias}
    raise HFError(f"{fam} has no dense MLP layers")


def _xlstm_ffn(d_ff: int, d: int) -> dict:
    """xLSTM's ffn_proj_factor and ffn_round_up_to_multiple_of that give d_ff (xLSTMFeedForward's rounding)."""
    factor = d_ff / d
    for multiple in (64, 16, 1):
        if int(((d * factor + multiple - 1) // multiple) * multiple) == d_ff:
            return {"ffn_proj_factor": factor, "ffn_round_up_to_multiple_of": multiple}
    raise HFError(f"xLSTM's ffn_proj_factor cannot give an MLP width of {d_ff} for hidden_size {d}")


def misfit(f, fam: str) -> str | None:
    if fam in ("qwen3_next", "qwen3_5"):
        return None if f.activation == "swiglu" and not f.bias else "Qwen3-Next's MLPs use swiglu without biases"
    if fam in DEEPSEEK or fam == "kimi_linear":
        return None if f.activation == "swiglu" and not f.bias else \
            "DeepSeek's and Kimi-Linear's MLPs use swiglu without biases"
    if fam == "granitemoehybrid":
        return None if f.activation == "swiglu" and not f.bias else "Granite-4.0-H's shared_mlp is swiglu without bias"
    if fam == "falcon_h1":
        return None if f.activation == "swiglu" else "Falcon-H1's MLPs are swiglu"
    if fam == "nemotron_h":
        return None if f.activation == "relu2" else f"its activation is {f.activation}; Nemotron-H MLPs use relu2"
    if fam == "lfm2":
        return None if f.activation == "swiglu" and not f.bias else "LFM2's MLPs use swiglu without bias"
    if fam == "xlstm":
        return None if f.activation == "swiglu" and not f.bias else "xLSTM's MLPs use swiglu without bias"
    if fam == "recurrent_gemma":
        return None if f.activation in ("geglu_tanh", "geglu") and f.bias else \
            "RecurrentGemma's MLPs are GeGLU (geglu_tanh or geglu) with biases"
    if fam in (*SWIGLU_FAMILIES, "mixtral"):
        return None if f.activation == "swiglu" else f"its activation is {f.activation}; the family uses swiglu"
    return f"{fam} has no dense MLP layers"


def traits(f) -> frozenset[str]:
    return frozenset({f.activation} | ({"bias"} if f.bias else set()))


#: LFM2's and xLSTM's names for the runtime's MLP tensors.
_NAMES = {"lfm2": {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"},
          "xlstm": {"gate_proj": "proj_up_gate", "up_proj": "proj_up", "down_proj": "proj_down"}}


def tensors(facet: HFFacet, rest: str, site: Site) -> Source:
    """`<block><module>.<rest>`; LFM2's `feed_forward.w1` / `w3` / `w2` and xLSTM's `ffn.proj_up_gate` /
    `proj_up` / `proj_down` for gate, up and down."""
    if site.family == "granitemoehybrid":
        from ltmdsl.kinds.moe_hf import granite_shared

        return granite_shared(rest, site)
    if site.family in _NAMES:
        module, _, tail = rest.partition(".")
        rest = f"{_NAMES[site.family].get(module, module)}.{tail}"
    if site.family == "kimi_linear":  # its original layout puts the dense MLP under block_sparse_moe too
        own = site.fused if site.available is None else f"{site.block}mlp.{rest}" in site.available
        return Source((f"{site.block}{'mlp' if own else 'block_sparse_moe'}.{rest}",))
    return copy_tensor(facet, rest, site)


HF = HFFacet(name="mlp", label="MLP", families=SWIGLU_FAMILIES + ("nemotron_h", "qwen3_next", "qwen3_5", "lfm2",
                                                                 "recurrent_gemma", "xlstm", *DEEPSEEK, "kimi_linear",
                                                                 "granitemoehybrid", "falcon_h1"),
             modules={**{f: ("mlp",) for f in ("llama", "mistral", "qwen2", "qwen3", "qwen3_next", "qwen3_5", *DEEPSEEK,
                                               "kimi_linear", "qwen3_moe", "gemma3_text")},
                      "jamba": ("feed_forward",), "bamba": ("feed_forward",), "nemotron_h": ("mixer",),
                      "lfm2": ("feed_forward",), "llama4_text": ("feed_forward",), "recurrent_gemma": ("mlp_block",), "xlstm": ("ffn",),
                      "granitemoehybrid": ("shared_mlp",), "falcon_h1": ("feed_forward",)},
             read=read, call=call, write=write, misfit=misfit, traits=traits, tensors=tensors)
