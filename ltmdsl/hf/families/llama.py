"""Llama, Mistral, Mixtral, Qwen2 and Qwen3 (model_types llama, mistral, mixtral, qwen2, qwen3): attention, then a
SwiGLU MLP (Mixtral: the MoE) per HF layer, RoPE plain or scaled as Llama 3.1 does (`rope_type: llama3`), RMSNorm.
Mistral's `sliding_window` covers every layer; Qwen2/3 slide from layer `max_window_layers` on (with
`use_sliding_window`) or follow `layer_types`.
"""

from __future__ import annotations

from typing import Callable

from ltmdsl.hf.reader import Reader, define, kind_values

MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3")


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


def read(r: Reader) -> dict:
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
    attention = kind_values("attention", r, d)
    r.act()
    if fam in ("qwen2", "qwen3"):
        windows = _window_types(r, layers, 4096)
    else:
        window = r.opt_int("sliding_window", 4096 if fam == "mistral" else None)
        windows = [window] * layers
    ffn_kind, symbol = ("moe", "E") if fam == "mixtral" else ("mlp", "-")
    ffn = define(ffn_kind, kind_values(ffn_kind, r, d, d_ff=d_ff))
    definitions, legend, tokens = _attention_windows(
        r, windows, lambda w: define("attention", {**attention, "window": w}), ffn, symbol)
    return dict(vocab=vocab, d_model=d, norm_eps=eps, tied=tied, definitions=definitions, legend=legend,
                tokens=tokens)
