"""Nemotron-H and Nemotron-3 (model_type nemotron_h): one character per layer of `hybrid_override_pattern`
(M, *, -, E) or a list of layer types in `layers_block_type`.
"""

from __future__ import annotations

from ltmdsl.hf.reader import MAX_HF_LAYERS, Reader, define, kind_values
from ltmdsl.hf.spec import show_value


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


def read(r: Reader) -> dict:
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
    values = {t: kind_values(kind, r, d, present=t in types) for t, (kind, _, _) in _NEMOTRON_LAYERS.items()}
    if "moe" in types and r.bool("mlp_bias", False):
        raise r.fail("'mlp_bias' = true gives Nemotron-H's shared experts biases, which ltmdsl's moe does not have "
                     "(supported: false when there are MoE layers)")
    definitions, legend = {}, {}
    for t, (kind, name, symbol) in _NEMOTRON_LAYERS.items():
        if t in types:
            definitions[name], legend[symbol] = define(kind, values[t]), name
    return dict(vocab=vocab, d_model=d, norm_eps=eps, tied=r.bool("tie_word_embeddings", False),
                definitions=definitions, legend=legend, tokens=tuple(_NEMOTRON_LAYERS[t][2] for t in types),
                hf=dict(unloaded=("mtp.",)))
