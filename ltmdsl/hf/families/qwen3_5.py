"""Qwen3.5, dense (model_type qwen3_5) and MoE (qwen3_5_moe): the language model of transformers' Qwen3.5.

Published checkpoints are vision-language models: `model_type` qwen3_5 / qwen3_5_moe with the language model's
settings nested in `text_config` and a vision encoder in `vision_config`; transformers' text-only classes
(Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM) save the same settings flat as qwen3_5_text / qwen3_5_moe_text.
Both forms import (to the families "qwen3_5" and "qwen3_5_moe"); export writes the text-only form.

The vision part is ignored by name, not refused: the language model's computation on text tokens does not
depend on it, and transformers' own AutoModelForCausalLM does the same for these model types (its
Qwen3_5ForCausalLM takes `text_config` and skips the `model.visual.*` tensors). The spec says so in a NOTE;
`vision_config` must still be a JSON object, and the image / video token ids are token ids.

The language model is Qwen3-Next's decoder (transformers' Qwen3_5TextConfig subclasses Qwen3NextConfig):
per layer a Gated DeltaNet (`linear_attention`) or gated attention (`full_attention`), from `layer_types` or
attention on every `full_attention_interval`-th layer (1-based); then a SwiGLU MLP of `intermediate_size`
(dense) or, on every layer, the MoE of routed experts (softmax, top-k always renormalised: the Qwen3.5 router
has no `norm_topk_prob`) and a sigmoid-gated shared expert (MoE). Every RMSNorm but the Gated DeltaNet's
gated one is zero-centred. The kinds read their keys as Qwen3-Next's do, under Qwen3_5TextConfig's own
defaults (`DEFAULTS`). Differences from Qwen3-Next:
  - Gated DeltaNet keeps separate `in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a` (ltmdsl/kinds/
    gated_deltanet_hf.py regroups them);
  - RoPE is multimodal (`rope_parameters.mrope_section`, `mrope_interleaved`): it picks each frequency's
    position from the temporal, height or width position id, which for text tokens are all the token's
    position, so on text it is the plain partial RoPE; the two keys are checked and otherwise harmless;
  - keys Qwen3_5TextConfig drops (Qwen3-Next's expert placement, the MoE keys of the dense model) are refused
    unless they state what transformers does anyway;
  - `mtp_num_hidden_layers` / `mtp_use_dedicated_embeddings` describe a multi-token-prediction head that
    transformers does not build (its `mtp.*` tensors are skipped on load): harmless to the logits.
A published checkpoint keeps the language model under `model.language_model.` and the vision tower under
`model.visual.` (skipped, as transformers skips it); a text-only one under `model.`.
"""

from __future__ import annotations

from typing import Any

from ltmdsl.hf.facet import ReadContext
from ltmdsl.hf.reader import Reader
from ltmdsl.hf.spec import show_value
from ltmdsl.kinds.hf import hf_facet

#: model_type -> (family, the text model's model_type); the first two nest `text_config`.
MODEL_TYPES = {"qwen3_5": ("qwen3_5", "qwen3_5_text"), "qwen3_5_moe": ("qwen3_5_moe", "qwen3_5_moe_text"),
               "qwen3_5_text": ("qwen3_5", "qwen3_5_text"), "qwen3_5_moe_text": ("qwen3_5_moe", "qwen3_5_moe_text")}

#: What export writes: family -> (model_type, architecture) of transformers' text-only model.
ARCHITECTURES = {"qwen3_5": ("qwen3_5_text", "Qwen3_5ForCausalLM"),
                 "qwen3_5_moe": ("qwen3_5_moe_text", "Qwen3_5MoeForCausalLM")}

#: Qwen3_5TextConfig's / Qwen3_5MoeTextConfig's defaults (where they differ from Qwen3NextConfig's, which the
#: kinds' readers use, and the model-level ones read here).
DEFAULTS = {"qwen3_5": {"vocab_size": 248320, "hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 12288,
                        "num_key_value_heads": 4},
            "qwen3_5_moe": {"vocab_size": 248320, "hidden_size": 2048, "num_hidden_layers": 40, "num_experts": 256,
                            "num_experts_per_tok": 8, "num_key_value_heads": 2}}

#: The vision-language wrapper's own keys besides text_config / vision_config: token ids of image and video inputs.
_VISION_TOKEN_IDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")

#: Qwen3-Next's expert settings that Qwen3_5TextConfig drops -> the only value that agrees with what transformers'
#: Qwen3.5 then does (None: the key must be absent).
_DROPPED = {"qwen3_5": {"num_experts": None, "num_experts_per_tok": None, "moe_intermediate_size": None,
                        "shared_expert_intermediate_size": None, "norm_topk_prob": None, "decoder_sparse_step": None,
                        "mlp_only_layers": None},
            "qwen3_5_moe": {"intermediate_size": None, "decoder_sparse_step": 1, "mlp_only_layers": []}}

#: Checkpoint tensors outside the language model, which transformers' Qwen3_5ForCausalLM skips on load too:
#: the vision tower and the multi-token-prediction head.
UNLOADED = ("model.visual.", "mtp.")

#: layer type -> (kind, definition name, legend symbol) of the mixer.
_MIXERS = {"linear_attention": ("gated_deltanet", "gdn", "L"), "full_attention": ("attention", "attn", "A")}


def _text_reader(r: Reader, family: str) -> Reader:
    """A reader of the language model's settings (text_config, or the flat config), under Qwen3.5's defaults;
    the wrapper's own keys are accounted for on `r`."""
    model_type = r.cfg.get("model_type")
    text_type = MODEL_TYPES[model_type][1]
    if model_type == text_type:  # flat: every key is the text model's
        r.used.update(r.cfg)
        return Reader({**DEFAULTS[family], **r.cfg}, r.family, r.source, r.ignore)
    text = r.raw("text_config", {})
    if not isinstance(text, dict):
        raise r.fail(f"'text_config' must be a JSON object, got {show_value(text)}")
    vision = r.raw("vision_config", None)
    if vision is not None and not isinstance(vision, dict):
        raise r.fail(f"'vision_config' must be a JSON object, got {show_value(vision)}")
    r.notes.append("the vision encoder (vision_config, model.visual.*) is not imported: this is the language model "
                   "that transformers' AutoModelForCausalLM builds")
    for key in _VISION_TOKEN_IDS:
        r.int(key, 0, minimum=0)
    if text.get("model_type") not in (None, text_type):
        raise r.fail(f"'text_config.model_type' must be {text_type!r}, got {show_value(text.get('model_type'))}")
    outer, inner = r.bool("tie_word_embeddings", False), text.get("tie_word_embeddings", False)
    if inner is not None and inner != outer:  # the vision-language and the text-only classes would disagree
        raise r.fail(f"'tie_word_embeddings' ({show_value(outer)}) disagrees with 'text_config.tie_word_embeddings' "
                     f"({show_value(inner)}): transformers ties by the first in {model_type}'s vision-language model "
                     "and by the second in its text-only model; make them agree")
    return Reader({**DEFAULTS[family], **text}, f"{r.family} text_config", r.source, r.ignore)


def _layer_types(t: Reader, layers: int) -> list[str]:
    """Each layer's mixer type: `layer_types`, else attention on layers (i + 1) % full_attention_interval == 0."""
    types = t.raw("layer_types", None)
    if types is None:
        interval = t.int("full_attention_interval", 4)
        return ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(layers)]
    t.raw("full_attention_interval", None)  # Qwen3_5TextConfig reads it only without layer_types
    if not isinstance(types, list) or len(types) != layers or \
            any(not isinstance(x, str) or x not in _MIXERS for x in types):
        raise t.fail(f"'layer_types' must list num_hidden_layers = {layers} of 'linear_attention' / "
                     f"'full_attention', got {show_value(types)}")
    return types


def _mrope(t: Reader) -> None:
    """Check the multimodal RoPE keys inside rope_parameters / rope_scaling (module docstring: text-neutral)."""
    for key in ("rope_parameters", "rope_scaling"):
        rp = t.cfg.get(key)
        if not isinstance(rp, dict):
            continue
        section = rp.get("mrope_section")
        if section is not None and (not isinstance(section, list) or not section or any(
                not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in section)):
            raise t.fail(f"'{key}.mrope_section' must be a list of non-negative integers, got {show_value(section)}")
        if not isinstance(rp.get("mrope_interleaved", False), bool):
            raise t.fail(f"'{key}.mrope_interleaved' must be true or false, got {show_value(rp['mrope_interleaved'])}")


def _kind(kind: str, t: Reader, family: str, d: int, present: bool = True) -> dict:
    return hf_facet(kind).read(t, ReadContext(family, d, present))


def read(r: Reader) -> dict:
    """The family reader (module docstring): plan fields of the language model."""
    family = MODEL_TYPES[r.cfg["model_type"]][0]
    t = _text_reader(r, family)
    vocab, d = t.int("vocab_size"), t.int("hidden_size")
    layers = t.layers("num_hidden_layers")
    eps = t.eps("rms_norm_eps", 1e-6)
    t.act()
    tied = t.bool("tie_word_embeddings", False)
    types = _layer_types(t, layers)
    t.expect("use_sliding_window", lambda v: v in (None, False), "false (Qwen3.5 attention has no window)")
    t.expect("sliding_window", lambda v: v is None, "null (Qwen3.5 attention has no window)")
    t.int("mtp_num_hidden_layers", 0, minimum=0)  # the multi-token-prediction head: not part of the logits
    t.bool("mtp_use_dedicated_embeddings", False)
    model = "Qwen3.5 MoE" if family == "qwen3_5_moe" else "dense Qwen3.5"
    for key, value in _DROPPED[family].items():
        allowed = "absent" if value is None else f"absent or {show_value(value)}"
        t.expect(key, lambda v, want=value: v is None or (want is not None and v == want),
                 f"{allowed} ({model}: transformers' config drops it)")
    _mrope(t)
    mixers = {x: _kind(kind, t, family, d, present=x in types) for x, (kind, _, _) in _MIXERS.items()}
    ffn_kind, ffn_name, ffn_symbol = ("moe", "moe", "E") if family == "qwen3_5_moe" else ("mlp", "ffn", "-")
    ffn = _kind(ffn_kind, t, family, d)
    r.notes.extend(t.finish())
    definitions, legend = {}, {}
    for x, (kind, name, symbol) in _MIXERS.items():
        if x in types:
            definitions[name], legend[symbol] = (kind, hf_facet(kind).call(mixers[x])), name
    definitions[ffn_name], legend[ffn_symbol] = (ffn_kind, hf_facet(ffn_kind).call(ffn)), ffn_name
    return dict(family=family, vocab=vocab, d_model=d, norm_eps=eps, tied=tied, definitions=definitions,
                legend=legend, tokens=tuple(_MIXERS[x][2] + ffn_symbol for x in types), zero_centred=True,
                hf=dict(layer_types=list(types), unloaded=list(UNLOADED)))


def config(ir, base: dict, eps: float) -> dict:
    """The text-only config for a zero-centred stack of Gated DeltaNet / gated attention, each followed by one
    MLP setting (qwen3_5) or one MoE setting (qwen3_5_moe)."""
    from ltmdsl.hf.export import _one  # the writers' check that the layers hold one setting (export imports us)

    mixers = [layer.mixer for layer in ir.layers[0::2]]
    ffns = [layer.mixer for layer in ir.layers[1::2]]
    ffn_kind = _one([f.kind for f in ffns], "feed-forward kind (Qwen3.5 has a MoE after every mixer, or an MLP)")
    family = "qwen3_5_moe" if ffn_kind == "moe" else "qwen3_5"
    d = ir.d_model
    out: dict[str, Any] = {**base, "model_type": ARCHITECTURES[family][0], "num_hidden_layers": len(mixers),
                           "rms_norm_eps": eps, "hidden_act": "silu",
                           "layer_types": ["full_attention" if m.kind == "attention" else "linear_attention"
                                           for m in mixers]}
    for kind in dict.fromkeys(m.kind for m in mixers):
        out.update(hf_facet(kind).write(_one([m for m in mixers if m.kind == kind], f"{kind} settings"), family, d))
    out.update(hf_facet(ffn_kind).write(_one(ffns, f"{ffn_kind} settings"), family, d))
    return out
