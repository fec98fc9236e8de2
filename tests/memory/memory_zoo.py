"""Hand-built ModelIR / BudgetIR for the memory tests (independent of the parser).

Parameter counts follow `transformers` so that `params_total` matches what transformers counts on the
meta device; the GPT block of
Korthikanti et al. counts 12h^2 per layer as the paper does (biases and norms left out).
"""

from __future__ import annotations

from ltmdsl.ir import BudgetIR, GpuSpec, LimitIR, ModelIR, NormConfig, ParallelPlan, SourcePos, SubLayer
from ltmdsl.kinds.attention import AttentionConfig
from ltmdsl.kinds.mamba import MambaConfig
from ltmdsl.kinds.mamba2 import Mamba2Config
from ltmdsl.kinds.mlp import MLPConfig
from ltmdsl.kinds.moe import MoEConfig
from ltmdsl.units import DTYPES

POS = SourcePos("test.ltm", 1, 1)
RMS = NormConfig("rmsnorm", 1e-5)
LN = NormConfig("layernorm", 1e-5)
BF16 = DTYPES["bf16"]


def attention(d, heads, kv_heads, head_dim=128, window=None, bias=False):
    m = AttentionConfig(heads, kv_heads, head_dim, head_dim, window, 5e5, True, bias, bias, False)
    params = d * heads * head_dim + 2 * d * kv_heads * head_dim + heads * head_dim * d
    if bias:
        params += heads * head_dim + 2 * kv_heads * head_dim + d
    return m, params


def mlp(d, d_ff, act="swiglu", bias=False):
    m = MLPConfig(d_ff, act, bias)
    params = (3 if m.gated else 2) * d * d_ff + ((d_ff + d) if bias else 0)
    return m, params


def moe(d, experts, top_k, d_ff, routing="softmax_topk_renorm"):
    return MoEConfig(experts, top_k, d_ff, "swiglu", routing), experts * d + experts * 3 * d * d_ff


def mamba(d, d_state=16, d_conv=4, expand=2, dt_rank=None, inner_norms=False):
    di = expand * d
    r = dt_rank or -(-d // 16)
    m = MambaConfig(d_state, d_conv, expand, di, r, True, False, inner_norms)
    params = (d * 2 * di + di * d_conv + di + di * (r + 2 * d_state) + r * di + di
              + di * d_state + di + di * d)
    if inner_norms:
        params += r + 2 * d_state
    return m, params


def mamba2(d, d_state=128, head_dim=64, expand=2, n_groups=1, d_conv=4, chunk=256):
    di = expand * d
    hs = di // head_dim
    m = Mamba2Config(d_state, head_dim, hs, n_groups, expand, di, d_conv, chunk, True, False)
    conv_dim = di + 2 * n_groups * d_state
    params = (d * (2 * di + 2 * n_groups * d_state + hs) + conv_dim * d_conv + conv_dim
              + 3 * hs + di + di * d)
    return m, params


def model(name, vocab, d, layers, tie=False, norm=RMS, dtype=BF16):
    """layers: a list of (mixer, params_without_norm); each sub-layer gets a norm of its own."""
    subs = tuple(SubLayer(i, m.kind, norm, m, p + norm.params_per_channel * d, POS)
                 for i, (m, p) in enumerate(layers))
    return ModelIR(name, vocab, d, dtype, norm, tie, subs, POS, "0" * 64)


def llama(name, n, d, heads, kv, d_ff, vocab, window=None):
    return model(name, vocab, d, [attention(d, heads, kv, window=window), mlp(d, d_ff)] * n)


def zoo() -> dict[str, ModelIR]:
    d = 4096
    jamba = []
    for i in range(32):
        jamba.append(attention(d, 32, 8) if i % 8 == 4 else mamba(d, dt_rank=256, inner_norms=True))
        jamba.append(moe(d, 16, 2, 14336, "softmax_topk") if i % 2 == 1 else mlp(d, 14336))
    return {
        "llama-3.1-8b": llama("llama-3.1-8b", 32, 4096, 32, 8, 14336, 128256),
        "llama-3.1-405b": llama("llama-3.1-405b", 126, 16384, 128, 8, 53248, 128256),
        "llama-2-7b": llama("llama-2-7b", 32, 4096, 32, 32, 11008, 32000),
        "mistral-7b-v0.1": llama("mistral-7b-v0.1", 32, 4096, 32, 8, 14336, 32000, window=4096),
        "mixtral-8x7b": model("mixtral-8x7b", 32000, d, [attention(d, 32, 8), moe(d, 8, 2, 14336)] * 32),
        "jamba-v0.1": model("jamba-v0.1", 65536, d, jamba),
        "mamba-2.8b": model("mamba-2.8b", 50280, 2560, [mamba(2560)] * 64, tie=True),
        "mamba2-2.7b": model("mamba2-2.7b", 50288, 2560, [mamba2(2560)] * 64, tie=True),
        "gpt-22b": gpt("gpt-22b", 48, 6144, 64),
    }


def gpt(name, n, h, a, vocab=51200):
    """Korthikanti's GPT block: layernorm, MHA with biases, GELU MLP of 4h; 12h^2 params per layer."""
    att = (AttentionConfig(a, a, h // a, h // a, None, None, True, True, True, False), 4 * h * h)
    ffn = (MLPConfig(4 * h, "gelu", True), 8 * h * h)
    subs = tuple(SubLayer(i, m.kind, LN, m, p, POS) for i, (m, p) in enumerate([att, ffn] * n))
    return ModelIR(name, vocab, h, DTYPES["fp16"], LN, False, subs, POS, "0" * 64)


def budget(name="b", model="m", mode="inference", context=4096, batch=1, chunk=4096, gpu=None,
           gpus=1, parallel=None, limits=(), **kw):
    from ltmdsl.hardware import CATALOGUE

    fields = dict(
        weight_dtype=BF16, kv_dtype=BF16, state_dtype=BF16, grad_dtype=DTYPES["fp32"], optimizer="adamw",
        optimizer_bytes_per_param=12, recompute="selective", flash_attention=True, chunked_loss=False,
        conv_taps="full")
    fields.update(kw)
    return BudgetIR(name, model, mode, context, batch, chunk, gpu or CATALOGUE["H100"], gpus,
                    parallel or ParallelPlan(), limits=tuple(limits), pos=POS, **fields)


def limit(component, bound, line=7):
    return LimitIR(component, bound, SourcePos("test.ltm", line, 5))


def custom_gpu(name="MyGPU", memory_bytes=24 * 10**9):
    return GpuSpec(name, memory_bytes, 100e12, 1e12, POS)
