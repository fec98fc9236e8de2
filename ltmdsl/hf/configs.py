"""Hugging Face `config.json` -> `Plan` (see spec.py), one reader function per model family.

We read the JSON ourselves (no `transformers` needed) with the defaults of the transformers 5 config classes,
and account for every key: a key is either mapped, known not to change the forward pass (metadata, token ids,
initialisation and training-only settings: `HARMLESS_KEYS`), or an error that lists what is supported.
`ignore=` names keys the caller explicitly accepts to drop (e.g. a `rope_scaling` of type yarn, to count a
model's parameters); each dropped key is recorded as a NOTE comment in the spec. RoPE is plain or scaled as
Llama 3.1 does (`rope_type: llama3`, written `rope_scaling = llama3(...)` in the spec), over the whole head or,
where transformers honours `partial_rotary_factor` (Bamba), over its first head_dim * factor channels
(`rope_dim`). Layer pattern conventions: Jamba places attention/experts where `i % period == offset` with
0-based i; Qwen2/3 slide from layer `max_window_layers` on or follow `layer_types`; Nemotron-H spells one
character per layer (M, *, -); Bamba lists its attention layers in `attn_layer_indices` (0-based).
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from typing import Any, Callable

from ltmdsl.hf import HFError
from ltmdsl.hf.spec import (Plan, attention_call, mamba2_call, mamba_call, mlp_call, moe_call, safe_text,
                            sanitize_name, show_value)
from ltmdsl.ir import RopeScaling
from ltmdsl.resolve import MAX_SUBLAYERS

#: Bounds checked before anything is built, so that a hostile config fails fast with the key named:
#: the file's size and nesting (HF configs nest 3 or 4 levels), every integer (widths, counts, ids: 2^31 - 1
#: is far beyond any published model, and products of such numbers stay exact and fast), every float (below
#: the spec language's largest number, 2^100), and the layer count (an HF layer is at most two sub-layers,
#: a mixer and an FFN, and a spec holds at most MAX_SUBLAYERS).
MAX_CONFIG_BYTES = 16 * 2**20
MAX_JSON_DEPTH = 32
MAX_INT = 2**31 - 1
MAX_FLOAT = 1e30
MAX_HF_LAYERS = MAX_SUBLAYERS // 2

SUPPORTED_FAMILIES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "mamba", "mamba2", "jamba", "nemotron_h",
                      "bamba")

#: Families we know of but cannot express exactly, and why (shown in the error).
UNSUPPORTED_REASONS = {
    "zamba2": "its shared transformer blocks take the concatenation of the hidden state and the embeddings "
              "and carry per-use LoRA adapters",
    "falcon_h1": "it scales every branch with muP multipliers and runs attention and Mamba-2 in parallel",
    "recurrent_gemma": "its RG-LRU recurrent blocks and local attention with partial RoPE have no ltmdsl layer",
}

#: Keys that never change what the forward pass computes: metadata, token ids, initialisation, training-only
#: settings (dropout, router losses and jitter), kernel selection and precision hints.
HARMLESS_KEYS = frozenset({
    "architectures", "model_type", "transformers_version", "_name_or_path", "auto_map", "name_or_path",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "initializer_range", "use_cache", "max_position_embeddings", "attention_dropout", "hidden_dropout",
    "output_router_logits", "router_aux_loss_coef", "router_jitter_noise", "z_loss_coefficient",
    "rescale_prenorm_residual", "time_step_min", "time_step_max", "time_step_floor", "time_step_init_scheme",
    "time_step_scale", "residual_in_fp32", "use_mamba_kernels", "use_mambapy", "use_associative_scan",
    "fused_add_norm", "num_logits_to_keep", "calc_logits_for_entire_prompt", "return_dict",
    "output_attentions", "output_hidden_states", "tokenizer_class", "pretraining_tp", "quantization_config",
    "torchscript", "chunk_size_feed_forward", "is_encoder_decoder", "problem_type", "id2label", "label2id",
    "task_specific_params", "tie_encoder_decoder", "prefix", "finetuning_task", "mamba_ssm_cache_dtype",
})

_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "bf16": "bf16", "fp16": "fp16",
           "fp32": "fp32", "half": "fp16", "float": "fp32"}
_MISSING = object()


# ---------------------------------------------------------------------------------------------------------
# Reading the JSON: every access is typed, validated and recorded.
# ---------------------------------------------------------------------------------------------------------


class _Reader:
    """Typed access to a config dict that remembers which keys were read; `finish` rejects the rest."""

    def __init__(self, cfg: dict, family: str, source: str, ignore: frozenset[str]):
        self.cfg, self.family, self.source, self.ignore = cfg, family, source, ignore
        self.used: set[str] = set()
        self.notes: list[str] = []

    def fail(self, message: str) -> HFError:
        return HFError(f"{self.family}: {message}", self.source)

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        self.used.add(key)
        value = self.cfg.get(key, None)
        if value is None:
            if default is _MISSING:
                raise self.fail(f"config has no '{key}'")
            return default
        return value

    def present(self, key: str) -> bool:
        return self.cfg.get(key) is not None

    def int(self, key: str, default: Any = _MISSING, *, minimum: int = 1, maximum: int = MAX_INT) -> int:
        value = self.raw(key, default)
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
            raise self.fail(f"'{key}' must be an integer from {minimum} to {maximum:,}, got {show_value(value)}")
        return value

    def layers(self, key: str = "num_hidden_layers", default: Any = _MISSING) -> int:
        """A layer count, bounded so that the spec's stack stays within MAX_SUBLAYERS."""
        return self.int(key, default, maximum=MAX_HF_LAYERS)

    def opt_int(self, key: str, default: int | None) -> int | None:
        return self.int(key, default) if self.present(key) or default is not None else self.raw(key, None)

    def float(self, key: str, default: Any = _MISSING) -> float:
        value = self.raw(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0 \
                or value > MAX_FLOAT:
            raise self.fail(f"'{key}' must be a positive finite number up to {MAX_FLOAT:g}, got {show_value(value)}")
        return float(value)

    def eps(self, key: str, default: Any = _MISSING) -> float:
        """A norm's epsilon: a number strictly between 0 and 1 (what the spec's rmsnorm accepts)."""
        value = self.float(key, default)
        if value >= 1:
            raise self.fail(f"'{key}' must be a norm epsilon between 0 and 1, got {show_value(value)}")
        return value

    def bool(self, key: str, default: bool) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise self.fail(f"'{key}' must be true or false, got {show_value(value)}")
        return value

    def expect(self, key: str, ok: Callable[[Any], bool], supported: str, default: Any = None) -> None:
        """A key whose only supported values are those `ok` accepts (others change the computation)."""
        value = self.raw(key, default)
        if not ok(value):
            self.unsupported(key, supported, default)

    def unsupported(self, key: str, supported: str, default: Any = None) -> None:
        """`key`'s value cannot be expressed: dropped with a NOTE when the caller ignores the key, else an error."""
        value = self.raw(key, default)
        if key in self.ignore:
            self.notes.append(safe_text(f"'{key}' ignored on request (outputs differ from the original): "
                                    f"{show_value(value)}", 200))
            return
        raise self.fail(f"'{key}' = {show_value(value)} is not supported (supported: {supported}); "
                        f"pass ignore=['{key}'] / --ignore {key} to drop it knowingly")

    def act(self, key: str = "hidden_act", default: str = "silu") -> None:
        self.expect(key, lambda v: v == "silu", "'silu'", default)

    def finish(self) -> tuple[str, ...]:
        unknown = sorted(k for k in self.cfg if k not in self.used and k not in HARMLESS_KEYS
                         and not k.endswith("_dropout") and k not in ("torch_dtype", "dtype"))
        dropped = [k for k in unknown if k in self.ignore]
        unknown = [k for k in unknown if k not in self.ignore]
        if unknown:
            raise self.fail("unknown config keys that may change the computation: "
                            + ", ".join(safe_text(k) for k in unknown)
                            + "; pass ignore=[...] / --ignore KEY for each one to import without them")
        self.notes.extend(f"'{safe_text(k)}' ignored on request" for k in dropped)
        return tuple(self.notes)


# ---------------------------------------------------------------------------------------------------------
# Shared pieces of the readers.
# ---------------------------------------------------------------------------------------------------------


#: What `rope_scaling` / `rope_parameters` may say, for error messages.
ROPE_SUPPORTED = ("rope_type 'default' (plain RoPE) or 'llama3' (Llama 3.1 frequency scaling: factor, "
                  "low_freq_factor, high_freq_factor, original_max_position_embeddings); linear, dynamic, yarn, "
                  "longrope and other rope types are not supported")
_LLAMA3_KEYS = ("rope_type", "type", "rope_theta", "partial_rotary_factor", "factor", "low_freq_factor",
                "high_freq_factor", "original_max_position_embeddings")


def _rope_number(r: _Reader, rp: dict, key: str, name: str, minimum: float, strict: bool,
                 minimum_from: str | None = None) -> float:
    """`rp[name]` as a finite number >= minimum (> minimum when strict); a missing or bad value is an error.
    `minimum_from` names the key the minimum is read from, so that the error names both."""
    value = rp.get(name)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
            or value < minimum or (strict and value == minimum) or value > MAX_FLOAT:
        bound = f"{minimum:g}" if minimum_from is None else f"'{key}.{minimum_from}' ({minimum:g})"
        raise r.fail(f"'{key}.{name}' must be a number {'>' if strict else '>='} {bound} and <= {MAX_FLOAT:g}, "
                     f"got {show_value(value)}")
    return float(value)


def _llama3(r: _Reader, key: str, rp: dict) -> RopeScaling | None:
    """Llama 3.1's scaling from a checked `rope_type: llama3` dict; None when it was dropped on request."""
    unknown = sorted(str(k) for k in rp if k not in _LLAMA3_KEYS)
    if unknown:
        r.unsupported(key, f"for rope_type 'llama3' the keys {', '.join(_LLAMA3_KEYS)}; not "
                           f"{', '.join(safe_text(k) for k in unknown)}")
        return None
    factor = _rope_number(r, rp, key, "factor", 1, False)
    low = _rope_number(r, rp, key, "low_freq_factor", 0, True)
    high = _rope_number(r, rp, key, "high_freq_factor", low, True, minimum_from="low_freq_factor")
    # transformers falls back to max_position_embeddings (standardize_rope_params); a config stating neither
    # relies on a family default we would only guess, so it is an error here
    where, context = f"{key}.original_max_position_embeddings", rp.get("original_max_position_embeddings")
    if context is None:
        where, context = "max_position_embeddings", r.cfg.get("max_position_embeddings")
    if isinstance(context, float) and context.is_integer() and abs(context) < 2**63:
        context = int(context)
    if not isinstance(context, int) or isinstance(context, bool) or not 1 <= context <= MAX_INT:
        raise r.fail(f"'{where}' must be an integer from 1 to {MAX_INT:,} for rope_type 'llama3', "
                     f"got {show_value(context)}")
    return RopeScaling("llama3", factor, low, high, context)


def _rope(r: _Reader, default: float, head_dim: int,
          partial: float | None = None) -> tuple[float, RopeScaling | None, int | None]:
    """The RoPE base, its frequency scaling (plain, or Llama 3.1's llama3) and the rotated channels per head.

    transformers 4 configs say `rope_theta` and `rope_scaling`; transformers 5 writes one `rope_parameters`
    dict that holds rope_theta too. As transformers 5 does (`convert_rope_params_to_dict`), `rope_scaling`
    is read when it is set and `rope_parameters` otherwise, and a rope_theta inside the dict wins over the
    top-level one. Other rope types (linear, dynamic, yarn, longrope, ...) are refused, or dropped with a
    NOTE when the key is ignored.

    `partial` is the family's partial_rotary_factor where transformers applies partial rotary embeddings
    (Bamba: its config class always passes 0.5, which fills the dict unless the dict states its own factor);
    then rope_dim = head_dim * factor, an even whole number, or None for the whole head. Where `partial` is
    None the family's transformers code rotates the whole head whatever the factor says, so any factor but
    1.0 is refused: the checkpoint's intent and transformers' computation would disagree.
    """
    theta = r.float("rope_theta", default)
    if partial is None:
        r.expect("partial_rotary_factor", lambda v: v in (None, 1, 1.0), f"1.0; {_whole_head(r.family)}")
    else:  # transformers replaces the top-level key with the family's factor, so only that value is honest
        r.expect("partial_rotary_factor", lambda v: v is None or v == partial,
                 f"{partial:g}, which transformers' {r.family} config class always sets at the top level; another "
                 f"factor must go in rope_parameters.partial_rotary_factor")
    factor, where = (1.0 if partial is None else partial), "partial_rotary_factor"
    scaling, params = r.raw("rope_scaling", None), r.raw("rope_parameters", None)
    if scaling and params and isinstance(scaling, dict) and isinstance(params, dict) and \
            scaling != {k: v for k, v in params.items() if k != "rope_theta" or "rope_theta" in scaling}:
        raise r.fail("'rope_scaling' and 'rope_parameters' disagree (transformers 5 reads only 'rope_scaling'); "
                     "keep one of them")
    key, rp = ("rope_scaling", scaling) if scaling else ("rope_parameters", params)
    if not rp:  # absent, null or {}
        return theta, None, _rotary_dim(r, where, factor, head_dim)
    if not isinstance(rp, dict) or any(isinstance(v, dict) for v in rp.values()):
        r.unsupported(key, f"one dict for all layers with {ROPE_SUPPORTED}")
        return theta, None, _rotary_dim(r, where, factor, head_dim)
    if "partial_rotary_factor" in rp:  # the dict's own factor wins (transformers only setdefaults it)
        if partial is None and rp["partial_rotary_factor"] not in (1, 1.0):
            r.unsupported(key, f"partial_rotary_factor 1.0; {_whole_head(r.family)}")
            return theta, None, None
        factor, where = rp["partial_rotary_factor"], f"{key}.partial_rotary_factor"
    rope_dim = _rotary_dim(r, where, factor, head_dim)
    if "rope_theta" in rp:
        value = rp["rope_theta"]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0 \
                or value > MAX_FLOAT:
            raise r.fail(f"'{key}.rope_theta' must be a positive number up to {MAX_FLOAT:g}, got {show_value(value)}")
        theta = float(value)
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type == "default":
        return theta, None, rope_dim
    if rope_type == "llama3":
        return theta, _llama3(r, key, rp), rope_dim
    r.unsupported(key, ROPE_SUPPORTED)
    return theta, None, rope_dim


def _whole_head(family: str) -> str:
    """Why a partial_rotary_factor below 1 is refused for a family whose transformers code ignores it."""
    return f"transformers' {family} applies RoPE to the whole head, whatever partial_rotary_factor says"


def _rotary_dim(r: _Reader, where: str, factor: Any, head_dim: int) -> int | None:
    """rope_dim = head_dim * factor (None for the whole head), refused unless it is an even whole number >= 2.

    transformers truncates int(head_dim * factor); a product that is not already whole is refused rather than
    truncated, since the checkpoint's author most likely meant something else.
    """
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not 0 < factor <= 1:
        raise r.fail(f"'{where}' must be a number in (0, 1], got {show_value(factor)}")
    dim = head_dim * factor
    if dim == head_dim:
        return None
    if not float(dim).is_integer() or int(dim) % 2 or dim < 2:
        raise r.fail(f"'{where}' = {show_value(factor)} rotates head_dim * factor = {head_dim} * {show_value(factor)} "
                     f"= {dim:g} channels, which is not an even whole number >= 2 (ltmdsl's rope_dim)")
    return int(dim)


def _dtype(cfg: dict, family: str, source: str) -> str:
    """The spec dtype of `torch_dtype` (transformers 4) or `dtype` (transformers 5); float32 when neither is set."""
    key = "torch_dtype" if cfg.get("torch_dtype") is not None else "dtype"
    value = cfg.get(key)
    if value is None:
        return "fp32"
    if not isinstance(value, str) or value not in _DTYPES:
        raise HFError(f"{family}: '{key}' = {show_value(value)} is not supported (supported: "
                      f"{', '.join(sorted(_DTYPES))})", source or None)
    return _DTYPES[value]


def _dims(r: _Reader, d: int, heads: int, head_dim_default: int | None,
          kv_default: int | None = None) -> tuple[int, int]:
    """(kv_heads, head_dim) with HF's defaults (kv = heads and head_dim = d / heads unless the family fixes them)."""
    kv = r.int("num_key_value_heads", kv_default or heads)
    if heads % kv:
        raise r.fail(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    if head_dim_default is None and not r.present("head_dim"):
        if d % heads:
            raise r.fail(f"hidden_size {d} is not a multiple of num_attention_heads {heads}; set head_dim")
        head_dim_default = d // heads
    return kv, r.int("head_dim", head_dim_default)


def _window_types(r: _Reader, layers: int, default_window: int | None) -> list[int | None]:
    """Qwen2/Qwen3: the window of each layer from layer_types or use_sliding_window + max_window_layers."""
    use = r.bool("use_sliding_window", False)
    window = r.int("sliding_window", default_window) if use else None
    r.raw("sliding_window", None)
    first = r.int("max_window_layers", 28, minimum=0)
    types = r.raw("layer_types", None)
    if types is None:
        return [window if window is not None and i >= first else None for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers or \
            any(t not in ("full_attention", "sliding_attention") for t in types):
        raise r.fail(f"'layer_types' must list {layers} of 'full_attention' / 'sliding_attention'")
    return [window if t == "sliding_attention" else None for t in types]


def _attention_windows(r: _Reader, windows: list[int | None], make: Callable[[int | None], tuple[str, str]],
                       ffn: tuple[str, str], ffn_symbol: str) -> tuple[dict, dict, tuple[str, ...]]:
    """Definitions, legend and tokens for an attention + FFN stack whose layers differ only by window."""
    definitions: dict[str, tuple[str, str]] = {}
    legend: dict[str, str] = {}
    distinct = list(dict.fromkeys(windows))
    symbols = {}
    for w in distinct:
        if w is None:
            name, symbol = "attn", "A"
        else:
            name, symbol = ("swa", "S") if len([x for x in distinct if x is not None]) == 1 else (f"swa{w}", None)
            if symbol is None:
                symbol = "SWXYZUVT"[len([x for x in symbols if x is not None]) % 8]
        definitions[name] = make(w)
        legend[symbol] = name
        symbols[w] = symbol
    ffn_name = "moe" if ffn[0] == "moe" else "ffn"
    definitions[ffn_name] = ffn
    legend[ffn_symbol] = ffn_name
    return definitions, legend, tuple(symbols[w] + ffn_symbol for w in windows)


# ---------------------------------------------------------------------------------------------------------
# One reader per family.
# ---------------------------------------------------------------------------------------------------------


def _transformer(r: _Reader) -> dict:
    """Llama, Mistral, Mixtral, Qwen2, Qwen3: attention + (MLP or MoE) per HF layer, RoPE, RMSNorm."""
    fam = r.family
    defaults = {
        "llama": (32000, 4096, 11008, 32, 32, 1e-6),
        "mistral": (32000, 4096, 14336, 32, 32, 1e-6),
        "mixtral": (32000, 4096, 14336, 32, 32, 1e-5),
        "qwen2": (151936, 4096, 22016, 32, 32, 1e-6),
        "qwen3": (151936, 4096, 22016, 32, 32, 1e-6),
    }[fam]
    vocab = r.int("vocab_size", defaults[0])
    d = r.int("hidden_size", defaults[1])
    d_ff = r.int("intermediate_size", defaults[2])
    layers = r.layers("num_hidden_layers", defaults[3])
    heads = r.int("num_attention_heads", defaults[4])
    eps = r.eps("rms_norm_eps", defaults[5])
    tied = r.bool("tie_word_embeddings", False)
    kv, head_dim = _dims(r, d, heads, 128 if fam == "qwen3" else None,
                         {"mistral": 8, "mixtral": 8, "qwen2": 32, "qwen3": 32}.get(fam))
    theta, scaling, _ = _rope(r, 1e6 if fam == "mixtral" else 10000.0, head_dim)  # whole head: partial refused
    r.act()
    qkv_bias = out_bias = mlp_bias = False
    if fam in ("llama", "qwen3"):
        qkv_bias = out_bias = r.bool("attention_bias", False)
    if fam == "llama":
        mlp_bias = r.bool("mlp_bias", False)
    if fam == "qwen2":
        qkv_bias = True
    if fam in ("qwen2", "qwen3"):
        windows = _window_types(r, layers, 4096)
    else:
        window = r.opt_int("sliding_window", 4096 if fam == "mistral" else None)
        windows = [window] * layers
    if fam == "mixtral":
        experts = r.int("num_local_experts", 8)
        top_k = r.int("num_experts_per_tok", 2)
        if top_k > experts:
            raise r.fail(f"num_experts_per_tok {top_k} > num_local_experts {experts}")
        ffn, symbol = moe_call(experts, top_k, d_ff, "softmax_topk_renorm"), "E"
    else:
        ffn, symbol = mlp_call(d_ff, "swiglu", mlp_bias), "-"

    def make(w: int | None) -> tuple[str, str]:
        return attention_call(heads, kv, head_dim, theta, window=w, qkv_bias=qkv_bias, out_bias=out_bias,
                          qk_norm=fam == "qwen3", rope_scaling=scaling)

    definitions, legend, tokens = _attention_windows(r, windows, make, ffn, symbol)
    return dict(vocab=vocab, d_model=d, norm_eps=eps, tied=tied, definitions=definitions, legend=legend,
                tokens=tokens)


def _mamba_family(r: _Reader) -> dict:
    """Mamba-1 (state-spaces/mamba-*-hf): one Mamba mixer with an RMSNorm per HF layer, no FFN."""
    vocab = r.int("vocab_size", 50280)
    d = r.int("hidden_size", 768)
    layers = r.layers("num_hidden_layers", 32)
    if r.present("n_layer") and r.layers("n_layer") != layers:
        raise r.fail("'n_layer' disagrees with 'num_hidden_layers'")
    eps = r.eps("layer_norm_epsilon", 1e-5)
    expand = _int_expand(r, "expand", 2)
    if r.present("intermediate_size") and r.int("intermediate_size") != expand * d:
        raise r.fail(f"'intermediate_size' {r.cfg['intermediate_size']} != expand * hidden_size = {expand * d}")
    dt_rank = r.raw("time_step_rank", "auto")
    dt_rank = math.ceil(d / 16) if dt_rank == "auto" else r.int("time_step_rank")
    r.act()
    r.expect("rms_norm", lambda v: v is True, "true", True)
    mixer = mamba_call(r.int("state_size", 16), r.int("conv_kernel", 4), expand, dt_rank,
                   r.bool("use_conv_bias", True), r.bool("use_bias", False), False)
    return dict(vocab=vocab, d_model=d, norm_eps=eps, tied=r.bool("tie_word_embeddings", True),
                definitions={"ssm": mixer}, legend={"M": "ssm"}, tokens=("M",) * layers)


def _int_expand(r: _Reader, key: str, default: int) -> int:
    value = r.raw(key, default)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_INT:
        raise r.fail(f"'{key}' = {show_value(value)} is not supported (ltmdsl needs an integer expansion factor "
                     f"from 1 to {MAX_INT:,})")
    return value


def _json_float(value: Any) -> Any:
    """Numbers as transformers 5 writes the non-finite ones: `{"__float__": "Infinity"}`."""
    if isinstance(value, dict) and set(value) == {"__float__"} \
            and value["__float__"] in ("Infinity", "-Infinity", "NaN"):
        return float(value["__float__"].replace("Infinity", "inf"))
    return value


def _time_step_limit_ok(value: Any) -> bool:
    if value is None:
        return True
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return False
    low, high = (_json_float(v) for v in value)
    return low == 0 and high == float("inf")


def _mamba2_family(r: _Reader) -> dict:
    """Mamba-2 (transformers' Mamba2ForCausalLM): one SSD mixer with an RMSNorm per HF layer, no FFN."""
    vocab = r.int("vocab_size", 32768)
    d = r.int("hidden_size", 4096)
    layers = r.layers("num_hidden_layers", 64)
    eps = r.eps("layer_norm_epsilon", 1e-5)
    heads, head_dim = r.int("num_heads", 128), r.int("head_dim", 64)
    expand = _int_expand(r, "expand", 2)
    groups = r.int("n_groups", 8)
    if heads * head_dim != expand * d:
        raise r.fail(f"num_heads * head_dim = {heads * head_dim} != expand * hidden_size = {expand * d}")
    if heads % groups:
        raise r.fail(f"num_heads {heads} is not a multiple of n_groups {groups}")
    r.act()
    r.expect("rms_norm", lambda v: v is True, "true", True)
    r.expect("norm_before_gate", lambda v: v is False, "false", False)
    r.expect("time_step_limit", _time_step_limit_ok, "[0.0, inf]")
    r.raw("time_step_rank", None)  # unused by the Mamba-2 forward pass
    mixer = mamba2_call(r.int("state_size", 128), head_dim, groups, expand, r.int("conv_kernel", 4),
                    r.int("chunk_size", 256), r.bool("use_conv_bias", True), r.bool("use_bias", False))
    return dict(vocab=vocab, d_model=d, norm_eps=eps, tied=r.bool("tie_word_embeddings", False),
                definitions={"ssm": mixer}, legend={"M": "ssm"}, tokens=("M",) * layers)


def _jamba(r: _Reader) -> dict:
    """Jamba: attention (no RoPE) on layers i % attn_layer_period == attn_layer_offset, Mamba-1 elsewhere;
    MoE on layers i % expert_layer_period == expert_layer_offset, a SwiGLU MLP elsewhere (0-based i)."""
    vocab = r.int("vocab_size", 65536)
    d = r.int("hidden_size", 4096)
    d_ff = r.int("intermediate_size", 14336)
    layers = r.layers("num_hidden_layers", 32)
    heads = r.int("num_attention_heads", 32)
    kv = r.int("num_key_value_heads", 8)
    if d % heads or heads % kv:
        raise r.fail(f"hidden_size {d}, num_attention_heads {heads} and num_key_value_heads {kv} do not divide")
    eps = r.eps("rms_norm_eps", 1e-6)
    experts = r.int("num_experts", r.cfg.get("num_local_experts", 16))
    r.raw("num_local_experts", None)
    top_k = r.int("num_experts_per_tok", 2)
    a_period, a_offset = r.int("attn_layer_period", 8), r.int("attn_layer_offset", 4, minimum=0)
    e_period, e_offset = r.int("expert_layer_period", 2), r.int("expert_layer_offset", 1, minimum=0)
    if a_offset >= a_period or e_offset >= e_period:
        raise r.fail(f"'attn_layer_offset' ({a_offset}) must be smaller than 'attn_layer_period' ({a_period}) and "
                     f"'expert_layer_offset' ({e_offset}) smaller than 'expert_layer_period' ({e_period})")
    if top_k > experts:
        raise r.fail(f"num_experts_per_tok {top_k} > num_experts {experts}")
    r.act()
    r.expect("mamba_inner_layernorms", lambda v: v is True, "true", True)
    r.expect("sliding_window", lambda v: v is None, "null")
    dt_rank = r.raw("mamba_dt_rank", "auto")
    dt_rank = math.ceil(d / 16) if dt_rank == "auto" else r.int("mamba_dt_rank")
    mamba = mamba_call(r.int("mamba_d_state", 16), r.int("mamba_d_conv", 4), _int_expand(r, "mamba_expand", 2),
                   dt_rank, r.bool("mamba_conv_bias", True), r.bool("mamba_proj_bias", False), True)
    definitions = {}
    legend = {}
    kinds = [i % a_period == a_offset for i in range(layers)]
    moes = [experts > 1 and i % e_period == e_offset for i in range(layers)]
    if not all(kinds):
        definitions["ssm"], legend["M"] = mamba, "ssm"
    if any(kinds):
        definitions["attn"], legend["A"] = attention_call(heads, kv, d // heads, None), "attn"
    if not all(moes):
        definitions["ffn"], legend["-"] = mlp_call(d_ff, "swiglu"), "ffn"
    if any(moes):
        definitions["moe"], legend["E"] = moe_call(experts, top_k, d_ff, "softmax_topk"), "moe"
    tokens = tuple(("A" if a else "M") + ("E" if e else "-") for a, e in zip(kinds, moes))
    return dict(vocab=vocab, d_model=d, norm_eps=eps, tied=r.bool("tie_word_embeddings", False),
                definitions=definitions, legend=legend, tokens=tokens,
                hf=dict(attn_layer_period=a_period, attn_layer_offset=a_offset,
                        expert_layer_period=e_period, expert_layer_offset=e_offset))


_NEMOTRON_TYPES = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}


def _nemotron_h(r: _Reader) -> dict:
    """Nemotron-H (dense): one block per HF layer, Mamba-2 (M), attention without RoPE (*) or a relu2 MLP (-),
    from `hybrid_override_pattern` (one character per layer) or `layers_block_type`."""
    vocab = r.int("vocab_size", 131072)
    d = r.int("hidden_size", 4096)
    eps = r.eps("layer_norm_epsilon", 1e-5)
    if r.present("hybrid_override_pattern"):
        pattern = r.raw("hybrid_override_pattern")
        if not isinstance(pattern, str) or any(c not in _NEMOTRON_TYPES for c in pattern) or not pattern:
            raise r.fail("'hybrid_override_pattern' must be a string of M, *, - and E")
        if len(pattern) > MAX_HF_LAYERS:
            raise r.fail(f"'hybrid_override_pattern' lists {len(pattern):,} layers; at most {MAX_HF_LAYERS:,} are "
                         "supported")
        types = [_NEMOTRON_TYPES[c] for c in pattern]
        r.raw("layers_block_type", None)
        r.raw("layer_types", None)
    else:
        types = r.raw("layers_block_type", None) or r.raw("layer_types", None)
        r.used.update({"layers_block_type", "layer_types"})
        if not isinstance(types, list) or not types or len(types) > MAX_HF_LAYERS or \
                any(not isinstance(t, str) or t not in _NEMOTRON_TYPES.values() for t in types):
            raise r.fail("needs 'hybrid_override_pattern' or 'layers_block_type' (a list of at most "
                         f"{MAX_HF_LAYERS:,} of linear_attention, full_attention, mlp)")
    if r.present("num_hidden_layers") and r.layers("num_hidden_layers") != len(types):
        raise r.fail(f"'num_hidden_layers' {r.cfg['num_hidden_layers']} != {len(types)} layers in the pattern")
    if "moe" in types:
        raise r.fail("MoE layers ('E') are not supported: Nemotron-H experts add a shared expert and "
                     "grouped routing that ltmdsl's moe cannot express (supported: M, * and -)")
    for key in ("n_routed_experts", "n_shared_experts", "moe_intermediate_size", "moe_shared_expert_intermediate_size",
                "moe_latent_size", "moe_shared_expert_overlap", "num_experts_per_tok", "routed_scaling_factor",
                "n_group", "topk_group", "norm_topk_prob", "mtp_layers_block_type", "mtp_hybrid_override_pattern"):
        r.raw(key, None)  # MoE/MTP settings: unused by dense layers
    r.expect("num_nextn_predict_layers", lambda v: v in (None, 0), "0")
    heads = r.int("num_attention_heads", 32)
    kv, head_dim = _dims(r, d, heads, 128, 8)
    r.expect("sliding_window", lambda v: v is None, "null")
    attn_bias = r.bool("attention_bias", False)
    heads_m, head_dim_m = r.int("mamba_num_heads", 128), r.int("mamba_head_dim", 64)
    expand = _int_expand(r, "mamba_expand", r.cfg.get("expand", 2))
    r.raw("expand", None)
    groups = r.int("mamba_n_groups", r.cfg.get("n_groups", 8))
    r.raw("n_groups", None)
    if heads_m * head_dim_m != expand * d:
        raise r.fail(f"mamba_num_heads * mamba_head_dim = {heads_m * head_dim_m} != expand * hidden_size "
                     f"= {expand * d} (ltmdsl's mamba2 needs d_inner = expand * d_model)")
    r.act("mamba_hidden_act", "silu")
    r.expect("mlp_hidden_act", lambda v: v == "relu2", "'relu2'", "relu2")
    r.expect("time_step_limit", _time_step_limit_ok, "[0.0, inf]")
    r.expect("mamba_dt_limit", _time_step_limit_ok, "[0.0, inf]")
    for alias in ("mamba_dt_min", "mamba_dt_max", "mamba_dt_init_floor"):
        r.raw(alias, None)
    conv = r.int("mamba_d_conv", r.cfg.get("conv_kernel", 4))
    r.raw("conv_kernel", None)
    chunk = r.int("mamba_chunk_size", r.cfg.get("chunk_size", 128))
    r.raw("chunk_size", None)
    conv_bias = r.bool("mamba_conv_bias", r.cfg.get("use_conv_bias", True))
    r.raw("use_conv_bias", None)
    mamba = mamba2_call(r.int("ssm_state_size", 128), head_dim_m, groups, expand, conv, chunk, conv_bias,
                    r.bool("use_bias", False))
    r.expect("mamba_proj_bias", lambda v: v in (None, False), "false")
    definitions, legend = {}, {}
    symbol = {"linear_attention": "M", "full_attention": "A", "mlp": "-"}
    if "linear_attention" in types:
        definitions["ssm"], legend["M"] = mamba, "ssm"
    if "full_attention" in types:
        definitions["attn"] = attention_call(heads, kv, head_dim, None, qkv_bias=attn_bias, out_bias=attn_bias)
        legend["A"] = "attn"
    if "mlp" in types:
        definitions["ffn"], legend["-"] = mlp_call(r.int("intermediate_size", 21504), "relu2",
                                               r.bool("mlp_bias", False)), "ffn"
    r.raw("intermediate_size", None)
    r.raw("mlp_bias", None)
    return dict(vocab=vocab, d_model=d, norm_eps=eps, tied=r.bool("tie_word_embeddings", False),
                definitions=definitions, legend=legend, tokens=tuple(symbol[t] for t in types))


def _bamba(r: _Reader) -> dict:
    """Bamba (IBM): per HF layer a Mamba-2 mixer, or attention where the 0-based index is in
    `attn_layer_indices`, then a SwiGLU MLP. Its attention applies RoPE to the first head_dim *
    partial_rotary_factor channels of each head (0.5: BambaConfig forces it unless rope_parameters says
    otherwise); the Mamba-2 gated RMSNorm is grouped by mamba_n_groups and uses rms_norm_eps."""
    vocab = r.int("vocab_size", 128000)
    d = r.int("hidden_size", 4096)
    d_ff = r.int("intermediate_size", 14336)
    layers = r.layers("num_hidden_layers", 32)
    eps = r.eps("rms_norm_eps", 1e-5)
    r.act()
    mlp_bias = r.bool("mlp_bias", False)
    r.expect("time_step_limit", _time_step_limit_ok, "[0.0, inf]")
    for key in ("layers_block_type", "layer_types"):
        if key in r.cfg:
            r.used.add(key)
            raise r.fail(f"'{key}' cannot be set in a Bamba config (BambaConfig derives it from attn_layer_indices "
                         "and transformers refuses to load a config that sets it); give attn_layer_indices instead")
    indices = r.raw("attn_layer_indices", [])
    if not isinstance(indices, list) or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < layers
                                            for i in indices):
        raise r.fail(f"'attn_layer_indices' must list 0-based layer indices below num_hidden_layers = {layers}, "
                     f"got {show_value(indices)}")
    attn_at = set(indices)
    if attn_at:
        heads = r.int("num_attention_heads", 32)
        explicit_null = "num_key_value_heads" in r.cfg and r.cfg["num_key_value_heads"] is None  # BambaConfig: heads
        kv, head_dim = _dims(r, d, heads, None, heads if explicit_null else 8)
        theta, scaling, rope_dim = _rope(r, 10000.0, head_dim, partial=0.5)
        if r.present("attn_rotary_emb"):  # older Bamba configs state the rotated width; transformers ignores it
            stated = r.int("attn_rotary_emb")
            if stated != (rope_dim or head_dim):
                raise r.fail(f"'attn_rotary_emb' = {stated} disagrees with the {rope_dim or head_dim} channels that "
                             f"transformers rotates (head_dim {head_dim}, from 'head_dim' or 'hidden_size' / "
                             f"'num_attention_heads', times partial_rotary_factor); make them agree")
        bias = r.bool("attention_bias", False)
        attn = attention_call(heads, kv, head_dim, theta, qkv_bias=bias, out_bias=bias, rope_scaling=scaling,
                              rope_dim=rope_dim)
    else:  # no attention layer: its settings, RoPE included, never reach the computation
        r.used.update({"num_attention_heads", "num_key_value_heads", "head_dim", "rope_theta", "rope_scaling",
                       "rope_parameters", "partial_rotary_factor", "attn_rotary_emb", "attention_bias"})
    n_heads = r.int("mamba_n_heads", 128)
    expand = _int_expand(r, "mamba_expand", 2)
    d_inner = expand * d
    if r.raw("mamba_d_head", "auto") == "auto":  # as BambaConfig: the inner width split over the heads
        if d_inner % n_heads:
            raise r.fail(f"mamba_n_heads {n_heads} does not divide mamba_expand * hidden_size = {d_inner}")
        d_head = d_inner // n_heads
    else:
        d_head = r.int("mamba_d_head")
    if d_head * n_heads != d_inner:
        raise r.fail(f"mamba_n_heads * mamba_d_head = {n_heads * d_head} != mamba_expand * hidden_size = {d_inner}")
    groups = r.int("mamba_n_groups", 1)
    if n_heads % groups:
        raise r.fail(f"mamba_n_heads {n_heads} is not a multiple of mamba_n_groups {groups}")
    definitions, legend = {}, {}
    if len(attn_at) < layers:
        definitions["ssm"] = mamba2_call(r.int("mamba_d_state", 256), d_head, groups, expand, r.int("mamba_d_conv", 4),
                                         r.int("mamba_chunk_size", 256), r.bool("mamba_conv_bias", True),
                                         r.bool("mamba_proj_bias", False))
        legend["M"] = "ssm"
    for key in ("mamba_d_state", "mamba_d_conv", "mamba_chunk_size", "mamba_conv_bias", "mamba_proj_bias"):
        r.raw(key, None)  # read above when there is a Mamba layer; unused otherwise
    if attn_at:
        definitions["attn"], legend["A"] = attn, "attn"
    definitions["ffn"], legend["-"] = mlp_call(d_ff, "swiglu", mlp_bias), "ffn"
    return dict(vocab=vocab, d_model=d, norm_eps=eps, tied=r.bool("tie_word_embeddings", False),
                definitions=definitions, legend=legend,
                tokens=tuple(("A" if i in attn_at else "M") + "-" for i in range(layers)),
                hf=dict(attn_layer_indices=sorted(attn_at)))


_READERS = {"llama": _transformer, "mistral": _transformer, "mixtral": _transformer, "qwen2": _transformer,
            "qwen3": _transformer, "mamba": _mamba_family, "mamba2": _mamba2_family, "jamba": _jamba,
            "nemotron_h": _nemotron_h, "bamba": _bamba}


# ---------------------------------------------------------------------------------------------------------
# Entry points.
# ---------------------------------------------------------------------------------------------------------


def read_config(path) -> tuple[dict, str]:
    """The config dict of a checkpoint folder (its config.json) or of a config file, and the file's path."""
    path = os.fspath(path)
    cfg_path = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; only a regular file is read
        fd = os.open(cfg_path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise HFError("cannot read config: not a regular file", cfg_path)
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise HFError(f"cannot read config: {e.strerror or e}", cfg_path) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise HFError(f"config file larger than {MAX_CONFIG_BYTES // 2**20} MiB", cfg_path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HFError(f"not a JSON config: not UTF-8 text ({e.reason} at byte {e.start})", cfg_path) from None
    if json_depth(text, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise HFError(f"not a JSON config: arrays and objects nested more than {MAX_JSON_DEPTH} levels deep",
                      cfg_path)
    try:
        cfg = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, an integer of over 4300 digits
        raise HFError(f"not a JSON config: {safe_text(e, 200)}", cfg_path) from None
    if not isinstance(cfg, dict):
        raise HFError("config.json must hold a JSON object", cfg_path)
    return cfg, cfg_path


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def json_depth(text: str, limit: int) -> int:
    """How deeply the arrays and objects of a JSON text nest (brackets inside strings do not count), found
    without parsing, so that hostile nesting is refused before `json.loads` recurses; stops past `limit`."""
    depth = deepest = 0
    for c in _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)):
        depth += 1 if c in "[{" else -1
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                break
    return deepest


def plan_from_config(cfg: dict, *, name: str | None = None, source: str = "",
                     ignore=()) -> Plan:
    """Resolve an HF config dict into a `Plan`; raises HFError naming every unsupported setting."""
    family = cfg.get("model_type")
    if not isinstance(family, str):
        raise HFError(f"'model_type' must be a string naming the model family (supported: "
                      f"{', '.join(SUPPORTED_FAMILIES)}), got {show_value(family)}", source or None)
    if family in UNSUPPORTED_REASONS:
        raise HFError(f"model_type '{family}' is not supported: {UNSUPPORTED_REASONS[family]} "
                      f"(supported: {', '.join(SUPPORTED_FAMILIES)})", source or None)
    if family not in _READERS:
        raise HFError(f"model_type {show_value(family)} is not supported (supported: {', '.join(SUPPORTED_FAMILIES)})",
                      source or None)
    r = _Reader(cfg, family, source or "<config>", frozenset(ignore))
    fields = _READERS[family](r)
    notes = r.finish()
    if name is None:
        name = default_name(cfg, source)
    hf = fields.pop("hf", {})
    return Plan(family=family, name=sanitize_name(name), dtype=_dtype(cfg, family, source), notes=notes, source=source,
                hf=hf, **fields)


def default_name(cfg: dict, source: str = "") -> str:
    """The model's name: `_name_or_path`'s last part, else the checkpoint folder's or the JSON file's name."""
    base = cfg.get("_name_or_path")
    if not isinstance(base, str) or not base.strip("/"):
        if source and os.path.basename(source) == "config.json":
            base = os.path.basename(os.path.dirname(os.path.abspath(source)))
        elif source:
            base = os.path.splitext(os.path.basename(source))[0]
        else:
            base = str(cfg.get("model_type") or "model")
    return base.rstrip("/").split("/")[-1]


def spec_from_config(cfg: dict, *, name: str | None = None, source: str = "", ignore=()) -> str:
    """Spec text for an HF config dict (see `plan_from_config`), checked to load (see `checked_spec_text`)."""
    return checked_spec_text(plan_from_config(cfg, name=name, source=source, ignore=ignore), cfg)


def checked_spec_text(plan: Plan, cfg: dict) -> str:
    """The plan's spec text, loaded once to be sure that it is a valid model.

    The readers check every key's type and range and the relations between keys that they know of; a value
    the language still refuses (one of its own ranges or divisibility rules) is an HFError that names the spec
    parameter, the config key(s) that hold its value, and the language's reason, never a spec that does not load.
    """
    from ltmdsl.errors import SpecError
    from ltmdsl.loader import loads

    text = plan.spec_text()
    try:
        loads(text, name="<import-hf>")
    except SpecError as e:
        errors = [d for d in e.diagnostics if d.severity == "error"] or list(e.diagnostics)
        raise HFError(f"{plan.family}: {_explain(errors[0], text, cfg)}", plan.source or None) from None
    return text


_ARGUMENT = re.compile(r"([A-Za-z_]\w*)\s*=\s*([^,(){}\s]*)")


def _explain(diagnostic, text: str, cfg: dict) -> str:
    """A load error of generated spec text in the config's terms: the spec parameter at the error's column,
    the config keys (top level or one level down, `rope_scaling.factor`) whose value it is, and the reason."""
    lines = text.splitlines()
    line = lines[diagnostic.line - 1] if 0 < diagnostic.line <= len(lines) else ""
    args = [m for m in _ARGUMENT.finditer(line) if m.start() < max(diagnostic.col, 1)]
    if not args:
        return f"the config does not describe a valid model: {diagnostic.message}"
    param, literal = args[-1].group(1), args[-1].group(2)
    keys = _keys_holding(cfg, literal)
    source = (f"from config key {', '.join(repr(k) for k in keys)}" if keys
              else "derived from several config keys")
    return f"the config sets the model's {param} = {safe_text(literal, 40)} ({source}), which is invalid: " \
           f"{diagnostic.message}"


def _keys_holding(cfg: dict, literal: str) -> list[str]:
    """Config keys whose numeric value equals a spec literal (`32`, `1e-05`), nested dicts one level down."""
    try:
        target = float(literal)
    except ValueError:
        return []
    found = []
    for key, value in cfg.items():
        inner = value.items() if isinstance(value, dict) else ()
        for name, v in [(str(key), value), *((f"{key}.{k}", w) for k, w in inner)]:
            if isinstance(v, (int, float)) and not isinstance(v, bool) and float(v) == target:
                found.append(safe_text(name, 60))
    return found[:4]
