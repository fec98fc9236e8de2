"""Tiny specs for the training tests: small enough that a few steps take a fraction of a second."""

from pathlib import Path

import ltmdsl

#: every stateful kind the trainer must handle (attention, Mamba-1, Mamba-2, MoE), vocab 32
TINY = """
model tiny_train {
    vocab = 32
    d_model = 16
    dtype = fp32
    norm = rmsnorm(eps = 1e-5)
    head = untied
    layer a = attention(heads = 2, kv_heads = 1)
    layer w = attention(heads = 2, kv_heads = 1, window = 8)
    layer m1 = mamba(d_state = 4, expand = 2)
    layer m2 = mamba2(d_state = 8, head_dim = 8, expand = 2, chunk = 8)
    layer f = mlp(d_ff = 32, act = swiglu)
    layer e = moe(experts = 2, top_k = 1, d_ff = 16)
    stack { m1 f m2 e w f a f }
}
"""

#: a gated short conv then one NoPE attention layer (benchmarks/conv-attention.ltm at vocab 32): the conv
#: hands each value its key, so one attention layer recalls; it learns MQAR in about 100 steps
CONV_ATTENTION = """
model conv_attention {
    vocab = 32
    d_model = 64
    dtype = fp32
    norm = rmsnorm(eps = 1e-5)
    head = untied
    layer conv = short_conv(kernel = 3)
    layer attn = attention(heads = 2, kv_heads = 2, rope_theta = none)
    stack { conv attn }
}
"""

#: examples/ltm-tiny.ltm (ltm-100m's tiny twin: Mamba-2, short conv, global NoPE attention, MLP, then the
#: same with sliding-window attention) at vocab 32, read from the example so the test follows its design
LTM_TINY = (Path(__file__).resolve().parents[2] / "examples" / "ltm-tiny.ltm").read_text(
    encoding="utf-8").replace("vocab = 256", "vocab = 32")

#: MQAR options that fit vocab 32 in a short context
MQAR = {"context": 24, "num_kv_pairs": 2, "vocab_size": 32}


def tiny_spec(text: str = TINY):
    return ltmdsl.loads(text)
