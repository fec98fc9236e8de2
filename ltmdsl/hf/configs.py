"""Hugging Face `config.json` -> `Plan` (see spec.py), one reader function per model family.

A family's reader owns its stack layout (which HF layer holds which kind) and its model-level fields
(vocab, width, norm, tying); each layer kind reads its own keys and writes its spec text through its HF
facet (ltmdsl/kinds/<kind>_hf.py, `read` and `call`), all through one `reader.Reader`.

We read the JSON ourselves (no `transformers` needed) with the defaults of the transformers 5 config classes,
and account for every key: a key is either mapped, known not to change the forward pass (metadata, token ids,
initialisation and training-only settings: `reader.HARMLESS_KEYS`), or an error that lists what is supported.
`ignore=` names keys the caller explicitly accepts to drop (e.g. a `rope_scaling` of type yarn, to count a
model's parameters); each dropped key is recorded as a NOTE comment in the spec. RoPE is plain or scaled as
Llama 3.1 does (`rope_type: llama3`, written `rope_scaling = llama3(...)` in the spec), over the whole head or,
where transformers honours `partial_rotary_factor` (Bamba, Qwen3-Next), over its first head_dim * factor channels
(`rope_dim`). Layer pattern conventions: Jamba places attention/experts where `i % period == offset` with
0-based i; Qwen2/3 slide from layer `max_window_layers` on or follow `layer_types`; Nemotron-H spells one
character per layer (M, *, -); Bamba lists its attention layers in `attn_layer_indices` (0-based);
Qwen3-Next names each layer's mixer in `layer_types` (or puts attention on every
`full_attention_interval`-th layer, 1-based); LFM2 names each layer's type in `layer_types` ("conv" or
"full_attention"), or its attention layers in `full_attn_idxs`; RecurrentGemma repeats `block_types`
("recurrent", "attention") over its layers; xLSTM repeats one mLSTM block over `num_hidden_layers` (`num_blocks`).
Families added since read in their own modules (ltmdsl/hf/families/<model_type>.py: DeepSeek-V2 / V3).
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
from typing import Callable

from ltmdsl.hf import HFError
from ltmdsl.hf.facet import ReadContext
from ltmdsl.hf.families import (deepseek_v2, deepseek_v3, falcon_h1, gemma3, gpt_oss, granitemoehybrid, kimi_linear,
                                llama4, minimax, qwen3_5, qwen3_moe, zamba2)
from ltmdsl.hf.reader import MAX_CONFIG_BYTES, MAX_HF_LAYERS, MAX_JSON_DEPTH, Reader
from ltmdsl.hf.spec import Plan, safe_text, sanitize_name, show_value
from ltmdsl.kinds.hf import hf_facet
from ltmdsl.kinds.mlstm_hf import soft_cap
from ltmdsl.kinds.rg_lru_hf import hidden_activation

SUPPORTED_FAMILIES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "mamba", "mamba2", "jamba", "nemotron_h",
                      "bamba", "qwen3_next", "lfm2", "recurrent_gemma", "xlstm",
                      "deepseek_v2", "deepseek_v3", *qwen3_5.MODEL_TYPES, "kimi_linear",
                      "qwen3_moe", "gpt_oss", "gemma3_text", "gemma3", "llama4_text", "granitemoehybrid", minimax.MODEL_TYPE,
                      "falcon_h1", "llama4", zamba2.MODEL_TYPE)

#: Families we know of but cannot express exactly, and why (shown in the error).
UNSUPPORTED_REASONS: dict[str, str] = {}

_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "bf16": "bf16", "fp16": "fp16",
           "fp32": "fp32", "half": "fp16", "float": "fp32"}


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


def _layer(kind: str, r: Reader, d: int, present: bool = True, **shared) -> dict:
    """One kind's spec values, read by its HF facet in this family's key names."""
    return hf_facet(kind).read(r, ReadContext(r.family, d, present, shared))


def _define(kind: str, values: dict) -> tuple[str, str]:
    """A layer definition (kind, call text) from a kind's values."""
    return kind, hf_facet(kind).call(values)


def _window_types(r: Reader, layers: int, default_window: int | None) -> list[int | None]:
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


def _attention_windows(r: Reader, windows: list[int | None], make: Callable[[int | None], tuple[str, str]],
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
# One reader per family: the stack layout and the model-level fields; each layer kind reads its own keys.
# ---------------------------------------------------------------------------------------------------------


def _transformer(r: Reader) -> dict:
    """Llama, Mistral, Mixtral, Qwen2, Qwen3: attention + (MLP or MoE) per HF layer, RoPE, RMSNorm."""
    fam = r.family
    defaults = {
        "llama": (32000, 4096, 11008, 32, 1e-6),
        "mistral": (32000, 4096, 14336, 32, 1e-6),
        "mixtral": (32000, 4096, 14336, 32, 1e-5),
        "qwen2": (151936, 4096, 22016, 32, 1e-6),
        "qwen3": (151936, 4096, 22016, 32, 1e-6),
    }[fam]
    vocab = r.int("vocab_size", defaults[0])
    d = r.int("hidden_size", defaults[1])
    d_ff = r.int("intermediate_size", defaults[2])
    layers = r.layers("num_hidden_layers", defaults[3])
    eps = r.eps("rms_norm_eps", defaults[4])
    tied = r.bool("tie_word_embeddings", False)
    attention = _layer("attention", r, d)
    r.act()
    if fam in ("qwen2", "qwen3"):
        windows = _window_types(r, layers, 4096)
    else:
        window = r.opt_int("sliding_window", 4096 if fam == "mistral" else None)
        windows = [window] * layers
    ffn_kind, symbol = ("moe", "E") if fam == "mixtral" else ("mlp", "-")
    ffn = _define(ffn_kind, _layer(ffn_kind, r, d, d_ff=d_ff))
    definitions, legend, tokens = _attention_windows(
        r, windows, lambda w: _define("attention", {**attention, "window": w}), ffn, symbol)
    return dict(vocab=vocab, d_model=d, norm_eps=eps, tied=tied, definitions=definitions, legend=legend,
                tokens=tokens)


def _mamba_family(r: Reader) -> dict:
    """Mamba-1 (state-spaces/mamba-*-hf): one Mamba mixer with an RMSNorm per HF layer, no FFN."""
    vocab = r.int("vocab_size", 50280)
    d = r.int("hidden_size", 768)
    layers = r.layers("num_hidden_layers", 32)
    if r.present("n_layer") and r.layers("n_layer") != layers:
        raise r.fail("'n_layer' disagrees with 'num_hidden_layers'")
    eps = r.eps("layer_norm_epsilon", 1e-5)
    mixer = _define("mamba", _layer("mamba", r, d))
    return dict(vocab=vocab, d_model=d, norm_eps=eps, tied=r.bool("tie_word_embeddings", True),
                definitions={"ssm": mixer}, legend={"M": "ssm"}, tokens=("M",) * layers)


def _mamba2_family(r: Reader) -> dict:
    """Mamba-2 (transformers' Mamba2ForCausalLM): one SSD mixer with an RMSNorm per HF layer, no FFN."""
    vocab = r.int("vocab_size", 32768)
    d = r.int("hidden_size", 4096)
    layers = r.layers("num_hidden_layers", 64)
    eps = r.eps("layer_norm_epsilon", 1e-5)
    mixer = _define("mamba2", _layer("mamba2", r, d))
    return dict(vocab=vocab, d_model=d, norm_eps=eps, tied=r.bool("tie_word_embeddings", False),
                definitions={"ssm": mixer}, legend={"M": "ssm"}, tokens=("M",) * layers)


def _jamba(r: Reader) -> dict:
    """Jamba: attention (no RoPE) on layers i % attn_layer_period == attn_layer_offset, Mamba-1 elsewhere;
    MoE on layers i % expert_layer_period == expert_layer_offset, a SwiGLU MLP elsewhere (0-based i)."""
    vocab = r.int("vocab_size", 65536)
    d = r.int("hidden_size", 4096)
    d_ff = r.int("intermediate_size", 14336)
    layers = r.layers("num_hidden_layers", 32)
    attention = _layer("attention", r, d)
    eps = r.eps("rms_norm_eps", 1e-6)
    moe = _layer("moe", r, d, d_ff=d_ff)
    a_period, a_offset = r.int("attn_layer_period", 8), r.int("attn_layer_offset", 4, minimum=0)
    e_period, e_offset = r.int("expert_layer_period", 2), r.int("expert_layer_offset", 1, minimum=0)
    if a_offset >= a_period or e_offset >= e_period:
        raise r.fail(f"'attn_layer_offset' ({a_offset}) must be smaller than 'attn_layer_period' ({a_period}) and "
                     f"'expert_layer_offset' ({e_offset}) smaller than 'expert_layer_period' ({e_period})")
    r.act()
    mamba = _layer("mamba", r, d)
    definitions = {}
    legend = {}
    attn_at = [i % a_period == a_offset for i in range(layers)]
    moe_at = [moe["experts"] > 1 and i % e_period == e_offset for i in range(layers)]
    if not all(attn_at):
        definitions["ssm"], legend["M"] = _define("mamba", mamba), "ssm"
    if any(attn_at):
        definitions["attn"], legend["A"] = _define("attention", attention), "attn"
    if not all(moe_at):
        definitions["ffn"], legend["-"] = _define("mlp", _layer("mlp", r, d, d_ff=d_ff)), "ffn"
    if any(moe_at):
        definitions["moe"], legend["E"] = _define("moe", moe), "moe"
    tokens = tuple(("A" if a else "M") + ("E" if e else "-") for a, e in zip(attn_at, moe_at))
    return dict(vocab=vocab, d_model=d, norm_eps=eps, tied=r.bool("tie_word_embeddings", False),
                definitions=definitions, legend=legend, tokens=tokens,
                hf=dict(attn_layer_period=a_period, attn_layer_offset=a_offset,
                        expert_layer_period=e_period, expert_layer_offset=e_offset))


#: Nemotron-H's pattern characters -> its layer types; and each type's kind and definition name.
_NEMOTRON_TYPES = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
_NEMOTRON_LAYERS = {"linear_attention": ("mamba2", "ssm", "M"), "full_attention": ("attention", "attn", "A"),
                    "mlp": ("mlp", "ffn", "-"), "moe": ("moe", "moe", "E")}


def _nemotron_types(r: Reader, key: str, pattern_key: str, default) -> list[str]:
    """A Nemotron-H layer list from `pattern_key` (one character per layer, which wins as in NemotronHConfig)
    or `key` (a list of layer types); `default` when neither is set."""
    if r.present(pattern_key):
        pattern = r.raw(pattern_key)
        if not isinstance(pattern, str) or any(c not in _NEMOTRON_TYPES for c in pattern) or not pattern:
            raise r.fail(f"'{pattern_key}' must be a string of M, *, - and E, got {show_value(pattern)}")
        if len(pattern) > MAX_HF_LAYERS:
            raise r.fail(f"'{pattern_key}' lists {len(pattern):,} layers; at most {MAX_HF_LAYERS:,} are supported")
        r.raw(key, None)
        return [_NEMOTRON_TYPES[c] for c in pattern]
    types = r.raw(key, None)
    if types is None:
        return default
    if isinstance(types, list):  # the legacy names transformers remaps (remap_legacy_layer_types)
        types = [{"mamba": "linear_attention", "attention": "full_attention"}.get(t, t) if isinstance(t, str) else t
                 for t in types]
    if not isinstance(types, list) or not types or len(types) > MAX_HF_LAYERS or \
            any(not isinstance(t, str) or t not in _NEMOTRON_TYPES.values() for t in types):
        raise r.fail(f"'{key}' must list at most {MAX_HF_LAYERS:,} of linear_attention, full_attention, mlp and moe, "
                     f"got {show_value(types)}")
    return types


def _nemotron_h(r: Reader) -> dict:
    """Nemotron-H and Nemotron-3: one block per HF layer, Mamba-2 (M), attention without RoPE (*), a relu2 MLP (-)
    or a MoE of relu2 experts with a relu2 shared expert (E), from `hybrid_override_pattern` (one character per
    layer) or `layers_block_type` (`layer_types`). The published configs' copies of other keys are accepted where
    transformers' NemotronH does not read them and they agree with what it reads (`rms_norm_eps`,
    `attention_head_dim`), or where they cannot change the computation (`time_step_rank`: Mamba-2 has no dt rank);
    the multi-token-prediction layers (`num_nextn_predict_layers`, `mtp_*`) are neither built nor loaded by
    transformers (it skips `mtp.*` tensors), so they do not change the logits and are not imported."""
    vocab = r.int("vocab_size", 131072)
    d = r.int("hidden_size", 4096)
    eps = r.eps("layer_norm_epsilon", 1e-5)
    if r.present("rms_norm_eps") and r.eps("rms_norm_eps") != eps:
        raise r.fail(f"'rms_norm_eps' {show_value(r.cfg['rms_norm_eps'])} disagrees with 'layer_norm_epsilon' {eps}, "
                     "the epsilon transformers' NemotronH uses for every norm; make them agree")
    r.raw("rms_norm_eps", None)
    r.raw("time_step_rank", None)  # a Mamba-1 setting; the Mamba-2 forward pass has no dt rank
    r.raw("layer_types", None)  # NemotronHConfig's alias of layers_block_type
    alias = "layers_block_type" if r.present("layers_block_type") else "layer_types"
    types = _nemotron_types(r, alias, "hybrid_override_pattern",
                            ["linear_attention", "moe", "full_attention", "mlp"])  # NemotronHConfig's default
    if r.present("num_hidden_layers") and r.layers("num_hidden_layers") != len(types):
        raise r.fail(f"'num_hidden_layers' {r.cfg['num_hidden_layers']} != the {len(types)} layers of "
                     "'hybrid_override_pattern' or 'layers_block_type' (NemotronHConfig's default: 4)")
    r.raw("num_hidden_layers", None)
    if r.int("num_nextn_predict_layers", 0, minimum=0) or r.present("mtp_layers_block_type") \
            or r.present("mtp_hybrid_override_pattern"):
        mtp = _nemotron_types(r, "mtp_layers_block_type", "mtp_hybrid_override_pattern", [])  # checked, not built
        r.notes.append(f"{r.cfg.get('num_nextn_predict_layers') or 0} multi-token-prediction layer(s) "
                       f"({', '.join(mtp) or 'none listed'}) not imported: transformers' NemotronH neither builds "
                       "them nor loads their mtp.* tensors, so the logits do not depend on them")
    values = {t: _layer(kind, r, d, present=t in types) for t, (kind, _, _) in _NEMOTRON_LAYERS.items()}
    if "moe" in types and r.bool("mlp_bias", False):
        raise r.fail("'mlp_bias' = true gives Nemotron-H's shared experts biases, which ltmdsl's moe does not have "
                     "(supported: false when there are MoE layers)")
    definitions, legend = {}, {}
    for t, (kind, name, symbol) in _NEMOTRON_LAYERS.items():
        if t in types:
            definitions[name], legend[symbol] = _define(kind, values[t]), name
    return dict(vocab=vocab, d_model=d, norm_eps=eps, tied=r.bool("tie_word_embeddings", False),
                definitions=definitions, legend=legend, tokens=tuple(_NEMOTRON_LAYERS[t][2] for t in types),
                hf=dict(unloaded=("mtp.",)))


def _bamba(r: Reader) -> dict:
    """Bamba (IBM): per HF layer a Mamba-2 mixer, or attention where the 0-based index is in
    `attn_layer_indices`, then a SwiGLU MLP. Its attention applies RoPE to the first head_dim *
    partial_rotary_factor channels of each head (0.5: BambaConfig forces it unless rope_parameters says
    otherwise); the Mamba-2 gated RMSNorm is grouped by mamba_n_groups and uses rms_norm_eps."""
    vocab = r.int("vocab_size", 128000)
    d = r.int("hidden_size", 4096)
    ffn = _layer("mlp", r, d)
    layers = r.layers("num_hidden_layers", 32)
    eps = r.eps("rms_norm_eps", 1e-5)
    r.act()
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
    attention = _layer("attention", r, d, present=bool(attn_at))
    mamba = _layer("mamba2", r, d, present=len(attn_at) < layers)
    definitions, legend = {}, {}
    if len(attn_at) < layers:
        definitions["ssm"], legend["M"] = _define("mamba2", mamba), "ssm"
    if attn_at:
        definitions["attn"], legend["A"] = _define("attention", attention), "attn"
    definitions["ffn"], legend["-"] = _define("mlp", ffn), "ffn"
    return dict(vocab=vocab, d_model=d, norm_eps=eps, tied=r.bool("tie_word_embeddings", False),
                definitions=definitions, legend=legend,
                tokens=tuple(("A" if i in attn_at else "M") + "-" for i in range(layers)),
                hf=dict(attn_layer_indices=sorted(attn_at)))


#: Qwen3-Next's layer types -> (kind, definition name, legend symbol) of the mixer.
_QWEN3_NEXT_MIXERS = {"linear_attention": ("gated_deltanet", "gdn", "L"), "full_attention": ("attention", "attn", "A")}


def _qwen3_next(r: Reader) -> dict:
    """Qwen3-Next: per HF layer a Gated DeltaNet (`linear_attention`) or gated attention (`full_attention`),
    from `layer_types` or, when it is absent, attention on layers (i + 1) % full_attention_interval == 0;
    then the sparse MoE block (routed experts and a gated shared expert) where num_experts > 0, i is not in
    `mlp_only_layers` and (i + 1) % decoder_sparse_step == 0, a dense SwiGLU MLP elsewhere (0-based i). Every
    RMSNorm but the Gated DeltaNet's gated norm is zero-centred (it scales by 1 + w)."""
    vocab = r.int("vocab_size", 151936)
    d = r.int("hidden_size", 2048)
    layers = r.layers("num_hidden_layers", 48)
    eps = r.eps("rms_norm_eps", 1e-6)
    r.act()
    types = r.raw("layer_types", None)
    if types is None:
        interval = r.int("full_attention_interval", 4)
        types = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(layers)]
    else:
        r.raw("full_attention_interval", None)  # Qwen3NextConfig reads it only without layer_types
        if not isinstance(types, list) or len(types) != layers or \
                any(not isinstance(t, str) or t not in _QWEN3_NEXT_MIXERS for t in types):
            raise r.fail(f"'layer_types' must list num_hidden_layers = {layers} of 'linear_attention' / "
                         f"'full_attention', got {show_value(types)}")
    r.expect("use_sliding_window", lambda v: v in (None, False), "false (Qwen3-Next attention has no window)")
    r.expect("sliding_window", lambda v: v is None, "null (Qwen3-Next attention has no window)")
    experts = r.int("num_experts", 512, minimum=0)
    step = r.int("decoder_sparse_step", 1)
    only = r.raw("mlp_only_layers", None) or []
    if not isinstance(only, list) or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < layers
                                         for i in only):
        raise r.fail(f"'mlp_only_layers' must list 0-based layer indices below num_hidden_layers = {layers}, "
                     f"got {show_value(only)}")
    moe_at = [experts > 0 and i not in only and (i + 1) % step == 0 for i in range(layers)]
    values = {t: _layer(kind, r, d, present=t in types) for t, (kind, _, _) in _QWEN3_NEXT_MIXERS.items()}
    moe = _layer("moe", r, d, present=any(moe_at))
    mlp = _layer("mlp", r, d, present=not all(moe_at))
    definitions, legend = {}, {}
    for t, (kind, name, symbol) in _QWEN3_NEXT_MIXERS.items():
        if t in types:
            definitions[name], legend[symbol] = _define(kind, values[t]), name
    if any(moe_at):
        definitions["moe"], legend["E"] = _define("moe", moe), "moe"
    if not all(moe_at):
        definitions["ffn"], legend["-"] = _define("mlp", mlp), "ffn"
    tokens = tuple(_QWEN3_NEXT_MIXERS[t][2] + ("E" if e else "-") for t, e in zip(types, moe_at))
    return dict(vocab=vocab, d_model=d, norm_eps=eps, tied=r.bool("tie_word_embeddings", False),
                definitions=definitions, legend=legend, tokens=tokens, zero_centred=True,
                hf=dict(layer_types=list(types), mlp_only_layers=sorted(set(only)), decoder_sparse_step=step))


def _lfm2_types(r: Reader, layers: int) -> list[bool]:
    """LFM2: whether each layer is attention, from `layer_types` (which wins, as in Lfm2Config) or
    `full_attn_idxs` (0-based; every layer when neither is set)."""
    types, idxs = r.raw("layer_types", None), r.raw("full_attn_idxs", None)
    if idxs is not None and (not isinstance(idxs, list) or any(
            not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < layers for i in idxs)):
        raise r.fail(f"'full_attn_idxs' must list 0-based layer indices below num_hidden_layers = {layers}, "
                     f"got {show_value(idxs)}")
    if types is None:
        return [idxs is None or i in idxs for i in range(layers)]
    if not isinstance(types, list) or any(t not in ("conv", "full_attention") for t in types):
        raise r.fail(f"'layer_types' must be a list of 'conv' / 'full_attention', got {show_value(types)}")
    if len(types) != layers:
        raise r.fail(f"'layer_types' lists {len(types)} layers but 'num_hidden_layers' is {layers}")
    attn = [t == "full_attention" for t in types]
    if idxs is not None and sorted(set(idxs)) != [i for i, a in enumerate(attn) if a]:
        raise r.fail(f"'full_attn_idxs' {show_value(idxs)} disagrees with the attention layers of 'layer_types'")
    return attn


def _lfm2(r: Reader) -> dict:
    """LFM2 (Liquid AI): per HF layer a gated short convolution ("conv") or GQA attention with per-head q/k
    RMSNorm ("full_attention"), then a SwiGLU MLP; the final norm is called embedding_norm. The original
    configs' aliases (block_dim, block_norm_eps, tie_embedding) are read and checked as Lfm2Config reads them."""
    vocab = r.int("vocab_size", 65536)
    d = r.int("hidden_size", 2560)
    r.expect("block_dim", lambda v: v in (None, d), f"null or hidden_size ({d}); transformers' LFM2 uses hidden_size")
    layers = r.layers("num_hidden_layers", 32)
    eps = r.eps("norm_eps", 1e-5)
    r.raw("block_norm_eps", None)  # the original configs' copy of norm_eps; transformers reads only norm_eps
    tied = r.bool("tie_word_embeddings", True)
    if r.present("tie_embedding"):  # Lfm2Config pops it into tie_word_embeddings
        tied = r.bool("tie_embedding", True)
    r.raw("tie_embedding", None)
    attn_at = _lfm2_types(r, layers)
    attention = _layer("attention", r, d, present=any(attn_at))
    conv = _layer("short_conv", r, d, present=not all(attn_at))
    ffn = _layer("mlp", r, d)
    definitions, legend = {}, {}
    if not all(attn_at):
        definitions["conv"], legend["C"] = _define("short_conv", conv), "conv"
    if any(attn_at):
        definitions["attn"], legend["A"] = _define("attention", attention), "attn"
    definitions["ffn"], legend["-"] = _define("mlp", ffn), "ffn"
    return dict(vocab=vocab, d_model=d, norm_eps=eps, tied=tied, definitions=definitions, legend=legend,
                tokens=tuple(("A" if a else "C") + "-" for a in attn_at))


def bf16(x: float) -> float:
    """x rounded to bfloat16 (through float32, to nearest even), as torch.tensor(x, dtype=torch.bfloat16) does."""
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _recurrent_gemma(r: Reader) -> dict:
    """RecurrentGemma (Griffin): per HF layer an RG-LRU recurrent block or local attention, as `block_types`
    repeats over the layers, then a GeGLU MLP with biases. Its norms scale by (1 + w) (zero_centred), the
    embeddings by sqrt(hidden_size) rounded to bfloat16 (transformers' `normalizer` buffer), and the logits
    are soft-capped at `logits_soft_cap`."""
    vocab = r.int("vocab_size", 256000)
    d = r.int("hidden_size", 2560)
    layers = r.layers("num_hidden_layers", 26)
    eps = r.eps("rms_norm_eps", 1e-6)
    cap = r.float("logits_soft_cap", 30.0)
    r.expect("embeddings_scale_by_sqrt_dim", lambda v: v in (None, True),
             "true (transformers' RecurrentGemma always scales the embeddings)")
    for key in ("w_init_variance_scale", "final_w_init_variance_scale"):
        r.raw(key, None)  # initialisation only
    types = r.raw("block_types", ["recurrent", "recurrent", "attention"])
    if not isinstance(types, list) or not types or any(t not in ("recurrent", "attention") for t in types):
        raise r.fail(f"'block_types' must be a non-empty list of 'recurrent' / 'attention', got {show_value(types)}")
    if layers > 100 * len(types):  # RecurrentGemmaConfig repeats block_types 100 times
        raise r.fail(f"'num_hidden_layers' {layers} is more than transformers' 100 repeats of the {len(types)} "
                     "'block_types'")
    attn_at = [(types * 100)[i] == "attention" for i in range(layers)]
    for key in ("layers_block_type", "layer_types"):  # derived by RecurrentGemmaConfig; stated, they must agree
        if r.present(key):
            stated = r.raw(key)
            want = ["sliding_attention" if a else "linear_attention" for a in attn_at]
            if stated != want and stated != [("attention" if a else "recurrent") for a in attn_at]:
                raise r.fail(f"'{key}' disagrees with the layers 'block_types' and 'num_hidden_layers' give")
        r.raw(key, None)
    act = hidden_activation(r)[1]  # the MLP's GeGLU form of the activation both blocks apply
    rec = _layer("rg_lru", r, d, present=not all(attn_at))
    attention = _layer("attention", r, d, present=any(attn_at))
    ffn = _layer("mlp", r, d, act=act)
    definitions, legend = {}, {}
    if not all(attn_at):
        definitions["rec"], legend["R"] = _define("rg_lru", rec), "rec"
    if any(attn_at):
        definitions["local"], legend["L"] = _define("attention", attention), "local"
    definitions["ffn"], legend["-"] = _define("mlp", ffn), "ffn"
    return dict(vocab=vocab, d_model=d, norm_eps=eps, tied=r.bool("tie_word_embeddings", True),
                definitions=definitions, legend=legend, tokens=tuple(("L" if a else "R") + "-" for a in attn_at),
                zero_centred=True, embed_scale=bf16(math.sqrt(d)), logit_cap=cap)


#: xLSTMConfig's kernel and precision choices: implementations of one computation, each value transformers accepts.
_XLSTM_KERNELS = {
    "chunkwise_kernel": ("chunkwise--native_autograd", "parallel--native_autograd"),
    "sequence_kernel": ("native_sequence__native",), "step_kernel": ("native",),
    "mode": ("train", "train_with_padding", "inference"),
    "autocast_kernel_dtype": ("float32", "bfloat16", "float16"),
    "inference_state_dtype": ("float32", "bfloat16", "float16"),
    "weight_mode": ("single", "fused"),  # separate or fused q/k/v/gate projections: the same weights
}


def _xlstm_alias(r: Reader, key: str, alias: str, default: int, read: Callable[..., int]) -> int:
    """A size xLSTMConfig reads under two names (hidden_size / embedding_dim, num_hidden_layers / num_blocks):
    either one, and both equal when both are set."""
    if r.present(key) and r.raw(key) is not None:
        value = read(key, default)
        if r.present(alias) and r.raw(alias) is not None and read(alias) != value:
            raise r.fail(f"'{alias}' {show_value(r.raw(alias))} disagrees with '{key}' {value}")
        r.raw(alias, None)
        return value
    r.raw(key, None)
    return read(alias, default) if r.present(alias) and r.raw(alias) is not None else read(key, default)


def _xlstm(r: Reader) -> dict:
    """xLSTM (xLSTM-7B; transformers' xLSTMModel): every block is an RMSNorm'd mLSTM layer, then an RMSNorm'd
    SiLU-gated MLP, both residual; a final RMSNorm (`add_out_norm`) and the logits soft-capped at
    `output_logit_soft_cap` (null: uncapped). Biases (`use_bias`) would also give the block RMSNorms a bias,
    which the language's model-level norm does not have: refused by name."""
    vocab = r.int("vocab_size", 50304)
    d = _xlstm_alias(r, "hidden_size", "embedding_dim", 4096, r.int)
    layers = _xlstm_alias(r, "num_hidden_layers", "num_blocks", 32, r.layers)
    r.expect("use_bias", lambda v: v is False, "false (the block RMSNorms' biases are outside the language)", False)
    r.expect("add_out_norm", lambda v: v is True, "true (the language always applies the final norm)", True)
    r.bool("norm_reduction_force_float32", True)  # float32 norm reductions: precision only
    r.bool("return_last_states", True)  # the kernel returns its state: how, not what, it computes
    r.int("max_inference_chunksize", 16384, maximum=2**31 - 1)  # logits computed in chunks of this many tokens
    for key, values in _XLSTM_KERNELS.items():
        r.expect(key, lambda v, ok=values: isinstance(v, str) and v in ok, " or ".join(map(repr, values)), values[0])
    types = r.raw("layer_types", None)
    if types is not None and (not isinstance(types, list) or len(types) != layers
                              or any(t != "mlstm" for t in types)):
        raise r.fail(f"'layer_types' must list 'mlstm' for each of the {layers} layers ('num_hidden_layers'), "
                     f"got {show_value(types)}")
    eps = r.eps("norm_eps", 1e-6)
    cap = soft_cap(r, "output_logit_soft_cap", 30.0)
    cell = _layer("mlstm", r, d, bias=False)
    ffn = _layer("mlp", r, d, bias=False)
    return dict(vocab=vocab, d_model=d, norm_eps=eps, tied=r.bool("tie_word_embeddings", False),
                definitions={"cell": _define("mlstm", cell), "ffn": _define("mlp", ffn)},
                legend={"M": "cell", "-": "ffn"}, tokens=("M-",) * layers, logit_cap=cap)


_READERS = {"llama": _transformer, "mistral": _transformer, "mixtral": _transformer, "qwen2": _transformer,
            "qwen3": _transformer, "mamba": _mamba_family, "mamba2": _mamba2_family, "jamba": _jamba,
            "nemotron_h": _nemotron_h, "bamba": _bamba, "qwen3_next": _qwen3_next,
            "lfm2": _lfm2, "recurrent_gemma": _recurrent_gemma, "xlstm": _xlstm,
            "deepseek_v2": deepseek_v2.read, "deepseek_v3": deepseek_v3.read,
            **dict.fromkeys(qwen3_5.MODEL_TYPES, qwen3_5.read), "kimi_linear": kimi_linear.read,
            "qwen3_moe": qwen3_moe.read, "gpt_oss": gpt_oss.read, "gemma3_text": gemma3.read,
            "gemma3": gemma3.read_multimodal, "llama4_text": llama4.read, "granitemoehybrid": granitemoehybrid.read,
            minimax.MODEL_TYPE: minimax.read, "falcon_h1": falcon_h1.read,
            "llama4": llama4.read_multimodal, zamba2.MODEL_TYPE: zamba2.read}


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
    r = Reader(cfg, family, source or "<config>", frozenset(ignore))
    fields = _READERS[family](r)
    notes = r.finish()
    if name is None:
        name = default_name(cfg, source)
    hf = fields.pop("hf", {})
    family = fields.pop("family", family)  # one family for several model types (qwen3_5_text is qwen3_5)
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
