"""xLSTM (model_type xlstm, xLSTM-7B): one mLSTM block repeated over `num_hidden_layers` (`num_blocks`)."""

from __future__ import annotations

from typing import Callable

from ltmdsl.hf.reader import Reader, define, kind_values
from ltmdsl.hf.spec import show_value
from ltmdsl.kinds.mlstm_hf import soft_cap


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


def read(r: Reader) -> dict:
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
    cell = kind_values("mlstm", r, d, bias=False)
    ffn = kind_values("mlp", r, d, bias=False)
    return dict(vocab=vocab, d_model=d, norm_eps=eps, tied=r.bool("tie_word_embeddings", False),
                definitions={"cell": define("mlstm", cell), "ffn": define("mlp", ffn)},
                legend={"M": "cell", "-": "ffn"}, tokens=("M-",) * layers, logit_cap=cap)
