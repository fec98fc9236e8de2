"""Mamba-1 (model_type mamba, state-spaces/mamba-*-hf): one Mamba mixer with an RMSNorm per HF layer, no FFN."""

from __future__ import annotations

from ltmdsl.hf.reader import Reader, define, kind_values


def read(r: Reader) -> dict:
    """Mamba-1 (state-spaces/mamba-*-hf): one Mamba mixer with an RMSNorm per HF layer, no FFN."""
    vocab = r.int("vocab_size", 50280)
    d = r.int("hidden_size", 768)
    layers = r.layers("num_hidden_layers", 32)
    if r.present("n_layer") and r.layers("n_layer") != layers:
        raise r.fail("'n_layer' disagrees with 'num_hidden_layers'")
    eps = r.eps("layer_norm_epsilon", 1e-5)
    mixer = define("mamba", kind_values("mamba", r, d))
    return dict(vocab=vocab, d_model=d, norm_eps=eps, tied=r.bool("tie_word_embeddings", True),
                definitions={"ssm": mixer}, legend={"M": "ssm"}, tokens=("M",) * layers)
