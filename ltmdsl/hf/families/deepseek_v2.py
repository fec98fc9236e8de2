"""DeepSeek-V2 (model_type deepseek_v2, transformers' DeepseekV2ForCausalLM): config reader, export writer, layout.

Every HF decoder layer is multi-head latent attention (the mla kind; its keys: ltmdsl/kinds/mla_hf.py) then a
SwiGLU MLP of `intermediate_size` on the first `first_k_dense_replace` layers and the MoE with shared experts on
the others (its keys and routing: ltmdsl/kinds/moe_hf.py), each with an RMSNorm before it (`input_layernorm`,
`post_attention_layernorm`), as Llama names them. The stack is written with the legend A = attn (mla),
"-" = dense (mlp), E = moe.

The original DeepSeek code also placed experts by `moe_layer_freq` (every layer i >= first_k_dense_replace with
i % moe_layer_freq == 0); transformers ignores it and puts experts on every layer from first_k_dense_replace on,
so only 1 is accepted. Training-only keys (`aux_loss_alpha`, `seq_aux`) and the expert-parallel degree of the
original code (`ep_size`) do not change the forward pass. DeepSeek-V2's `mlp_bias` would give the dense MLPs and
the shared experts biases, which the language's shared expert does not have: true is refused by name.
DeepSeek-V3 (deepseek_v3.py) reads the same layout with its own routing and defaults (`read_stack`).
"""

from __future__ import annotations

from ltmdsl.hf import HFError
from ltmdsl.hf.facet import ReadContext
from ltmdsl.hf.reader import Reader
from ltmdsl.kinds.hf import hf_facet

FAMILY = "deepseek_v2"
ARCH = "DeepseekV2ForCausalLM"
#: Keys of DeepSeek's configs that do not change the forward pass: auxiliary-loss settings and the original
#: code's expert-parallel degree.
HARMLESS = ("aux_loss_alpha", "seq_aux", "ep_size")
#: The legend of every DeepSeek stack: symbol -> (definition name, kind).
LEGEND = {"A": ("attn", "mla"), "-": ("dense", "mlp"), "E": ("moe", "moe")}


def _values(kind: str, r: Reader, d: int, present: bool = True) -> dict:
    return hf_facet(kind).read(r, ReadContext(r.family, d, present))


def read_stack(r: Reader, vocab: int, d_model: int, layers: int, first_dense: int, mtp: int = 0) -> dict:
    """The plan fields of a DeepSeek config (module docstring), from its config class's defaults; with `mtp`
    multi-token-prediction modules (DeepSeek-V3), their block: the MLA, then the FFN that HF decoder layer
    num_hidden_layers + k would have (dense before first_k_dense_replace, the MoE from it on), one for all k."""
    vocab = r.int("vocab_size", vocab)
    d = r.int("hidden_size", d_model)
    n = r.layers("num_hidden_layers", layers)
    eps = r.eps("rms_norm_eps", 1e-6)
    tied = r.bool("tie_word_embeddings", False)
    r.act()
    first = r.int("first_k_dense_replace", first_dense, minimum=0)
    r.expect("moe_layer_freq", lambda v: v in (None, 1),
             "1 (transformers' DeepSeek puts experts on every layer from first_k_dense_replace on)")
    for key in HARMLESS:
        r.raw(key, None)
    moe_at = [i >= first for i in range(n)]
    mtp_at = [n + k >= first for k in range(mtp)]
    if len(set(mtp_at)) > 1:
        raise r.fail(f"first_k_dense_replace {first} falls among the multi-token-prediction layers {n} to "
                     f"{n + mtp - 1} (num_nextn_predict_layers {mtp}): ltmdsl's mtp modules share one block")
    values = {"A": _values("mla", r, d), "E": _values("moe", r, d, present=any(moe_at + mtp_at)),
              "-": _values("mlp", r, d, present=not all(moe_at + mtp_at))}
    used = {"A"} | ({"E"} if any(moe_at) else set()) | ({"-"} if not all(moe_at) else set())
    definitions, legend = {}, {}
    for symbol, (name, kind) in LEGEND.items():
        if symbol in used or (mtp and symbol == ("E" if mtp_at[0] else "-")):
            definitions[name] = (kind, hf_facet(kind).call(values[symbol]))
        if symbol in used:
            legend[symbol] = name
    out = dict(vocab=vocab, d_model=d, norm_eps=eps, tied=tied, definitions=definitions, legend=legend,
               tokens=tuple("A" + ("E" if e else "-") for e in moe_at), hf=dict(first_k_dense_replace=min(first, n)))
    if mtp:
        out["mtp"] = (mtp, LEGEND["A"][0], LEGEND["E" if mtp_at[0] else "-"][0])
    return out


def read(r: Reader) -> dict:
    """DeepSeek-V2 with DeepseekV2Config's defaults."""
    r.expect("mlp_bias", lambda v: v in (None, False), "false (the shared experts of the language have no biases)")
    return read_stack(r, 102400, 4096, 32, 0)


def config_stack(ir, base: dict, eps: float, family: str) -> dict:
    """The config fields of a DeepSeek stack: MLA everywhere, dense MLPs on a first run of layers, MoE after."""
    from ltmdsl.hf.export import _one, _write

    mixers = [layer.mixer for layer in ir.layers[0::2]]
    ffns = [layer.mixer for layer in ir.layers[1::2]]
    first = next((i for i, f in enumerate(ffns) if f.kind != "mlp"), len(ffns))
    if any(f.kind != "moe" for f in ffns[first:]):
        raise HFError("DeepSeek has dense MLPs on its first first_k_dense_replace layers and MoE on all the others")
    d = ir.d_model
    out = {**base, "model_type": family, "num_hidden_layers": len(mixers), "rms_norm_eps": eps, "hidden_act": "silu",
           "first_k_dense_replace": first, **_write(_one(mixers, "MLA settings"), family, d)}
    if first:
        out.update(_write(_one(ffns[:first], "MLP settings (DeepSeek has one intermediate_size)"), family, d))
    if first < len(ffns):
        out.update(_write(_one(ffns[first:], "MoE settings"), family, d))
    return out


def config(ir, base: dict, eps: float) -> dict:
    """DeepSeek-V2's config.json fields (mlp_bias false: the language's shared experts have none)."""
    return {**config_stack(ir, base, eps, FAMILY), "mlp_bias": False}
