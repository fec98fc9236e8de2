"""The Hugging Face facet of mla (see ltmdsl.hf.facet): config keys, tensor names and export fields.

Multi-head latent attention is the mixer of every layer of DeepSeek-V2 and DeepSeek-V3 (transformers'
DeepseekV2Attention / DeepseekV3Attention, under `self_attn`). Its keys are the same in every family that has
it (`FAMILIES`, with each config class's defaults in `DEFAULTS`): `num_attention_heads`, `q_lora_rank` (null:
a full-rank q_proj; absent: the class default), `kv_lora_rank`, `qk_nope_head_dim`, `qk_rope_head_dim`,
`v_head_dim`, `attention_bias` (q_a_proj, kv_a_proj_with_mqa and o_proj) and the RoPE settings. transformers
derives `head_dim` (= qk_rope_head_dim, the width its rotary embedding rotates) and `qk_head_dim` (= nope +
rope) and writes them into saved configs: stated, they must agree. `num_key_value_heads` must equal the heads
(MLA up-projects one key and value per head; transformers' attention would repeat them otherwise and fail).
The latent RMSNorms use transformers' default eps, 1e-6 (`latent_eps`), not rms_norm_eps.

RoPE: plain, Llama 3.1's llama3, or YaRN (`rope_type` / `type` "yarn": factor, original_max_position_embeddings,
beta_fast, beta_slow, mscale, mscale_all_dim, attention_factor, truncate), read as transformers 5's
`_compute_yarn_parameters` reads them: a null or 0 beta is the default (32 / 1), a null or 0 mscale or
mscale_all_dim is absent, a top-level `original_max_position_embeddings` wins over the dict's, and
max_position_embeddings stands in for both when neither states it. Under any scaled RoPE, transformers
multiplies the softmax scale by mscale(factor, mscale_all_dim)^2 (DeepSeek's attention correction), which the
language's mla does for yarn (`MLAConfig.scale`); so a non-yarn scaling that states mscale_all_dim is refused.
DeepSeek rotates interleaved channel pairs (`rope_interleave`, DeepSeek-V3's default true, and always in
DeepSeek-V2's complex-number RoPE), as the runtime does; `rope_interleave: false` (rotate_half over the
de-interleaved halves) is refused by name.

Tensors keep the runtime's names (q_proj or q_a_proj / q_a_layernorm / q_b_proj, kv_a_proj_with_mqa,
kv_a_layernorm, kv_b_proj, o_proj) under `self_attn`: copied as they are.
A family with MLA registers here: its model_type in `FAMILIES`, its config-class defaults in `DEFAULTS`.

Kimi-Linear (kimi_linear, transformers' KimiLinearAttention) has the same keys and tensors but no RoPE at all
(`NOPE`: rope_theta = none; the qk_rope_head_dim channels of its shared key are not rotated), so its config's
RoPE keys do not change what it computes: they are read and not used; `mla_use_nope` (the original code's
switch) must be true, as transformers always computes NoPE.
"""

from __future__ import annotations

import math

from ltmdsl.hf import HFError
from ltmdsl.hf.facet import HFFacet, ReadContext
from ltmdsl.hf.reader import YARN_KEYS, Reader, llama3, rope_context, rope_number, unknown_rope_keys
from ltmdsl.hf.spec import num, safe_text, show_value
from ltmdsl.ir import RopeScaling

FAMILIES = ("deepseek_v2", "deepseek_v3", "kimi_linear")
#: The families whose MLA applies no RoPE.
NOPE = ("kimi_linear",)
#: model_type -> its config class's defaults (transformers 5): heads, q_lora_rank, kv_lora_rank,
#: qk_nope_head_dim, qk_rope_head_dim, v_head_dim.
DEFAULTS = {
    "deepseek_v2": dict(heads=32, q_lora_rank=1536, kv_lora_rank=512, nope=128, rope=64, v=128),
    "deepseek_v3": dict(heads=128, q_lora_rank=1536, kv_lora_rank=512, nope=128, rope=64, v=128),
    "kimi_linear": dict(heads=32, q_lora_rank=None, kv_lora_rank=512, nope=128, rope=64, v=128),
}
#: The latent RMSNorms' eps: transformers builds them with its RMSNorm's default.
LATENT_EPS = 1e-6

ROPE_SUPPORTED = ("rope_type 'default' (plain RoPE), 'llama3' (Llama 3.1 frequency scaling) or 'yarn' (YaRN with "
                  "DeepSeek's mscale and mscale_all_dim)")


def _optional(r: Reader, key: str, rp: dict, name: str, zero_is_absent: bool) -> float | None:
    """An optional positive number of a rope dict; None when absent or null (or 0, where transformers' `or` /
    truthiness test treats 0 as absent)."""
    value = rp.get(name)
    if value is None or (zero_is_absent and value == 0 and not isinstance(value, bool)):
        return None
    return rope_number(r, rp, key, name, 0, True)


def _context(r: Reader, key: str, rp: dict) -> int:
    """original_max_position_embeddings as transformers' standardize_rope_params resolves it: the top-level key
    wins, then the dict's, then max_position_embeddings."""
    for where, value in (("original_max_position_embeddings", r.cfg.get("original_max_position_embeddings")),
                         (f"{key}.original_max_position_embeddings", rp.get("original_max_position_embeddings")),
                         ("max_position_embeddings", r.cfg.get("max_position_embeddings"))):
        if value is not None:
            return rope_context(r, where, value, "yarn")
    raise r.fail(f"rope_type 'yarn' needs '{key}.original_max_position_embeddings' (or max_position_embeddings)")


def yarn(r: Reader, key: str, rp: dict) -> RopeScaling | None:
    """YaRN from a checked `rope_type: yarn` dict (module docstring); None when it was dropped on request."""
    if unknown_rope_keys(r, key, rp, "yarn", YARN_KEYS):
        return None
    if rp.get("factor") is None:
        raise r.fail(f"'{key}.factor' must be stated for rope_type 'yarn' (ltmdsl does not derive it from "
                     "max_position_embeddings)")
    factor = rope_number(r, rp, key, "factor", 1, False)
    context = _context(r, key, rp)
    r.raw("original_max_position_embeddings", None)
    fast = _optional(r, key, rp, "beta_fast", True)
    slow = _optional(r, key, rp, "beta_slow", True)
    if (fast or 32.0) <= (slow or 1.0):
        raise r.fail(f"'{key}.beta_fast' ({fast or 32:g}) must be greater than '{key}.beta_slow' ({slow or 1:g})")
    truncate = rp.get("truncate")
    if truncate is not None and not isinstance(truncate, bool):
        raise r.fail(f"'{key}.truncate' must be true or false, got {show_value(truncate)}")
    return RopeScaling("yarn", factor, original_context=context, beta_fast=fast, beta_slow=slow,
                       mscale=_optional(r, key, rp, "mscale", True),
                       mscale_all_dim=_optional(r, key, rp, "mscale_all_dim", True),
                       attention_factor=_optional(r, key, rp, "attention_factor", False), truncate=truncate)


def rope(r: Reader, default_theta: float) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) of MLA's decoupled RoPE, which rotates all qk_rope_head_dim channels.

    As transformers 5 reads them: `rope_scaling` when set, else `rope_parameters` (a rope_theta inside wins);
    the two must agree when both are set. partial_rotary_factor must be 1 (transformers' DeepSeek rotary
    embedding would rotate fewer channels than its attention splits off)."""
    theta = r.float("rope_theta", default_theta)
    r.expect("partial_rotary_factor", lambda v: v in (None, 1, 1.0), "1.0 (MLA rotates all qk_rope_head_dim channels)")
    scaling, params = r.raw("rope_scaling", None), r.raw("rope_parameters", None)
    if scaling and params and isinstance(scaling, dict) and isinstance(params, dict) and \
            scaling != {k: v for k, v in params.items() if k != "rope_theta" or "rope_theta" in scaling}:
        raise r.fail("'rope_scaling' and 'rope_parameters' disagree (transformers 5 reads only 'rope_scaling'); "
                     "keep one of them")
    key, rp = ("rope_scaling", scaling) if scaling else ("rope_parameters", params)
    if not rp:
        return theta, None
    if not isinstance(rp, dict) or any(isinstance(v, dict) for v in rp.values()):
        nested = [safe_text(k, 40) for k, v in rp.items() if isinstance(v, dict)] if isinstance(rp, dict) else []
        r.unsupported(key, f"one dict for all layers with {ROPE_SUPPORTED}"
                           + (f"; not a dict in '{key}.{nested[0]}'" if nested else ""))
        return theta, None
    if rp.get("partial_rotary_factor") not in (None, 1, 1.0):
        r.unsupported(key, "partial_rotary_factor 1.0 (MLA rotates all qk_rope_head_dim channels)")
        return theta, None
    if "rope_theta" in rp:
        value = rp["rope_theta"]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0 \
                or value > 1e30:
            raise r.fail(f"'{key}.rope_theta' must be a positive number up to 1e+30, got {show_value(value)}")
        theta = float(value)
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type == "yarn":
        return theta, yarn(r, key, rp)
    if rope_type == "llama3":
        if rp.get("mscale_all_dim"):  # transformers' DeepSeek would also rescale the softmax: not expressible
            r.unsupported(key, "mscale_all_dim with rope_type 'yarn' only")
            return theta, None
        return theta, llama3(r, key, {k: v for k, v in rp.items() if k != "mscale_all_dim"})
    r.unsupported(key, ROPE_SUPPORTED)
    return theta, None


def _derived(r: Reader, key: str, value: int, how: str) -> None:
    """A key transformers derives and saves (head_dim, qk_head_dim): absent, null, or the derived value."""
    r.expect(key, lambda v: v is None or (v == value and not isinstance(v, bool)), f"null or {value} ({how})")


def read(r: Reader, ctx: ReadContext) -> dict:
    if ctx.family not in DEFAULTS:
        raise HFError(f"internal: mla has no reader for {ctx.family}")
    dflt = DEFAULTS[ctx.family]
    heads = r.int("num_attention_heads", dflt["heads"])
    r.expect("num_key_value_heads", lambda v: v is None or (v == heads and not isinstance(v, bool)),
             f"null or num_attention_heads ({heads}): MLA up-projects a key and a value for every head")
    if r.cfg.get("q_lora_rank") is None and ("q_lora_rank" in r.cfg or dflt["q_lora_rank"] is None):
        r.used.add("q_lora_rank")
        q_lora = None
    else:
        q_lora = r.int("q_lora_rank", dflt["q_lora_rank"])
    kv_lora = r.int("kv_lora_rank", dflt["kv_lora_rank"])
    nope = r.int("qk_nope_head_dim", dflt["nope"])
    rope_dim = r.int("qk_rope_head_dim", dflt["rope"])
    v = r.int("v_head_dim", dflt["v"])
    if rope_dim % 2:
        raise r.fail(f"'qk_rope_head_dim' must be even (RoPE rotates channel pairs), got {rope_dim}")
    _derived(r, "head_dim", rope_dim, "transformers sets head_dim = qk_rope_head_dim, the channels its RoPE rotates")
    _derived(r, "qk_head_dim", nope + rope_dim, "qk_nope_head_dim + qk_rope_head_dim")
    r.expect("rope_interleave", lambda v: v in (None, True),
             "true (DeepSeek's interleaved RoPE pairs; the rotate_half layout of false is not mapped)")
    if ctx.family in NOPE:  # no RoPE: the RoPE keys are unused (module docstring)
        r.expect("mla_use_nope", lambda v: v in (None, True), "true (transformers' Kimi-Linear MLA applies no RoPE)")
        for key in ("rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor"):
            r.raw(key, None)
        theta, scaling = None, None
    else:
        theta, scaling = rope(r, 10000.0)
    return dict(heads=heads, q_lora_rank=q_lora, kv_lora_rank=kv_lora, qk_nope_head_dim=nope,
                qk_rope_head_dim=rope_dim, v_head_dim=v, rope_theta=theta, rope_scaling=scaling,
                bias=r.bool("attention_bias", False))


def scaling_text(s: RopeScaling) -> str:
    """`yarn(...)` / `llama3(...)` spec text of a validated scaling (optional yarn keywords only when set)."""
    if s.kind == "llama3":
        return (f"llama3(factor = {num(float(s.factor))}, low_freq_factor = {num(float(s.low_freq_factor))}, "
                f"high_freq_factor = {num(float(s.high_freq_factor))}, "
                f"original_context = {num(int(s.original_context))})")
    if s.kind != "yarn":
        raise HFError(f"internal: unknown rope scaling {s.kind!r}")
    args = [f"factor = {num(float(s.factor))}", f"original_context = {num(int(s.original_context))}"]
    for name in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor"):
        if getattr(s, name) is not None:
            args.append(f"{name} = {num(float(getattr(s, name)))}")
    if s.truncate is not None:
        args.append(f"truncate = {'true' if s.truncate else 'false'}")
    return f"yarn({', '.join(args)})"


def call(v: dict) -> str:
    """`mla(...)` from validated values (every size stated; defaults of the flags left out)."""
    args = [f"heads = {num(v['heads'])}",
            f"q_lora_rank = {'none' if v['q_lora_rank'] is None else num(v['q_lora_rank'])}",
            f"kv_lora_rank = {num(v['kv_lora_rank'])}", f"qk_nope_head_dim = {num(v['qk_nope_head_dim'])}",
            f"qk_rope_head_dim = {num(v['qk_rope_head_dim'])}", f"v_head_dim = {num(v['v_head_dim'])}",
            f"rope_theta = {'none' if v['rope_theta'] is None else num(float(v['rope_theta']))}"]
    if v.get("rope_scaling") is not None:
        args.append(f"rope_scaling = {scaling_text(v['rope_scaling'])}")
    if v.get("bias"):
        args.append("bias = true")
    return f"mla({', '.join(args)})"


def rope_fields(s: RopeScaling | None) -> dict:
    """`rope_scaling` in the transformers 4 form (which transformers 5 also loads) and max_position_embeddings =
    factor * original context, the context the scaling is for."""
    if s is None:
        return {}
    if s.kind == "llama3":
        out = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
               "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_context}
    elif s.kind == "yarn":
        out = {"rope_type": "yarn", "factor": s.factor, "original_max_position_embeddings": s.original_context}
        out.update({k: getattr(s, k) for k in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                                               "attention_factor", "truncate") if getattr(s, k) is not None})
    else:
        raise HFError(f"MLA's rope scaling {s.kind} has no DeepSeek counterpart (supported: yarn, llama3)")
    return {"rope_scaling": out,
            "max_position_embeddings": max(s.original_context + 1, math.ceil(s.factor * s.original_context))}


def misfit(c, fam: str) -> str | None:
    if fam not in FAMILIES:
        return f"{fam} has no multi-head latent attention"
    if fam in NOPE:
        return "Kimi-Linear's MLA applies no RoPE (rope_theta = none)" if c.rope_theta is not None else \
            f"Kimi-Linear's latent norms use eps {LATENT_EPS:g}, not {c.latent_eps:g}" if c.latent_eps != LATENT_EPS \
            else None
    if c.rope_theta is None:
        return "DeepSeek's MLA always applies RoPE (rope_theta none is Kimi-Linear's NoPE MLA)"
    if c.latent_eps != LATENT_EPS:
        return f"DeepSeek's latent norms use eps {LATENT_EPS:g}, not {c.latent_eps:g}"
    if c.rope_scaling is not None and c.rope_scaling.kind not in ("yarn", "llama3"):
        return f"MLA's rope scaling {c.rope_scaling.kind} has no DeepSeek counterpart (supported: yarn, llama3)"
    return None


def write(c, fam: str, d: int) -> dict:
    why = misfit(c, fam)
    if why:
        raise HFError(why)
    out = {"num_attention_heads": c.heads, "num_key_value_heads": c.heads, "q_lora_rank": c.q_lora_rank,
           "kv_lora_rank": c.kv_lora_rank, "qk_nope_head_dim": c.qk_nope_head_dim,
           "qk_rope_head_dim": c.qk_rope_head_dim, "v_head_dim": c.v_head_dim, "attention_bias": c.bias}
    if fam in NOPE:
        return out
    out.update(rope_theta=c.rope_theta, **rope_fields(c.rope_scaling))
    if fam == "deepseek_v3":
        out["rope_interleave"] = True
    return out


def traits(c) -> frozenset[str]:
    return frozenset({"mla", "rope" if c.rope_theta is not None else "no_rope"})


HF = HFFacet(name="mla", label="MLA", families=FAMILIES, modules={f: ("self_attn",) for f in FAMILIES},
             read=read, call=call, write=write, misfit=misfit, traits=traits)
