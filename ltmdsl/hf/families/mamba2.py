"""Mamba-2 (model_type mamba2, transformers' Mamba2ForCausalLM): one SSD mixer with an RMSNorm per HF layer, no
FFN.
"""

from __future__ import annotations

from ltmdsl.hf.reader import Reader, define, kind_values


def read(r: Reader) -> dict:
    """Mamba-2 (transformers' Mamba2ForCausalLM): one SSD mixer with an RMSNorm per HF layer, no FFN."""
    vocab = r.int("vocab_size", 32768)
    d = r.int("hidden_size", 4096)
    layers = r.layers("num_hidden_layers", 64)
    eps = r.eps("layer_norm_epsilon", 1e-5)
    mixer = define("mamba2", kind_values("mamba2", r, d))
    return dict(vocab=vocab, d_model=d, norm_eps=eps, tied=r.bool("tie_word_embeddings", False),
                definitions={"ssm": mixer}, legend={"M": "ssm"}, tokens=("M",) * layers)
