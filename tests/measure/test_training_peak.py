"""The traced training peak against the predicted per-GPU total, kind by kind and recompute policy by policy.

Issue 14's target: the traced peak within 10% of the per-GPU total. What takes a two-sub-layer stack to its
peak is one sub-layer's backward (its recomputed region, one chunk's scan graph, its inputs' gradients: the
kind's `backward` facet) or the loss's backward, whichever is larger; at d_model 64 and a 64-token vocabulary
the backward is the larger for the recurrent kinds, and their prediction without the facet is 2 to 40% low.
Tiny shapes keep each trace to a second or two.
"""

from __future__ import annotations

import pytest

import ltmdsl
from ltmdsl.kinds import REGISTRY
from ltmdsl.measure import measure

PEAK_TOL = 0.10  # issue 14's target for the traced peak against the predicted per-GPU total

#: one tiny layer definition per kind traced alone (parallel and transformer_block are compositions of these)
LAYERS = {
    "attention": "attention(heads = 4, kv_heads = 2, rope_theta = 10000)",
    "mla": "mla(heads = 4, q_lora_rank = 32, kv_lora_rank = 16, qk_nope_head_dim = 8, qk_rope_head_dim = 8, "
           "v_head_dim = 16)",
    "mamba": "mamba(d_state = 8, d_conv = 4, expand = 2)",
    "mamba2": "mamba2(d_state = 16, head_dim = 16, n_groups = 2, chunk = 32)",
    "gated_deltanet": "gated_deltanet(key_heads = 2, value_heads = 4, head_dim = 16, chunk = 16)",
    "kda": "kda(heads = 2, head_dim = 16, chunk = 16)",
    "short_conv": "short_conv(kernel = 3)",
    "lightning": "lightning(heads = 4, chunk = 16)",
    "rg_lru": "rg_lru(heads = 4, chunk = 16)",
    "mlstm": "mlstm(heads = 4, chunk = 16)",
    "mlp": "mlp(d_ff = 176, act = swiglu)",
    "moe": "moe(experts = 4, top_k = 2, d_ff = 64)",
}

#: (kind, policy, flash attention): every kind under none and full recompute; selective where it drops
#: something (the eager attention core) and the short convolution, whose gate products it keeps; eager attention
#: under each
CASES = [(k, p, True) for k in LAYERS for p in ("none", "full")]
CASES += [("short_conv", "selective", True)]
CASES += [(k, p, False) for k in ("attention", "mla") for p in ("none", "selective", "full")]


def stack(layer: str, d_model: int = 64):
    """Two sub-layers of one kind, nothing else (bf16, vocabulary 64)."""
    return ltmdsl.loads(f"model m {{\n vocab = 64\n d_model = {d_model}\n dtype = bf16\n norm = rmsnorm(eps = 1e-5)\n"
                        f" head = untied\n layer x = {layer}\n stack {{ repeat 2 {{ x }} }}\n}}\n").model


def test_every_registered_kind_is_traced_alone_or_through_its_parts():
    assert set(LAYERS) | {"parallel", "transformer_block"} == set(REGISTRY)


@pytest.mark.parametrize("kind, policy, flash", CASES,
                         ids=[f"{k}-{p}" + ("" if f else "-eager") for k, p, f in CASES])
def test_training_peak_within_10_percent(kind, policy, flash):
    m = measure(stack(LAYERS[kind]), None, mode="training", context=128, batch=1, recompute=policy,
                flash_attention=flash)
    assert abs(m.peak_relative) <= PEAK_TOL, m.to_text()
    assert m.peak_phase.endswith("backward"), m.to_text()


@pytest.mark.parametrize("kind", ["mamba", "mamba2", "rg_lru", "mlstm", "kda"])
def test_the_backward_facet_is_what_closes_the_gap(kind):
    """Without its `backward` term the recurrent kinds' predicted peak is more than 2% low (mamba 40%): the
    backward's transients are what the facet counts, not a margin the tolerance would hide."""
    from ltmdsl.kinds import kind_of
    from ltmdsl.memory import report
    from ltmdsl.memory.activations import MicroBatch
    from ltmdsl.memory.symbols import B, T

    model = stack(LAYERS[kind])
    m = measure(model, None, mode="training", context=128, batch=1, recompute="none")
    s = report(model, None, mode="training", context=128, batch=1, recompute="none").settings
    layer = model.layers[0]
    own = int(kind_of(layer.mixer).backward(layer.mixer, MicroBatch(model, s, layer.norm)).subs({T: 128, B: 1}))
    assert m.predicted["temporaries"] > 8 * 128 * 64  # the layer's backward, not the loss's, is the largest
    assert (m.peak_bytes - (m.predicted_per_gpu - own)) / m.peak_bytes > 0.02, m.to_text()


@pytest.mark.parametrize("policy", ["none", "selective"])
def test_tiny_hybrid_training_peak_within_10_percent(policy):
    """Every kind in one stack (parallel and transformer_block among them, whose `backward` composes their
    parts'); full recompute is refused for its Zamba-style block, which feeds the next sub-layer's input."""
    from tests.paths import EXAMPLES

    spec = ltmdsl.load(EXAMPLES / "tiny-hybrid.ltm")
    m = measure(spec.model, None, mode="training", context=128, batch=1, recompute=policy)
    assert abs(m.peak_relative) <= PEAK_TOL, m.to_text()


#: MLA with its values narrower than the query/key heads (Dv 16 < Dqk 24: zero-padded for SDPA's fused kernel)
#: and as wide (Dv = Dqk = 16: SDPA keeps its v, a view of kv_b_proj's output, whole)
MLA = {
    "padded-values": "mla(heads = 4, q_lora_rank = 32, kv_lora_rank = 32, qk_nope_head_dim = 16, "
                     "qk_rope_head_dim = 8, v_head_dim = 16)",
    "equal-heads": LAYERS["mla"],
}
ACTIVATIONS_TOL = 0.05  # issue 14's target for training activations


@pytest.mark.parametrize("flash", [True, False], ids=["flash", "eager"])
@pytest.mark.parametrize("policy", ["none", "selective", "full"])
@pytest.mark.parametrize("layer", MLA, ids=MLA)
def test_mla_activations_within_5_percent_with_and_without_flash_attention(layer, policy, flash):
    """What an MLA sub-layer keeps is what its `stored` facet counts: without flash attention the explicit-
    softmax core's fp32 softmax and boolean causal mask beside its scores (until they were counted: +80% at
    d_model 64 without recompute, +98% at DeepSeek-V2-Lite's widths), and kv_b_proj's whole output where SDPA's
    saved v (or the checkpointed eager core's) is a view of it (+3.7%)."""
    m = measure(stack(MLA[layer]), None, mode="training", context=128, batch=1, recompute=policy,
                flash_attention=flash)
    assert abs(m.relative["activations"]) <= ACTIVATIONS_TOL, m.to_text()
    assert abs(m.peak_relative) <= PEAK_TOL, m.to_text()
