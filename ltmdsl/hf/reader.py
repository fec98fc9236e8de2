"""Reading a Hugging Face config dict: typed, validated access that accounts for every key, and the pieces
that several layer kinds and families share (RoPE settings, attention dims, expansion factors).

Pure (no torch, no transformers): `ltmdsl import-hf` runs on the core install. The family readers
(ltmdsl/hf/families/<model_type>.py) and each kind's HF facet (ltmdsl/kinds/<kind>_hf.py) read through one `Reader`, so that
`Reader.finish` can refuse any key nobody read. Defaults are those of the transformers 5 config classes.
"""

from __future__ import annotations

import math
import struct
from typing import Any, Callable

from ltmdsl.hf import HFError
from ltmdsl.hf.spec import safe_text, show_value
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
    "init_method",  # the initialisation scheme (Granite-4.0-H's "mup"): no weight it draws survives a load
})


_MISSING = object()


class Reader:
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


def rope_number(r: Reader, rp: dict, key: str, name: str, minimum: float, strict: bool,
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


def unknown_rope_keys(r: Reader, key: str, rp: dict, rope_type: str, allowed: tuple[str, ...]) -> bool:
    """Whether `rp` holds keys a `rope_type` dict may not: each is reported (`r.unsupported`, an error unless
    dropped on request), and the caller then drops the scaling."""
    unknown = sorted(str(k) for k in rp if k not in allowed)
    if unknown:
        r.unsupported(key, f"for rope_type '{rope_type}' the keys {', '.join(allowed)}; not "
                           f"{', '.join(safe_text(k) for k in unknown)}")
    return bool(unknown)


def rope_context(r: Reader, where: str, value, rope_type: str) -> int:
    """An original context length read from `where` (a whole float is accepted as transformers stores it)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_INT:
        raise r.fail(f"'{where}' must be an integer from 1 to {MAX_INT:,} for rope_type '{rope_type}', "
                     f"got {show_value(value)}")
    return value


def llama3(r: Reader, key: str, rp: dict) -> RopeScaling | None:
    """Llama 3.1's scaling from a checked `rope_type: llama3` dict; None when it was dropped on request."""
    if unknown_rope_keys(r, key, rp, "llama3", _LLAMA3_KEYS):
        return None
    factor = rope_number(r, rp, key, "factor", 1, False)
    low = rope_number(r, rp, key, "low_freq_factor", 0, True)
    high = rope_number(r, rp, key, "high_freq_factor", low, False, minimum_from="low_freq_factor")  # equal: Llama-4
    # transformers falls back to max_position_embeddings (standardize_rope_params); a config stating neither
    # relies on a family default we would only guess, so it is an error here
    where, context = f"{key}.original_max_position_embeddings", rp.get("original_max_position_embeddings")
    if context is None:
        where, context = "max_position_embeddings", r.cfg.get("max_position_embeddings")
    return RopeScaling("llama3", factor, low, high, rope_context(r, where, context, "llama3"))


def linear(r: Reader, key: str, rp: dict) -> RopeScaling | None:
    """Position interpolation from a checked `rope_type: linear` dict (Gemma-3's global layers): every frequency
    divided by `factor`; None when it was dropped on request."""
    unknown = sorted(str(k) for k in rp if k not in ("rope_type", "type", "rope_theta", "partial_rotary_factor",
                                                     "factor"))
    if unknown:
        r.unsupported(key, f"for rope_type 'linear' the keys rope_type, rope_theta, factor; not "
                           f"{', '.join(safe_text(k) for k in unknown)}")
        return None
    return RopeScaling("linear", rope_number(r, rp, key, "factor", 1, False))


YARN_KEYS = ("rope_type", "type", "rope_theta", "partial_rotary_factor", "factor", "original_max_position_embeddings",
              "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate")


def yarn(r: Reader, key: str, rp: dict) -> RopeScaling | None:
    """YaRN from a checked `rope_type: yarn` dict (gpt-oss, DeepSeek, Qwen long-context), read as transformers'
    `_compute_yarn_parameters` reads it: `factor` (null: max_position_embeddings / original context), the
    original context (the dict's, else max_position_embeddings, as `standardize_rope_params` fills it),
    beta_fast / beta_slow (null or 0: 32 / 1), mscale, mscale_all_dim and attention_factor (null: unset) and
    `truncate` (default true). None when it was dropped on request."""
    if unknown_rope_keys(r, key, rp, "yarn", YARN_KEYS):
        return None
    where, context = f"{key}.original_max_position_embeddings", rp.get("original_max_position_embeddings")
    if context is None:
        where, context = "max_position_embeddings", r.cfg.get("max_position_embeddings")
    context = rope_context(r, where, context, "yarn")
    if rp.get("factor") is None:
        longest = r.cfg.get("max_position_embeddings")
        if not isinstance(longest, int) or isinstance(longest, bool) or not context <= longest <= MAX_INT:
            raise r.fail(f"'{key}.factor' is null, so transformers divides max_position_embeddings by the original "
                         f"context {context}; 'max_position_embeddings' must then be an integer >= {context}, got "
                         f"{show_value(longest)}")
        factor = longest / context
    else:
        factor = rope_number(r, rp, key, "factor", 1, False)
    optional = {name: (None if rp.get(name) is None else rope_number(r, rp, key, name, 0, True))
                for name in ("mscale", "mscale_all_dim", "attention_factor")}
    fast = rope_number(r, rp, key, "beta_fast", 0, True) if rp.get("beta_fast") else 32.0
    slow = rope_number(r, rp, key, "beta_slow", 0, True) if rp.get("beta_slow") else 1.0
    if not fast > slow:
        raise r.fail(f"'{key}.beta_fast' ({fast:g}) must be greater than '{key}.beta_slow' ({slow:g})")
    truncate = rp.get("truncate", True)
    if not isinstance(truncate, bool):
        raise r.fail(f"'{key}.truncate' must be true or false, got {show_value(truncate)}")
    return RopeScaling("yarn", factor, original_context=context, beta_fast=fast, beta_slow=slow,
                       truncate=truncate, **optional)


#: The scaled RoPE types a family may accept besides llama3 (`rope(..., scalings=...)`), and their readers.
SCALINGS = {"linear": linear, "yarn": yarn}


def rope(r: Reader, default: float, head_dim: int, partial: float | None = None,
         scalings: tuple[str, ...] = ()) -> tuple[float, RopeScaling | None, int | None]:
    """The RoPE base, its frequency scaling (plain, or Llama 3.1's llama3) and the rotated channels per head.

    transformers 4 configs say `rope_theta` and `rope_scaling`; transformers 5 writes one `rope_parameters`
    dict that holds rope_theta too. As transformers 5 does (`convert_rope_params_to_dict`), `rope_scaling`
    is read when it is set and `rope_parameters` otherwise, and a rope_theta inside the dict wins over the
    top-level one. Other rope types (linear, dynamic, yarn, longrope, ...) are refused, or dropped with a
    NOTE when the key is ignored; a family whose checkpoints use another type names it in `scalings`
    ("linear", "yarn": `SCALINGS`).

    `partial` is the family's partial_rotary_factor where transformers applies partial rotary embeddings
    (Bamba: its config class always passes 0.5, which fills the dict unless the dict states its own factor);
    then rope_dim = head_dim * factor, an even whole number, or None for the whole head. Where `partial` is
    None the family's transformers code rotates the whole head whatever the factor says, so any factor but
    1.0 is refused: the checkpoint's intent and transformers' computation would disagree.
    """
    theta = r.float("rope_theta", default)
    if partial is None:
        r.expect("partial_rotary_factor", lambda v: v in (None, 1, 1.0), f"1.0; {whole_head(r.family)}")
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
        return theta, None, rotary_dim(r, where, factor, head_dim)
    if not isinstance(rp, dict) or any(isinstance(v, dict) for v in rp.values()):
        nested = [safe_text(k, 40) for k, v in rp.items() if isinstance(v, dict)] if isinstance(rp, dict) else []
        r.unsupported(key, f"one dict for all layers with {ROPE_SUPPORTED}"
                           + (f"; not a dict in '{key}.{nested[0]}'" if nested else ""))
        return theta, None, rotary_dim(r, where, factor, head_dim)
    if "partial_rotary_factor" in rp:  # the dict's own factor wins (transformers only setdefaults it)
        if partial is None and rp["partial_rotary_factor"] not in (1, 1.0):
            r.unsupported(key, f"partial_rotary_factor 1.0; {whole_head(r.family)}")
            return theta, None, None
        factor, where = rp["partial_rotary_factor"], f"{key}.partial_rotary_factor"
    rope_dim = rotary_dim(r, where, factor, head_dim)
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
        return theta, llama3(r, key, rp), rope_dim
    if rope_type in scalings:
        return theta, SCALINGS[rope_type](r, key, rp), rope_dim
    r.unsupported(key, ROPE_SUPPORTED if not scalings else
                  f"rope_type 'default', 'llama3' or {' or '.join(map(repr, scalings))} ({r.family})")
    return theta, None, rope_dim


def whole_head(family: str) -> str:
    """Why a partial_rotary_factor below 1 is refused for a family whose transformers code ignores it."""
    return f"transformers' {family} applies RoPE to the whole head, whatever partial_rotary_factor says"


def rotary_dim(r: Reader, where: str, factor: Any, head_dim: int) -> int | None:
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


def dims(r: Reader, d: int, heads: int, head_dim_default: int | None,
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




def int_expand(r: Reader, key: str, default: int) -> int:
    value = r.raw(key, default)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_INT:
        raise r.fail(f"'{key}' = {show_value(value)} is not supported (ltmdsl needs an integer expansion factor "
                     f"from 1 to {MAX_INT:,})")
    return value


def json_float(value: Any) -> Any:
    """Numbers as transformers 5 writes the non-finite ones: `{"__float__": "Infinity"}`."""
    if isinstance(value, dict) and set(value) == {"__float__"} \
            and value["__float__"] in ("Infinity", "-Infinity", "NaN"):
        return float(value["__float__"].replace("Infinity", "inf"))
    return value


def time_step_limit_ok(value: Any) -> bool:
    if value is None:
        return True
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return False
    low, high = (json_float(v) for v in value)
    return low == 0 and high == float("inf")


def kind_values(kind: str, r: Reader, d: int, present: bool = True, **shared) -> dict:
    """One kind's spec values, read by its HF facet in this family's key names."""
    from ltmdsl.hf.facet import ReadContext
    from ltmdsl.kinds.hf import hf_facet  # the kinds' facets import this module

    return hf_facet(kind).read(r, ReadContext(r.family, d, present, shared))


def define(kind: str, values: dict) -> tuple[str, str]:
    """A layer definition (kind, call text) from a kind's values."""
    from ltmdsl.kinds.hf import hf_facet

    return kind, hf_facet(kind).call(values)


def bf16(x: float) -> float:
    """x rounded to bfloat16 (through float32, to nearest even), as torch.tensor(x, dtype=torch.bfloat16) does."""
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return struct.unpack("<f", struct.pack("<I", bits))[0]

