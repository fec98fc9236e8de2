"""Zamba2 (model_type zamba2), as transformers' Zamba2ForCausalLM.

Every HF layer is a Mamba-2 layer (`layers_block_type` "mamba" / "linear_attention"); a "hybrid" layer first runs
one of `num_mem_blocks` shared transformer blocks, used in turn (hybrid use u runs block u % num_mem_blocks), on
input_layernorm(cat[h, embeddings]) (2 * hidden_size wide), then its own `linear` ([d, d], no bias), and adds the
result to its Mamba-2 layer's input before that layer's norm only (Zamba2MambaDecoderLayer's
`transformer_hidden_states`; the residual carries h). In the language that is, per hybrid layer, a
`transformer_block` sub-layer with `input = concat_embed, into = next_input` in shared block z{u % num_mem_blocks},
then the Mamba-2 sub-layer. The shared block's attention has `num_attention_heads` heads of 2 * hidden_size /
heads (`attention_head_dim`), `num_key_value_heads` KV heads, the score scale (head_dim / 2)^-1/2 and RoPE over the
whole head only with `use_mem_rope`; its MLP is gelu(gate) * up (`hidden_act`) of `intermediate_size` (default
4 * hidden_size) with a LoRA adapter of `adapter_rank` on the fused gate|up projection for every use; q, k and v
carry per-use adapters with `use_shared_attention_adapter`. The Mamba-2 layers clamp dt at `time_step_min` in
their chunked scan (`dt_min`); their gated norm's epsilon is 1e-5 whatever `rms_norm_eps` says, so another
rms_norm_eps is refused.

Published configs also carry copies of derived values (`ffn_hidden_size`, `kv_channels`, `mamba_headdim`,
`num_query_groups`, `attention_head_dim`, `attention_hidden_size`, `hybrid_layer_ids`, `use_shared_mlp_adapter`):
accepted where they equal what transformers derives (it recomputes them and never reads them), refused by name
otherwise. Checkpoint tensors: a use's shared part and adapters live in the first hybrid layer of its block
(transformers ties the later ones to it and may not save them).
"""

from __future__ import annotations

import re

from ltmdsl.hf import HFError
from ltmdsl.hf.facet import Source
from ltmdsl.hf.reader import Reader, rope
from ltmdsl.hf.spec import boolean, num, show_value
from ltmdsl.kinds.hf import hf_facet

MODEL_TYPE = "zamba2"
ARCH = "Zamba2ForCausalLM"
LAYOUT = dict(description="Zamba2 (Mamba-2 layers; before each hybrid one a shared transformer block on "
                          "cat[h, embeddings] whose output enters that layer's input)", family=MODEL_TYPE,
              paired=False, mixers=(), ffns=("mamba2", "transformer_block"),
              not_mixer="Zamba2's layers are Mamba-2, each hybrid one preceded by a shared transformer block",
              not_ffn="Zamba2 has no feed-forward sub-layers outside its shared blocks")
#: legend symbols of the shared blocks z0, z1, ... (the Mamba-2 layer is M)
BLOCK_SYMBOLS = "XYZWVUSRQPONLKJIHGFEDCBA"
#: Zamba2's hidden_act -> the MLP's gated activation
ACTS = {"gelu": "geglu", "gelu_pytorch_tanh": "geglu_tanh", "silu": "swiglu"}


def _types(r: Reader, layers: int) -> list[str]:
    """`layers_block_type` ("hybrid" or a Mamba layer: "mamba" / "linear_attention"), Zamba2Config's default when
    unset (54 layers, the 2.7B model's)."""
    default = (["m"] + (["m"] * 5 + ["h"]) * 7 + ["m"] * 4 + ["h"] + ["m"] * 3 + ["h"] + ["m"] * 2)
    r.raw("layer_types", None)  # Zamba2Config's alias of layers_block_type
    key = "layers_block_type" if r.present("layers_block_type") else "layer_types"
    types = r.raw(key, None)
    if types is None:
        return default
    if not isinstance(types, list) or any(t not in ("mamba", "linear_attention", "hybrid") for t in types):
        raise r.fail(f"'{key}' must list 'mamba' (or 'linear_attention') and 'hybrid' layers, got {show_value(types)}")
    if len(types) != layers:
        raise r.fail(f"'{key}' lists {len(types)} layers; num_hidden_layers is {layers}")
    return ["h" if t == "hybrid" else "m" for t in types]


def _same(r: Reader, key: str, want, why: str) -> None:
    """A published copy of a derived value: accepted when it equals what transformers derives."""
    r.expect(key, lambda v: v is None or v == want, f"{show_value(want)} ({why})")


def read(r: Reader) -> dict:
    """The plan fields of a Zamba2 config (configs.plan_from_config)."""
    vocab = r.int("vocab_size", 32000)
    d = r.int("hidden_size", 2560)
    eps = r.eps("rms_norm_eps", 1e-5)
    if eps != 1e-5:
        raise r.fail(f"'rms_norm_eps' = {show_value(eps)}: transformers' Zamba2 Mamba-2 gated norm uses 1e-5 whatever "
                     "it says, and ltmdsl's mamba2 uses its layer's norm epsilon (supported: 1e-05)")
    tied = r.bool("tie_word_embeddings", True)
    if r.present("num_hidden_layers") or not r.present("layers_block_type"):
        layers = r.layers("num_hidden_layers", 54)
    else:
        layers = len(r.cfg["layers_block_type"]) if isinstance(r.cfg["layers_block_type"], list) else 0
    types = _types(r, layers)
    hybrid = [j for j, t in enumerate(types) if t == "h"]
    _same(r, "hybrid_layer_ids", hybrid, "the hybrid layers of layers_block_type")
    # Mamba-2
    heads_ssm = r.int("n_mamba_heads", 8)
    expand = r.int("mamba_expand", 2)
    if (expand * d) % heads_ssm:
        raise r.fail(f"n_mamba_heads {heads_ssm} does not divide mamba_expand * hidden_size = {expand * d}")
    _same(r, "mamba_headdim", expand * d // heads_ssm, "mamba_expand * hidden_size / n_mamba_heads")
    groups = r.int("mamba_ngroups", 1)
    if heads_ssm % groups:
        raise r.fail(f"n_mamba_heads {heads_ssm} is not a multiple of mamba_ngroups {groups}")
    if r.bool("add_bias_linear", False):
        raise r.fail("'add_bias_linear' = true (biases on the Mamba-2 and MLP projections) is not supported "
                     "(supported: false)")
    r.bool("use_mem_eff_path", False)  # the fused kernel path: the same computation
    ssm = dict(d_state=r.int("mamba_d_state", 64), head_dim=expand * d // heads_ssm, n_groups=groups, expand=expand,
               d_conv=r.int("mamba_d_conv", 4), chunk=r.int("chunk_size", 256),
               conv_bias=r.bool("use_conv_bias", True), proj_bias=False)
    dt_min = r.float("time_step_min", 0.001)
    if not dt_min >= 0:
        raise r.fail(f"'time_step_min' must be >= 0, got {show_value(dt_min)}")
    ssm_call = hf_facet("mamba2").call(ssm)
    if dt_min:
        ssm_call = ssm_call[:-1] + f", dt_min = {num(dt_min)})"
    # the shared transformer blocks
    heads = r.int("num_attention_heads", 32)
    kv = r.int("num_key_value_heads", heads)
    if (2 * d) % heads or heads % kv:
        raise r.fail(f"num_attention_heads {heads} must divide 2 * hidden_size = {2 * d} and be a multiple of "
                     f"num_key_value_heads {kv}")
    head_dim = 2 * d // heads
    _same(r, "attention_head_dim", head_dim, "2 * hidden_size / num_attention_heads")
    _same(r, "attention_hidden_size", 2 * d, "2 * hidden_size")
    _same(r, "kv_channels", d // heads, "hidden_size / num_attention_heads")
    _same(r, "num_query_groups", heads, "num_attention_heads, as Zamba2Config sets it")
    blocks = r.int("num_mem_blocks", 1)
    if blocks > len(BLOCK_SYMBOLS):
        raise r.fail(f"'num_mem_blocks' = {blocks}: at most {len(BLOCK_SYMBOLS)} shared blocks are supported")
    rank = r.int("adapter_rank", 128)
    attn_adapters = r.bool("use_shared_attention_adapter", False)
    if attn_adapters and kv != heads:
        raise r.fail(f"'use_shared_attention_adapter' with num_key_value_heads {kv} != num_attention_heads {heads}: "
                     "transformers' k and v adapters write 2 * hidden_size rows, which only fits without GQA")
    r.expect("use_shared_mlp_adapter", lambda v: v is None or v is True,
             "true (transformers' Zamba2 always builds the MLP adapters)")
    r.bool("use_long_context", False)  # transformers 5 only raises max_position_embeddings: no change with these ropes
    use_rope = r.bool("use_mem_rope", False)
    theta, scaling, _ = rope(r, 10000.0, head_dim)
    if not use_rope:
        theta, scaling = None, None
    act = r.raw("hidden_act", "gelu")
    if not isinstance(act, str) or act not in ACTS:  # a list or a number is no activation name
        r.unsupported("hidden_act", ", ".join(repr(a) for a in ACTS), "gelu")
        act = "gelu"  # ignored on request: Zamba2Config's default
    d_ff = r.raw("intermediate_size", None)
    d_ff = 4 * d if d_ff is None else r.int("intermediate_size")
    _same(r, "ffn_hidden_size", d_ff, "intermediate_size")
    attention = dict(heads=heads, kv_heads=kv, head_dim=head_dim, rope_theta=theta, rope_scaling=scaling,
                     qkv_bias=False, out_bias=False, scale=(head_dim / 2) ** -0.5)
    definitions = {
        "ssm": ("mamba2", ssm_call),
        "sattn": ("attention", hf_facet("attention").call(attention)),
        "smlp": ("mlp", f"mlp(d_ff = {num(d_ff)}, act = {ACTS[act]})"),
    }
    if hybrid:
        definitions["tf"] = ("transformer_block",
                             f"transformer_block(attn = sattn, ffn = smlp, adapter_rank = {num(rank)}, "
                             f"attn_adapters = {boolean(attn_adapters)}, input = concat_embed, into = next_input)")
    else:
        del definitions["sattn"], definitions["smlp"]
    # transformers ties the blocks (its _tied_weights_keys) only when it ties the embeddings: untied, every
    # hybrid layer owns its block
    used = min(blocks, len(hybrid)) if tied else 0
    shared = {f"z{b}": ("tf",) for b in range(used)}
    blocks_legend = {BLOCK_SYMBOLS[b]: f"z{b}" for b in range(used)} if tied else {"T": "tf"} if hybrid else {}
    legend = {"M": "ssm", **blocks_legend}
    if hybrid and not tied:
        r.notes.append("tie_word_embeddings false: transformers' Zamba2 then ties no shared block either, so every "
                       "hybrid layer owns its transformer block")
    tokens, u = [], 0
    for t in types:
        if t == "h":
            tokens.append((BLOCK_SYMBOLS[u % blocks] if tied else "T") + "M")
            u += 1
        else:
            tokens.append("M")
    owners = [hybrid[u % blocks] if tied else j for u, j in enumerate(hybrid)]  # use -> the layer holding its block
    # a checkpoint may also hold the later uses' copies of the tied weights: transformers ties them to the owner
    copies = tuple(f"model.layers.{j}.shared_transformer." for j in hybrid if j not in owners)
    if not tied:  # each untied block also holds the adapters of the other uses of its block_id, which never run
        lists = ["feed_forward.gate_up_proj_adapter_list"] + \
            ([f"self_attn.linear_{x}_adapter_list" for x in "qkv"] if attn_adapters else [])
        copies = tuple(f"model.layers.{j}.shared_transformer.{a}.{i}." for u, j in enumerate(hybrid)
                       for i in range(len(hybrid)) if i != u and i % blocks == u % blocks for a in lists)
        if copies:
            r.notes.append(f"{len(copies)} adapter(s) transformers builds in untied blocks for other layers' uses, "
                           "which never run, are not imported (its parameter count includes them)")
    return dict(vocab=vocab, d_model=d, norm_eps=eps, tied=tied, definitions=definitions, legend=legend,
                tokens=tuple(tokens), blocks=shared,
                hf=dict(num_mem_blocks=blocks, hybrid_layer_ids=hybrid, owners=owners, tied_copies=copies))


# ---- tensor names ----------------------------------------------------------------------------------------

_PART = re.compile(r"^layers\.\d+\.(norm|mixer)\.(.+)$")
_SHARED = {"attn.": "self_attn.", "mid_norm.": "pre_ff_layernorm.", "ffn.down_proj.": "feed_forward.down_proj."}


def source(plan, name: str, sub, prefix: str) -> Source | None:
    """The checkpoint tensor(s) behind runtime parameter `name` of sub-layer `sub` (spec.SubLayerMap), None when
    the family's generic rule applies (a Mamba-2 sub-layer of a plain layer). `prefix` is "model.".

    A transformer_block sub-layer of hybrid layer j (use u, block b = u % num_mem_blocks) maps its shared part to
    the block's owner layer (its first use) and its use's adapters to that owner's adapter lists at index u;
    `linear` stays with layer j. The Mamba-2 of a hybrid layer sits under `mamba_decoder.`."""
    j = sub.hf_layer
    hybrid = plan.hf["hybrid_layer_ids"]
    layer = f"{prefix}layers.{j}."
    m = _PART.match(name)
    if sub.kind == "mamba2":
        if j not in hybrid or m is None:
            return None
        part, rest = m.groups()
        if part == "norm":
            return Source((f"{layer}mamba_decoder.input_layernorm.{rest}",))
        return Source((f"{layer}mamba_decoder.mamba.{rest}",))
    u = hybrid.index(j)
    owner = f"{prefix}layers.{plan.hf['owners'][u]}.shared_transformer."
    if name.startswith("uses."):
        rest = name.split(".", 2)[2]
        if rest == "out_proj.weight":
            return Source((f"{layer}linear.weight",))
        _, which, k, _ = rest.split(".")  # adapters.{q,k,v,gate_up}.{0,1}.weight
        where = ("feed_forward.gate_up_proj_adapter_list" if which == "gate_up"
                 else f"self_attn.linear_{which}_adapter_list")
        return Source((f"{owner}{where}.{u}.{k}.weight",))
    if m is None:
        raise HFError(f"runtime parameter '{name}' has no Hugging Face counterpart for {MODEL_TYPE}")
    part, rest = m.groups()
    if part == "norm":
        return Source((f"{owner}input_layernorm.{rest}",))
    for ours, theirs in _SHARED.items():
        if rest.startswith(ours):
            return Source((f"{owner}{theirs}{rest[len(ours):]}",))
    if rest in ("ffn.gate_proj.weight", "ffn.up_proj.weight"):
        return Source((f"{owner}feed_forward.gate_up_proj.weight",),
                      "first_half" if rest.startswith("ffn.gate") else "second_half")
    raise HFError(f"runtime parameter '{name}' has no Hugging Face counterpart for {MODEL_TYPE}")


# ---- export ----------------------------------------------------------------------------------------------


def fits(ir) -> bool:
    """Whether export picks Zamba2: Mamba-2 layers and transformer_block sub-layers only, with at least one of the
    latter."""
    return any(x.kind == "transformer_block" for x in ir.layers) and \
        all(x.kind in ("mamba2", "transformer_block") for x in ir.layers)


def config(ir, base: dict, eps: float) -> dict:
    """The config.json fields of a model `fits` accepted (HFError for what Zamba2 cannot hold): each
    transformer_block (input = concat_embed, into = next_input) directly before a Mamba-2 layer, their shared
    blocks used in turn (use u in the block of use u % num_mem_blocks), and one setting of each kind."""
    from ltmdsl.hf.export import _one
    from ltmdsl.ir import Residual

    if ir.embed_scale != 1.0 or ir.residual_scale != 1.0 or ir.logit_scale != 1.0 or ir.logit_cap is not None:
        raise HFError("Zamba2 has no embedding, residual or logit multipliers and no logit soft cap")
    if eps != 1e-5:
        raise HFError(f"Zamba2's Mamba-2 gated norm uses epsilon 1e-5; this model's norms use {eps}")
    layers, types, keys = ir.layers, [], []
    for i, x in enumerate(layers):
        if x.post_norm is not None:
            raise HFError(f"layer {i} '{x.definition}': Zamba2 has no post-norms")
        if x.kind == "transformer_block":
            if x.residual != Residual(input="concat_embed", into="next_input"):
                raise HFError(f"layer {i} '{x.definition}': Zamba2's shared block reads cat[h, embeddings] and sends "
                              "its output into the next layer's input (input = concat_embed, into = next_input)")
            if i + 1 >= len(layers) or layers[i + 1].kind != "mamba2":
                raise HFError(f"layer {i} '{x.definition}': a Zamba2 shared block is followed by its Mamba-2 layer")
            keys.append((x.tie_group, x.tie_slot or 0) if x.tie_group is not None else ("", i))
            continue
        if x.residual != Residual():
            raise HFError(f"layer {i} '{x.definition}': Zamba2's Mamba-2 layers have the plain residual")
        types.append("hybrid" if i and layers[i - 1].kind == "transformer_block" else "mamba")
    blocks = list(dict.fromkeys(keys))
    if not ir.tie_embeddings:  # transformers ties the shared blocks only together with the embeddings
        if len(blocks) != len(keys):
            raise HFError("transformers' Zamba2 ties its shared blocks only when it ties the embeddings "
                          "(tie_word_embeddings); with an untied head every hybrid layer owns its block")
        # nothing is tied; with one block per use transformers builds no adapter a use does not run
        blocks = blocks[:len(keys)]
    elif any(k != blocks[u % len(blocks)] for u, k in enumerate(keys)):
        raise HFError("Zamba2 uses its num_mem_blocks shared blocks in turn (use u runs block u % num_mem_blocks); "
                      f"this stack uses them in another order ({', '.join(k[0] or f'layer {k[1]}' for k in keys)})")
    tf = _one([x.mixer for x in layers if x.kind == "transformer_block"],
              "shared transformer block settings (Zamba2 has one)")
    ssm = _one([x.mixer for x in layers if x.kind == "mamba2"], "Mamba-2 settings (Zamba2 has one)")
    out = {**base, "model_type": MODEL_TYPE, "num_hidden_layers": len(types), "layers_block_type": types,
           "rms_norm_eps": eps, "num_mem_blocks": len(blocks), "add_bias_linear": False, "use_long_context": False,
           **hf_facet("mamba2").write(ssm, MODEL_TYPE, ir.d_model),
           **hf_facet("transformer_block").write(tf, MODEL_TYPE, ir.d_model)}
    if tf.attn.rope_theta is not None:
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": tf.attn.rope_theta}
    return out
