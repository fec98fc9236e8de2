"""The init keeps the residual stream of the embeddings' scale, for every layer kind (runtime/initializers.py).

For each runtime kind, a tiny model of eight sub-layers (the kind, then an MLP, four times; a feed-forward
kind alone eight times) is built with `ltmdsl.build`, and the stream entering the final norm (embeddings plus
every branch) is compared with the embeddings by RMS on random tokens. The factor stated here, 1.5, is what
the rule in runtime/initializers.py gives (each of N branches adds at most about STD / sqrt(N), so the stream
is at most about sqrt(2) times the embeddings); before the rule a Mamba-2 stack stood near 9x.
"""

from __future__ import annotations

import math

import pytest
import torch

import ltmdsl
from ltmdsl.runtime import initializers as init
from ltmdsl.runtime.kinds import RUNTIME_REGISTRY

FACTOR = 1.5  # stream RMS / embedding RMS at init must lie in [1 / FACTOR, FACTOR]

LAYERS = {
    "attention": "attention(heads = 4, kv_heads = 2, rope_theta = 10000)",
    "mla": "mla(heads = 4, q_lora_rank = none, kv_lora_rank = 16, qk_nope_head_dim = 8, qk_rope_head_dim = 8, "
           "v_head_dim = 8)",
    "mamba": "mamba(d_state = 8, d_conv = 4, expand = 2)",
    "mamba2": "mamba2(d_state = 16, head_dim = 16, expand = 2, chunk = 16)",
    "gated_deltanet": "gated_deltanet(key_heads = 2, value_heads = 4, head_dim = 16, v_head_dim = 16, d_conv = 4, "
                      "chunk = 16)",
    "kda": "kda(heads = 4, head_dim = 16, d_conv = 4, chunk = 16)",
    "short_conv": "short_conv(kernel = 3)",
    "lightning": "lightning(heads = 4, chunk = 16)",
    "rg_lru": "rg_lru(heads = 4, chunk = 16)",
    "mlstm": "mlstm(heads = 4, chunk = 16)",
    "parallel": "parallel(a = swa, b = ssm)",
    "mlp": "mlp(d_ff = 128, act = swiglu)",
    "moe": "moe(experts = 4, top_k = 2, d_ff = 64, act = swiglu, routing = softmax_topk)",
    # without out_proj the MLP's down_proj writes the branch; the per-use out_proj: test_use_out_proj_is_scaled
    "transformer_block": "transformer_block(attn = sat, ffn = ffn, adapter_rank = 4, out_proj = false, "
                         "into = next_input)",
}
FFN_KINDS = ("mlp", "moe")


def spec_text(kind: str) -> str:
    helpers = ""
    if kind == "parallel":
        helpers = ("    layer swa = attention(heads = 4, kv_heads = 2, window = 16, rope_theta = 10000)\n"
                   "    layer ssm = mamba2(d_state = 16, head_dim = 16, expand = 2, chunk = 16)\n")
    if kind == "transformer_block":  # Zamba style: its branch enters the next sub-layer's input
        helpers = "    layer sat = attention(heads = 4, rope_theta = 10000)\n"
    stack = "x x x x x x x x" if kind in FFN_KINDS else "x ffn x ffn x ffn x ffn"
    return (f"model init_{kind} {{\n    vocab = 128\n    d_model = 64\n    dtype = fp32\n"
            f"    norm = rmsnorm(eps = 1e-5)\n    head = untied\n{helpers}"
            f"    layer x = {LAYERS[kind]}\n    layer ffn = mlp(d_ff = 128, act = swiglu)\n"
            f"    stack {{ {stack} }}\n}}\n")


def stream_ratio(model) -> float:
    """RMS of the stream entering the final norm over the embeddings' RMS, on random tokens [2, 32]."""
    seen = {}

    def grab(_module, args):
        h, other = args[0], args[1]
        seen["stream"] = h if other is None else h + other  # the norm adds the pending branch into h

    handle = model.final_norm.register_forward_pre_hook(grab)
    tokens = torch.randint(0, model.ir.vocab, (2, 32), generator=torch.Generator().manual_seed(0))  # [B, T]
    with torch.no_grad():
        model(tokens, output="hidden")
    handle.remove()
    embeddings = model.embed(tokens)  # [B, T, d]
    return (seen["stream"].pow(2).mean().sqrt() / embeddings.pow(2).mean().sqrt()).item()


def test_every_runtime_kind_is_covered():
    assert set(LAYERS) == set(RUNTIME_REGISTRY)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_stream_at_init_is_of_the_embeddings_scale(kind):
    model = ltmdsl.build(ltmdsl.loads(spec_text(kind)), seed=0)
    ratio = stream_ratio(model)
    assert 1 / FACTOR <= ratio <= FACTOR, f"{kind}: stream RMS {ratio:.2f}x the embeddings' at init"


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_output_projections_are_scaled_and_nothing_else(kind):
    """Against the kind's own draw (every matrix at STD): the declared output projections are scaled by
    `output_scale` exactly and every other parameter is drawn exactly as the kind draws it."""
    spec = ltmdsl.loads(spec_text(kind))
    model = ltmdsl.build(spec, seed=0)
    block = model.layers[0]
    raw = ltmdsl.build(spec, seed=0)
    raw_block = raw.layers[0]
    gen = torch.Generator().manual_seed(0)  # replay the model's draw order up to the first mixer, unscaled
    init.normal_(raw.embed.weight, gen)
    raw_block.norm.init_weights(gen)
    raw_block.mixer.init_weights(gen)
    branches = len(model.layers)
    assert block.outputs, f"{kind} declares no output projection"
    for name, p in block.mixer.named_parameters():
        q = raw_block.mixer.get_parameter(name)
        if name in block.outputs:
            scale = init.output_scale(branches, p.shape[-1], block.outputs[name])
            assert scale < 1
            assert torch.equal(p, q * scale), name
        else:
            assert torch.equal(p, q), name


def test_output_scale_follows_the_published_rule():
    assert init.output_scale(24, 4096, False) == pytest.approx(1 / math.sqrt(24))  # GPT-2 / Megatron
    assert init.output_scale(12, 128, True) == pytest.approx(1 / math.sqrt(12 * 128))
    with pytest.raises(ValueError, match="branches >= 1"):
        init.output_scale(0, 8, False)


def test_shared_blocks_count_each_application():
    """A stack using one shared block three times has six branches (the block's two sub-layers, each
    applied three times), and its projections are sized for six."""
    text = "shared block z { x ffn }\n" + spec_text("attention").replace("stack { x ffn x ffn x ffn x ffn }",
                                                                       "stack { z z z }")
    model = ltmdsl.build(ltmdsl.loads(text), seed=0)
    assert len(model.layers) == 6 and model.layers[0] is model.layers[4]
    w = model.layers[1].mixer.down_proj.weight  # [d, d_ff]: 8192 draws, the std within 3% of its value
    assert w.std().item() == pytest.approx(init.STD / math.sqrt(6), rel=0.03)


def test_use_out_proj_is_scaled():
    """A transformer_block's per-use out_proj writes the branch (Zamba2): drawn at STD * output_scale."""
    text = spec_text("transformer_block").replace("out_proj = false", "out_proj = true")
    model = ltmdsl.build(ltmdsl.loads(text), seed=0)
    assert not model.layers[0].outputs  # nothing shared writes the branch
    w = model.uses["0"].out_proj.weight  # [d, d]: 4096 draws, the std within 5% of its value
    assert w.std().item() == pytest.approx(init.STD * init.output_scale(len(model.layers), 64, False), rel=0.05)
