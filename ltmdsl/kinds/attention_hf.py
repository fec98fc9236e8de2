"""The Hugging Face facet of attention (see ltmdsl.hf.facet): config keys, tensor names and export fields.

Attention appears in Llama, Mistral, Mixtral, Qwen2 and Qwen3 (RoPE over the whole head, optional Llama 3.1
frequency scaling, per-family biases and windows, Qwen3's qk_norm), Jamba and Nemotron-H (no RoPE), and
Bamba (RoPE over the first head_dim * partial_rotary_factor channels, written `rope_dim`), Qwen3-Next
(partial RoPE, qk_norm and the output gate `gate`: q_proj emits each head's queries then its gate), and LFM2
(RoPE, no biases, always a per-head RMSNorm on q and k: qk_norm). Its tensors are `q_proj`, `k_proj`,
`v_proj`, `o_proj` (and `q_norm`, `k_norm`) under `self_attn` (Nemotron-H: `mixer`), the same names as the
runtime's, so they are copied as they are; except Qwen3-Next's q_norm / k_norm, which are zero-centred
(they scale by 1 + w) where the runtime's scale by w: op "plus_one" adds 1 on import; and LFM2's, which
names the output `out_proj` and the norms `q_layernorm`, `k_layernorm`.
Granite-4.0-H (granitemoehybrid): q/k/v/o under `self_attn`, head_dim = hidden_size // heads, one
`attention_bias` for all four, RoPE only with `position_embedding_type: "rope"` (its configs say "nope"), and the
softmax scale `attention_multiplier` (muP), written `scale` (left out when it equals head_dim^-1/2).
MiniMax's softmax layers (`full_attention`): GQA with RoPE over the whole head (transformers' MiniMaxAttention
ignores MiniMax-Text-01's `rotary_dim`, so a rotary_dim below head_dim is refused by name), no biases, a
window where `sliding_window` is set.
RecurrentGemma's local attention (`temporal_block`): a window (`attention_window_size`), RoPE on the first
half of each head (partial_rotary_factor 0.5, as its config class sets), head_dim = hidden_size // heads, a
q/k/v bias from `attention_bias` and always one on o_proj.
The families of ltmdsl/hf/families/ (qwen3_moe, gpt_oss, gemma3_text, llama4_text) read and write their own
attention fields; this facet names their tensors (`self_attn`): gpt-oss's `sinks` as is, Gemma-3's
zero-centred q/k norms through "plus_one", Llama-4's q_proj / k_proj rows through "rope_pairs" (its RoPE
rotates interleaved pairs). `call` writes every variant and any RoPE scaling (`scaling_text`).
"""

from __future__ import annotations

import math

from ltmdsl.evaluate import ROPE_SCALINGS
from ltmdsl.hf import HFError
from ltmdsl.hf.facet import HFFacet, ReadContext, Site, Source, copy_tensor
from ltmdsl.kinds.gated_deltanet_hf import QWEN3_NEXT_STYLE
from ltmdsl.hf.reader import Reader, dims, rope
from ltmdsl.hf.spec import num, show_value

TRANSFORMERS = ("llama", "mistral", "mixtral", "qwen2", "qwen3")
NO_ROPE = ("jamba", "nemotron_h")


def read(r: Reader, ctx: ReadContext) -> dict:
    """Spec values of the family's attention (its window, per layer, is the family's: `window` is left out)."""
    fam, d = ctx.family, ctx.d_model
    if fam in TRANSFORMERS:
        heads = r.int("num_attention_heads", 32)
        kv, head_dim = dims(r, d, heads, 128 if fam == "qwen3" else None,
                            {"mistral": 8, "mixtral": 8, "qwen2": 32, "qwen3": 32}.get(fam))
        theta, scaling, _ = rope(r, 1e6 if fam == "mixtral" else 10000.0, head_dim)  # whole head: partial refused
        bias = r.bool("attention_bias", False) if fam in ("llama", "qwen3") else False
        return dict(heads=heads, kv_heads=kv, head_dim=head_dim, rope_theta=theta, rope_scaling=scaling,
                    qkv_bias=bias or fam == "qwen2", out_bias=bias, qk_norm=fam == "qwen3")
    if fam == "jamba":
        heads = r.int("num_attention_heads", 32)
        kv = r.int("num_key_value_heads", 8)
        if d % heads or heads % kv:
            raise r.fail(f"hidden_size {d}, num_attention_heads {heads} and num_key_value_heads {kv} do not divide")
        r.expect("sliding_window", lambda v: v is None, "null")
        return dict(heads=heads, kv_heads=kv, head_dim=d // heads, rope_theta=None)
    if fam == "nemotron_h":  # NemotronHAttention: no RoPE, no biases (whatever attention_bias says), no window
        heads = r.int("num_attention_heads", 32)
        kv, head_dim = dims(r, d, heads, 128, 8)
        if r.present("attention_head_dim") and r.int("attention_head_dim") != head_dim:
            raise r.fail(f"'attention_head_dim' {r.cfg['attention_head_dim']} disagrees with the head_dim transformers "
                         f"uses ({head_dim}, from 'head_dim' or its default 128); make them agree")
        r.raw("attention_head_dim", None)  # the original configs' copy of head_dim
        r.expect("sliding_window", lambda v: v is None, "null")
        r.expect("attention_bias", lambda v: v in (None, False), "false (transformers' NemotronHAttention has no "
                 "biases whatever attention_bias says)", False)
        return dict(heads=heads, kv_heads=kv, head_dim=head_dim, rope_theta=None)
    if fam == "bamba":
        if not ctx.present:  # no attention layer: its settings, RoPE included, never reach the computation
            r.used.update({"num_attention_heads", "num_key_value_heads", "head_dim", "rope_theta", "rope_scaling",
                           "rope_parameters", "partial_rotary_factor", "attn_rotary_emb", "attention_bias"})
            return {}
        heads = r.int("num_attention_heads", 32)
        explicit_null = "num_key_value_heads" in r.cfg and r.cfg["num_key_value_heads"] is None  # BambaConfig: heads
        kv, head_dim = dims(r, d, heads, None, heads if explicit_null else 8)
        theta, scaling, rope_dim = rope(r, 10000.0, head_dim, partial=0.5)
        if r.present("attn_rotary_emb"):  # older Bamba configs state the rotated width; transformers ignores it
            stated = r.int("attn_rotary_emb")
            if stated != (rope_dim or head_dim):
                raise r.fail(f"'attn_rotary_emb' = {stated} disagrees with the {rope_dim or head_dim} channels that "
                             f"transformers rotates (head_dim {head_dim}, from 'head_dim' or 'hidden_size' / "
                             f"'num_attention_heads', times partial_rotary_factor); make them agree")
        bias = r.bool("attention_bias", False)
        return dict(heads=heads, kv_heads=kv, head_dim=head_dim, rope_theta=theta, qkv_bias=bias, out_bias=bias,
                    rope_scaling=scaling, rope_dim=rope_dim)
    if fam in QWEN3_NEXT_STYLE:  # Qwen3.5's attention is Qwen3-Next's (its config reads the same keys)
        heads = r.int("num_attention_heads", 16)
        kv, head_dim = dims(r, d, heads, 256, 2)
        factor = r.cfg.get("partial_rotary_factor", 0.25)  # Qwen3NextConfig setdefaults 0.25 and honours another
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not 0 < factor <= 1:
            r.used.add("partial_rotary_factor")
            raise r.fail(f"'partial_rotary_factor' must be a number in (0, 1], got {show_value(factor)}")
        theta, scaling, rope_dim = rope(r, 10000.0, head_dim, partial=float(factor))
        bias = r.bool("attention_bias", False)
        return dict(heads=heads, kv_heads=kv, head_dim=head_dim, rope_theta=theta, rope_scaling=scaling,
                    rope_dim=rope_dim, qkv_bias=bias, out_bias=bias, qk_norm=True, gate=True)
    if fam == "lfm2":
        heads = r.int("num_attention_heads", 32)
        if r.present("num_heads") and r.int("num_heads") != heads:  # the original config's alias
            raise r.fail(f"'num_heads' = {r.cfg['num_heads']} disagrees with 'num_attention_heads' = {heads}")
        r.raw("num_heads", None)
        kv, head_dim = dims(r, d, heads, None, 8)
        theta, scaling, _ = rope(r, 1e6, head_dim)  # Lfm2Attention rotates the whole head
        r.expect("use_pos_enc", lambda v: v in (None, True), "true (transformers' LFM2 always applies RoPE)")
        return dict(heads=heads, kv_heads=kv, head_dim=head_dim, rope_theta=theta, rope_scaling=scaling,
                    qk_norm=True)
    if fam == "minimax":
        heads = r.int("num_attention_heads", 32)
        explicit_null = "num_key_value_heads" in r.cfg and r.cfg["num_key_value_heads"] is None  # MiniMaxConfig: heads
        kv, head_dim = dims(r, d, heads, None, heads if explicit_null else 8)
        theta, scaling, _ = rope(r, 1e6, head_dim)  # MiniMaxRotaryEmbedding rotates the whole head
        r.expect("rotary_dim", lambda v: v is None or v == head_dim,
                 f"null or head_dim ({head_dim}): transformers' MiniMaxAttention rotates the whole head and ignores "
                 "rotary_dim, where MiniMax-Text-01's own code rotates only rotary_dim channels")
        return dict(heads=heads, kv_heads=kv, head_dim=head_dim, rope_theta=theta, rope_scaling=scaling,
                    window=r.opt_int("sliding_window", None))
    if fam == "recurrent_gemma":  # local attention: RecurrentGemmaConfig fixes head_dim = hidden_size // heads
        heads = r.int("num_attention_heads", 10)
        if d % heads:
            raise r.fail(f"hidden_size {d} is not a multiple of num_attention_heads {heads}")
        head_dim = d // heads
        r.expect("head_dim", lambda v: v in (None, head_dim), f"null or hidden_size // num_attention_heads = "
                 f"{head_dim} (RecurrentGemmaConfig overwrites it)")
        kv = r.int("num_key_value_heads", heads)
        if heads % kv:
            raise r.fail(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
        theta, scaling, rope_dim = rope(r, 10000.0, head_dim, partial=0.5)
        if scaling is not None:  # RecurrentGemmaConfig has no max_position_embeddings for a scaled RoPE to use
            key = "rope_scaling" if r.present("rope_scaling") else "rope_parameters"
            r.unsupported(key, "rope_type 'default' (transformers' RecurrentGemma builds no scaled RoPE)")
            scaling = None
        return dict(heads=heads, kv_heads=kv, head_dim=head_dim, rope_theta=theta,
                    rope_dim=rope_dim, window=r.int("attention_window_size", 2048),
                    qkv_bias=r.bool("attention_bias", False), out_bias=True)
    if fam == "granitemoehybrid":
        return _granite(r, d, ctx.present)
    raise HFError(f"internal: attention has no reader for {fam}")


#: GraniteMoeHybrid's position_embedding_type: RoPE for "rope", none for null or "nope".
GRANITE_POSITIONS = (None, "nope", "rope")


def _granite(r: Reader, d: int, present: bool) -> dict:
    """GraniteMoeHybridAttention's settings (module docstring)."""
    heads = r.int("num_attention_heads", 32)
    if d % heads:
        raise r.fail(f"hidden_size {d} is not a multiple of num_attention_heads {heads}")
    head_dim = d // heads
    r.expect("head_dim", lambda v: v in (None, head_dim), f"null or hidden_size // num_attention_heads = {head_dim} "
             "(GraniteMoeHybridAttention's head_dim)")
    kv = r.int("num_key_value_heads", heads)
    if heads % kv:
        raise r.fail(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    position = r.raw("position_embedding_type", None)
    if position not in GRANITE_POSITIONS:
        raise r.fail(f"'position_embedding_type' must be null, 'nope' or 'rope', got {show_value(position)}")
    if position == "rope":
        theta, scaling, _ = rope(r, 10000.0, head_dim)
    else:  # transformers builds no rotary embedding: its settings never reach the computation
        r.used.update({"rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor"})
        theta, scaling = None, None
    multiplier = r.float("attention_multiplier", 1.0)
    bias = r.bool("attention_bias", False)
    if not present:
        return {}
    return dict(heads=heads, kv_heads=kv, head_dim=head_dim, rope_theta=theta, rope_scaling=scaling,
                qkv_bias=bias, out_bias=bias, scale=None if multiplier == head_dim ** -0.5 else multiplier)


def _granite_fields(a, d: int) -> dict:
    why = _granite_misfit(a, d)
    if why:
        raise HFError(why)
    out = {"num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads, "attention_bias": a.qkv_bias,
           "attention_multiplier": a.score_scale, "position_embedding_type": "nope" if a.rope_theta is None else "rope"}
    if a.rope_theta is not None:
        scaled = rope_scaling_fields(a)
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": a.rope_theta, **scaled.get("rope_scaling", {})}
        if scaled:
            out["max_position_embeddings"] = scaled["max_position_embeddings"]
    return out


def _granite_misfit(a, d: int | None = None) -> str | None:
    if a.window is not None or a.qk_norm or a.rope_dim is not None or a.qkv_bias != a.out_bias \
            or a.query_pre_attn_scalar is not None:
        return ("Granite-4.0-H attention has RoPE over the whole head or none, no window, no qk_norm, and one "
                "attention_bias for q, k, v and o")
    if d is not None and a.head_dim * a.heads != d:
        return f"Granite-4.0-H's head_dim is hidden_size // heads ({d} // {a.heads}), not {a.head_dim}"
    return None


def call(v: dict) -> str:
    """`attention(...)` from validated values (defaults left out)."""
    args = [f"heads = {num(v['heads'])}", f"kv_heads = {num(v['kv_heads'])}", f"head_dim = {num(v['head_dim'])}",
            f"rope_theta = {'none' if v.get('rope_theta') is None else num(float(v['rope_theta']))}"]
    if v.get("rope_dim") is not None:
        args.append(f"rope_dim = {num(int(v['rope_dim']))}")
    if v.get("rope_scaling") is not None:
        args.append(f"rope_scaling = {scaling_text(v['rope_scaling'])}")
    for size in ("window", "chunk", "temperature_floor"):
        if v.get(size) is not None:
            args.append(f"{size} = {num(int(v[size]))}")
    if v.get("scale") is not None:
        args.append(f"scale = {num(float(v['scale']))}")
    for flag in ("qkv_bias", "out_bias", "qk_norm", "gate", "sinks", "qk_l2_norm"):
        if v.get(flag):
            args.append(f"{flag} = true")
    for number in ("softcap", "query_pre_attn_scalar", "temperature_scale"):
        if v.get(number) is not None:
            args.append(f"{number} = {num(float(v[number]))}")
    return f"attention({', '.join(args)})"


def scaling_text(s) -> str:
    """A RopeScaling as its spec call (`llama3(...)`, `linear(...)`, `yarn(...)`, ...): the keywords the spec
    language takes for that kind (ltmdsl.evaluate.ROPE_SCALINGS), those the scaling leaves unset omitted."""
    if s.kind not in ROPE_SCALINGS:
        raise HFError(f"internal: unknown rope scaling {s.kind!r}")
    required, optional = ROPE_SCALINGS[s.kind]
    args = []
    for name in required + optional:
        value = getattr(s, name)
        if value is None:
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, tuple):
            text = f"factors({', '.join(num(float(x)) for x in value)})"
        else:
            text = num(int(value)) if name == "original_context" else num(float(value))
        args.append(f"{name} = {text}")
    return f"{s.kind}({', '.join(args)})"


def _heads(a, d: int) -> dict:
    if a.v_head_dim != a.head_dim or not a.causal:
        raise HFError("attention with v_head_dim != head_dim or causal = false has no Hugging Face counterpart")
    out = {"num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads}
    if a.head_dim * a.heads != d:
        out["head_dim"] = a.head_dim
    return out


def rope_scaling_fields(a) -> dict:
    """`rope_scaling` in the transformers 4 form (`rope_theta` stays top-level), which transformers 4.43+ and 5
    both load; plus `max_position_embeddings` = factor * original_context, the context the scaling is for,
    because transformers warns when original_max_position_embeddings is not below max_position_embeddings
    (and the llama3 forward pass does not read it)."""
    s = a.rope_scaling
    if s is None:
        return {}
    if s.kind != "llama3":
        raise HFError(f"rope scaling {s.kind} has no Hugging Face counterpart (supported: llama3)")
    return scaling_fields(s)


def scaling_fields(s) -> dict:
    """Any RoPE scaling (llama3, linear, yarn) as `rope_scaling` in the transformers 4 form, plus a
    `max_position_embeddings` of factor * original context where the scaling has one (see
    `rope_scaling_fields`); {} for none. For the families whose transformers code applies every rope_type."""
    if s is None:
        return {}
    if s.kind == "linear":
        return {"rope_scaling": {"rope_type": "linear", "factor": s.factor}}
    if s.kind == "yarn":
        out = {"rope_type": "yarn", "factor": s.factor, "original_max_position_embeddings": s.original_context,
               "beta_fast": 32.0 if s.beta_fast is None else s.beta_fast,
               "beta_slow": 1.0 if s.beta_slow is None else s.beta_slow, "truncate": s.truncate is not False}
        out.update({k: getattr(s, k) for k in ("mscale", "mscale_all_dim", "attention_factor")
                    if getattr(s, k) is not None})
        return {"rope_scaling": out,
                "max_position_embeddings": max(s.original_context + 1, math.ceil(s.factor * s.original_context))}
    if s.kind != "llama3":
        raise HFError(f"rope scaling {s.kind} has no Hugging Face counterpart here (supported: llama3, linear, yarn)")
    return {"rope_scaling": {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                             "high_freq_factor": s.high_freq_factor,
                             "original_max_position_embeddings": s.original_context},
            "max_position_embeddings": max(s.original_context + 1, math.ceil(s.factor * s.original_context))}


def _qwen3_next_fields(a, d: int) -> dict:
    """Qwen3-Next's attention: output gate, qk_norm and RoPE (partial or whole-head), no window."""
    other = [v for v in unmapped_variants(a) if v != "gate"]
    if not a.gate or not a.qk_norm or a.rope_theta is None or a.window is not None or other \
            or a.qkv_bias != a.out_bias:
        raise HFError("Qwen3-Next attention has the output gate, qk_norm and RoPE, no window and no other "
                      "variant, and its attention_bias covers q, k, v and o alike")
    factor = a.rotary_dim / a.head_dim
    if a.head_dim * factor != a.rotary_dim:  # the float product transformers truncates must be exact
        raise HFError(f"rope_dim {a.rotary_dim} of head_dim {a.head_dim} has no partial_rotary_factor that "
                      f"transformers turns back into {a.rotary_dim} channels")
    out = {}
    rope_parameters = {"rope_type": "default", "rope_theta": a.rope_theta, "partial_rotary_factor": factor}
    if a.rope_scaling is not None:
        scaled = rope_scaling_fields(a)
        rope_parameters.update(scaled["rope_scaling"])
        out["max_position_embeddings"] = scaled["max_position_embeddings"]
    return {**out, **_heads(a, d), "head_dim": a.head_dim, "attention_bias": a.qkv_bias,
            "partial_rotary_factor": factor, "rope_parameters": rope_parameters}


def write(a, fam: str, d: int) -> dict:
    """The family's attention fields (one attention setting per config: the family checks they agree)."""
    if fam in QWEN3_NEXT_STYLE:
        return _qwen3_next_fields(a, d)
    if fam != "granitemoehybrid" and a.scale is not None:
        raise HFError(f"attention with scale = {a.scale:g} maps back only to Granite-4.0-H (attention_multiplier)")
    variants = unmapped_variants(a)
    if variants:
        raise HFError(f"attention variants ({', '.join(variants)}) are not mapped to Hugging Face yet")
    if fam in TRANSFORMERS:
        out = {"rope_theta": a.rope_theta, **rope_scaling_fields(a), **_heads(a, d)}
        if fam != "llama":  # per layer: the family checks that its layers' windows fit its one setting
            out["sliding_window"] = a.window
        if fam == "mixtral" and (a.qkv_bias or a.out_bias or a.qk_norm):
            raise HFError("Mixtral attention has no biases and no qk_norm")
        if fam == "qwen3":
            out.update(head_dim=a.head_dim, attention_bias=a.qkv_bias)
        if fam == "llama":
            out["attention_bias"] = a.qkv_bias
        return out
    if fam == "jamba":
        if a.window is not None or a.qkv_bias or a.out_bias or a.qk_norm or a.head_dim * a.heads != d:
            raise HFError("Jamba attention has no window, biases, qk_norm or head_dim override")
        return _heads(a, d)
    if fam == "nemotron_h":
        if a.rope_theta is not None or a.window is not None or a.qk_norm or a.qkv_bias or a.out_bias:
            raise HFError("Nemotron-H attention has no RoPE, window, qk_norm or biases")
        return dict(num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, head_dim=a.head_dim,
                    attention_bias=False)
    if fam == "bamba":
        if a.window is not None or a.qk_norm or a.qkv_bias != a.out_bias:
            raise HFError("Bamba attention has no window or qk_norm, and its attention_bias covers q, k, v and o alike")
        factor = a.rotary_dim / a.head_dim
        if a.head_dim * factor != a.rotary_dim:  # the float product transformers truncates must be exact
            raise HFError(f"rope_dim {a.rotary_dim} of head_dim {a.head_dim} has no partial_rotary_factor that "
                          f"transformers turns back into {a.rotary_dim} channels")
        out = {}
        rope_parameters = {"rope_type": "default", "rope_theta": a.rope_theta, "partial_rotary_factor": factor}
        if a.rope_scaling is not None:
            scaled = rope_scaling_fields(a)
            rope_parameters.update(scaled["rope_scaling"])
            out["max_position_embeddings"] = scaled["max_position_embeddings"]
        return {**out, **_heads(a, d), "attention_bias": a.qkv_bias, "rope_parameters": rope_parameters}
    if fam == "recurrent_gemma":
        why = _recurrent_gemma_misfit(a, d)
        if why:
            raise HFError(why)
        factor = a.rotary_dim / a.head_dim
        if a.head_dim * factor != a.rotary_dim:
            raise HFError(f"rope_dim {a.rotary_dim} of head_dim {a.head_dim} has no partial_rotary_factor that "
                          f"transformers turns back into {a.rotary_dim} channels")
        return {"num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads, "attention_bias": a.qkv_bias,
                "attention_window_size": a.window,
                "rope_parameters": {"rope_type": "default", "rope_theta": a.rope_theta, "partial_rotary_factor": factor}}
    if fam == "minimax":
        why = _minimax_misfit(a)
        if why:
            raise HFError(why)
        return {"rope_theta": a.rope_theta, **rope_scaling_fields(a), **_heads(a, d), "head_dim": a.head_dim,
                "sliding_window": a.window}
    if fam == "lfm2":
        why = _lfm2_misfit(a)
        if why:
            raise HFError(why)
        return {"rope_theta": a.rope_theta, **rope_scaling_fields(a), **_heads(a, d)}
    if fam == "granitemoehybrid":
        return _granite_fields(a, d)
    raise HFError(f"{fam} has no attention layers")


def _recurrent_gemma_misfit(a, d: int | None = None) -> str | None:
    if a.rope_theta is None or a.rope_scaling is not None or a.window is None:
        return "RecurrentGemma attention is local (a window) with plain RoPE"
    if a.qk_norm or not a.out_bias:
        return "RecurrentGemma attention has no qk_norm and always a bias on its output projection"
    if d is not None and a.head_dim * a.heads != d:
        return f"RecurrentGemma's head_dim is hidden_size // heads ({d} // {a.heads}), not {a.head_dim}"
    return None


def _minimax_misfit(a) -> str | None:
    if a.rope_theta is None or a.rope_dim is not None or a.qk_norm or a.qkv_bias or a.out_bias:
        return "MiniMax attention has RoPE over the whole head, no qk_norm and no biases"
    return None


def _lfm2_misfit(a) -> str | None:
    if a.rope_theta is None or a.rope_dim is not None or a.window is not None:
        return "LFM2 attention has RoPE over the whole head and no window"
    if not a.qk_norm or a.qkv_bias or a.out_bias:
        return "LFM2 attention has qk_norm and no biases"
    return None


def unmapped_variants(a) -> list[str]:
    """The attention variants the Llama-style and SSM-hybrid families cannot carry (the gate maps only to
    qwen3_next, see `_qwen3_next_fields`; sinks to gpt_oss, query_pre_attn_scalar to gemma3_text, the L2
    qk-norm and chunks to llama4_text: ltmdsl/hf/families/); export refuses them rather than writing plain
    attention."""
    out = [name for name, on in (("gate", a.gate), ("sinks", a.sinks), ("softcap", a.softcap is not None),
                                 ("qk_l2_norm", a.qk_l2_norm), ("chunk", a.chunk is not None),
                                 ("query_pre_attn_scalar", a.query_pre_attn_scalar is not None),
                                 ("temperature_floor", a.temperature_floor is not None)) if on]
    if a.rope_scaling is not None and a.rope_scaling.kind != "llama3":
        out.append(f"rope_scaling = {a.rope_scaling.kind}(...)")
    return out


def misfit(a, fam: str) -> str | None:
    """Why family `fam` (its representative model_type) has no place for this attention."""
    if fam in QWEN3_NEXT_STYLE:
        try:
            _qwen3_next_fields(a, 1)
        except HFError as e:
            return e.message
        return None
    variants = unmapped_variants(a)
    if variants:
        return f"its attention variants ({', '.join(variants)}) are not mapped to Hugging Face yet"
    if fam == "granitemoehybrid":
        return _granite_misfit(a)
    if a.scale is not None:
        return f"its scale ({a.scale:g}) maps only to Granite-4.0-H's attention_multiplier"
    if fam in TRANSFORMERS:
        return "this attention has no RoPE (rope_theta = none)" if a.rope_theta is None else None
    if fam == "jamba":
        return "Jamba attention has no RoPE and no window" if a.rope_theta is not None or a.window is not None \
            else None
    if fam == "bamba":
        return "Bamba attention has RoPE and no window" if a.rope_theta is None or a.window is not None else None
    if fam == "nemotron_h":
        return "Nemotron-H attention has no RoPE, window or biases" \
            if a.rope_theta is not None or a.window is not None or a.qkv_bias or a.out_bias else None
    if fam == "minimax":
        return _minimax_misfit(a)
    if fam == "lfm2":
        return _lfm2_misfit(a)
    if fam == "recurrent_gemma":
        return _recurrent_gemma_misfit(a)
    return f"{fam} has no attention layers"


def traits(a) -> frozenset[str]:
    """What families select on: RoPE or none, partial RoPE (Bamba's transformers code alone applies it), a
    window, biases and qk_norm (which pick Llama, Mistral, Qwen2 or Qwen3)."""
    flags = {"rope" if a.rope_theta is not None else "no_rope"}
    flags |= {name for name, on in (("partial_rope", a.rope_dim is not None), ("window", a.window is not None),
                                     ("qkv_bias", a.qkv_bias), ("out_bias", a.out_bias), ("qk_norm", a.qk_norm),
                                     ("gate", a.gate), ("scale", a.scale is not None)) if on}
    return frozenset(flags)


#: LFM2's names for the runtime's attention tensors (the rest are the same).
_LFM2_NAMES = {"o_proj": "out_proj", "q_norm": "q_layernorm", "k_norm": "k_layernorm"}


def tensors(facet: HFFacet, rest: str, site: Site) -> Source:
    """Names as the runtime's; Qwen3-Next's zero-centred q/k norm weights go through op "plus_one"; Llama-4's
    q_proj / k_proj rows through op "rope_pairs" (its RoPE rotates interleaved pairs, the runtime's halves);
    LFM2's `out_proj` / `q_layernorm` / `k_layernorm` renamed."""
    if site.family in (*QWEN3_NEXT_STYLE, "gemma3_text") and rest in ("q_norm.weight", "k_norm.weight"):
        return Source(copy_tensor(facet, rest, site).names, "plus_one")
    if site.family == "llama4_text" and rest.split(".")[0] in ("q_proj", "k_proj"):
        return Source(copy_tensor(facet, rest, site).names, "rope_pairs", group=site.hf["head_dim"])
    if site.family == "lfm2":
        module, _, tail = rest.partition(".")
        rest = f"{_LFM2_NAMES.get(module, module)}.{tail}"
    return copy_tensor(facet, rest, site)


HF = HFFacet(
    name="attention", label="attention",
    families=(*TRANSFORMERS, "jamba", "nemotron_h", "bamba", *QWEN3_NEXT_STYLE, "lfm2", "recurrent_gemma",
              "granitemoehybrid", "minimax"),
    modules={**{f: ("self_attn",) for f in (*TRANSFORMERS, "jamba", "bamba", *QWEN3_NEXT_STYLE, "lfm2", "qwen3_moe",
                                            "gpt_oss", "gemma3_text", "llama4_text", "granitemoehybrid",
                                            "minimax")},
             "nemotron_h": ("mixer",), "recurrent_gemma": ("temporal_block",)},
    read=read, call=call, write=write, misfit=misfit, traits=traits, tensors=tensors,
)
