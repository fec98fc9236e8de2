"""Predicted against traced (ltmdsl.measure): a budget's step run on fake tensors, compared with the memory model.

Targets (issue 14): weights, gradients, optimizer states and caches traced == predicted exactly; training
activations within 5%; the traced peak within 10% of the predicted per-GPU total, which counts the backward's
transients (`temporaries`: the loss's logit gradients, ZeRO-3's gathered mixers) even at d_model = 64, where
they are a large share of it. Tiny shapes keep each trace to a second or two.
"""

from __future__ import annotations

import json

import pytest

import ltmdsl
from ltmdsl.cli import main
from ltmdsl.measure import NotTraceable, TooLargeToTrace, fakesafe, measure
from tests.paths import EXAMPLES

ACTIVATIONS_TOL = 0.05  # issue 14's target for training activations
PEAK_TOL = 0.10  # issue 14's target for the traced peak against the predicted per-GPU total

DENSE = """
model dense {
    vocab = 256
    d_model = 64
    dtype = bf16
    norm = rmsnorm(eps = 1e-5)
    head = untied
    layer attn = attention(heads = 4, kv_heads = 2, rope_theta = 10000)
    layer ffn = mlp(d_ff = 176, act = swiglu)
    stack { repeat 2 { attn ffn } }
}
budget train for dense {
    training context = 256, batch = 2
    on 1 x H100
}
budget serve for dense {
    inference context = 512, batch = 2
    on 1 x H100
}
"""


@pytest.fixture(scope="module")
def dense():
    return ltmdsl.loads(DENSE)


def _budget(spec, name):
    return next(b for b in spec.budgets if b.name == name)


TRAINING = {
    "none": dict(recompute="none"),
    "full": dict(recompute="full"),
    "none-eager": dict(recompute="none", flash_attention=False),
    "selective-eager": dict(recompute="selective", flash_attention=False),
    "full-eager": dict(recompute="full", flash_attention=False),
    "pp2-1f1b": dict(pp=2, microbatches=4, gpus=2),
    "pp2-zero1-dp2": dict(pp=2, zero=1, microbatches=2, gpus=4),  # the stage's optimizer state over its dp ranks
    "zero1-dp4": dict(zero=1, gpus=4),
    "zero2-dp4": dict(zero=2, gpus=4),
}


@pytest.mark.parametrize("case", TRAINING, ids=TRAINING)
def test_training_states_exact_and_activations_within_5_percent(dense, case):
    overrides = TRAINING[case]
    m = measure(dense.model, _budget(dense, "train"), **overrides)
    assert m.mode == "training"
    for component in ("weights", "gradients", "optimizer", "logits"):
        assert m.measured[component] == m.predicted[component], component
    assert abs(m.relative["activations"]) <= ACTIVATIONS_TOL, m.to_text()
    assert abs(m.peak_relative) <= PEAK_TOL, m.to_text()
    assert m.peak_phase is not None


CHUNKED = {"whole-loss": dict(), "chunked-loss": dict(chunked_loss=True, chunk=64)}


@pytest.mark.parametrize("overrides", CHUNKED.values(), ids=CHUNKED.keys())
def test_the_loss_backward_transients_are_counted_at_tiny_width(dense, overrides):
    """At d_model = 64 and V = 256 the loss's backward (the fp32 gradients of the log-softmax and of the logits,
    8*b*s*V; a chunk's recomputed logits and gradients, (a + 12)*b*C*V) is what takes the step to its peak."""
    m = measure(dense.model, _budget(dense, "train"), **overrides)
    b, s, V = 2, 256, 256
    want = 8 * b * s * V if not overrides else (2 + 12) * b * 64 * V
    assert m.predicted["temporaries"] == want
    assert abs(m.measured["temporaries"] - want) <= 0.05 * want, m.to_text()
    assert m.peak_phase.endswith("backward")


def test_sharded_states_shrink_as_the_model_says(dense):
    full = measure(dense.model, _budget(dense, "train"))
    z2 = measure(dense.model, _budget(dense, "train"), zero=2, gpus=4)
    assert z2.measured["optimizer"] * 4 == full.measured["optimizer"]
    assert z2.measured["gradients"] * 4 == full.measured["gradients"]
    assert z2.measured["weights"] == full.measured["weights"]


def test_chunked_loss_traces_one_chunk_of_logits(dense):
    plain = measure(dense.model, _budget(dense, "train"), batch=1)
    chunked = measure(dense.model, _budget(dense, "train"), batch=1, chunked_loss=True, chunk=64)
    assert chunked.measured["logits"] == chunked.predicted["logits"] == plain.measured["logits"] // 4


def test_inference_weights_cache_and_logits_exact(dense):
    m = measure(dense.model, _budget(dense, "serve"))
    assert m.mode == "inference"
    for component in ("weights", "kv_cache", "recurrent_state", "logits"):
        assert m.measured[component] == m.predicted[component], component
    assert m.measured["kv_cache"] == 2 * 2 * 2 * 512 * 2 * 16 * 2  # layers, K+V, b, T, Hkv, D, bf16
    assert m.peak_bytes > m.measured["weights"] + m.measured["kv_cache"]
    assert m.peak_phase in ("prefill", "decode")


INFERENCE_PEAK_TOL = 0.10  # issue 14's target for the traced peak against the per-GPU total

INFERENCE = {
    "whole-context": dict(),  # one chunk of T tokens: SDPA's is_causal, no mask
    "chunk-on-cache": dict(chunk=128),  # the last 128 tokens against 384 cached ones: a mask in query blocks
    "batch-1-long": dict(batch=1, context=2048, chunk=256),
}


#: The inference tests run at a Llama-like width (tracing costs no more): at d_model = 64 the transients the
#: model leaves out (a norm's fp32 copies among them) are 7-9% of the traced workspace.
WIDE = DENSE.replace("d_model = 64", "d_model = 1024").replace("d_ff = 176", "d_ff = 3584").replace(
    "heads = 4, kv_heads = 2", "heads = 8, kv_heads = 2")


@pytest.mark.parametrize("overrides", INFERENCE.values(), ids=INFERENCE.keys())
def test_inference_activations_within_5_percent_and_peak_within_10(overrides):
    spec = ltmdsl.loads(WIDE)
    m = measure(spec.model, _budget(spec, "serve"), **overrides)
    assert abs(m.relative["activations"]) <= ACTIVATIONS_TOL, m.to_text()
    assert abs(m.peak_relative) <= INFERENCE_PEAK_TOL, m.to_text()


WINDOWED = WIDE.replace("rope_theta = 10000)", "rope_theta = 10000, window = 64)")


def test_windowed_inference_activations_within_5_percent():
    spec = ltmdsl.loads(WINDOWED)
    m = measure(spec.model, _budget(spec, "serve"), chunk=128)
    assert m.measured["kv_cache"] == m.predicted["kv_cache"]
    assert abs(m.relative["activations"]) <= ACTIVATIONS_TOL, m.to_text()


NEW_KINDS = {
    "mla": "mla(heads = 4, q_lora_rank = 32, kv_lora_rank = 16, qk_nope_head_dim = 8, qk_rope_head_dim = 8, "
           "v_head_dim = 16)",
    "gated_deltanet": "gated_deltanet(key_heads = 2, value_heads = 4, head_dim = 16, chunk = 16)",
    "kda": "kda(heads = 2, head_dim = 16, chunk = 16)",
    "short_conv": "short_conv(kernel = 3)",
    "lightning": "lightning(heads = 4, chunk = 16)",
    "rg_lru": "rg_lru(heads = 4, chunk = 16)",
    "mlstm": "mlstm(heads = 4, chunk = 16)",
}


@pytest.mark.parametrize("kind", NEW_KINDS, ids=NEW_KINDS)
def test_newer_kinds_trace_with_exact_states_and_caches(kind):
    """Each kind traces on fake tensors (no value read back, static shapes): weights, caches, gradients and
    optimizer states equal the prediction to the byte, in inference and training. Their activations are
    compared in the README's table; not all are within 5% yet (README, "Predicted against traced")."""
    spec = ltmdsl.loads(DENSE.replace("attention(heads = 4, kv_heads = 2, rope_theta = 10000)", NEW_KINDS[kind]))
    serve = measure(spec.model, _budget(spec, "serve"), chunk=128)
    for component in ("weights", "kv_cache", "recurrent_state", "logits"):
        assert serve.measured[component] == serve.predicted[component], component
    assert serve.measured["kv_cache"] + serve.measured["recurrent_state"] > 0
    train = measure(spec.model, _budget(spec, "train"), recompute="none")
    for component in ("weights", "gradients", "optimizer", "logits"):
        assert train.measured[component] == train.predicted[component], component
    assert train.measured["activations"] > 0


SCAN_KINDS = {
    "mamba": "mamba(d_state = 8, d_conv = 4, expand = 2)",
    "mamba-inner-norms": "mamba(d_state = 8, d_conv = 4, expand = 2, dt_rank = 16, inner_norms = true)",
    "mamba2": "mamba2(d_state = 16, head_dim = 16, n_groups = 2, chunk = 32)",
    "mlstm": "mlstm(heads = 4, chunk = 16)",
    "rg_lru": "rg_lru(heads = 4, chunk = 16)",
}
SCAN_STEPS = {
    "prefill-on-cache": dict(mode="inference", chunk=128),
    "train-none": dict(mode="training", recompute="none"),
    "train-selective": dict(mode="training", recompute="selective"),
    "train-full": dict(mode="training", recompute="full"),
}


@pytest.mark.parametrize("step", SCAN_STEPS, ids=SCAN_STEPS)
@pytest.mark.parametrize("kind", SCAN_KINDS, ids=SCAN_KINDS)
def test_scan_kinds_activations_within_5_percent(kind, step):
    """The recurrent kinds whose ops recompute their scan in backward (runtime/chunk_recompute.py): the
    activations each kind's facets state are what the runtime holds, within 5%, in a prefill chunk against a
    cache and in training under every recompute policy (d_model 256: the stack's own terms stay small)."""
    text = DENSE.replace("attention(heads = 4, kv_heads = 2, rope_theta = 10000)", SCAN_KINDS[kind]).replace(
        "d_model = 64", "d_model = 256")
    spec = ltmdsl.loads(text)
    overrides = dict(SCAN_STEPS[step])
    budget = _budget(spec, "serve" if overrides.pop("mode") == "inference" else "train")
    m = measure(spec.model, budget, **overrides)
    assert abs(m.relative["activations"]) <= ACTIVATIONS_TOL, m.to_text()
    if m.mode == "inference":
        assert abs(m.peak_relative) <= INFERENCE_PEAK_TOL, m.to_text()


@pytest.mark.parametrize("policy", ["none", "selective", "full"])
def test_short_conv_activations_within_5_percent_under_every_policy(policy):
    """Selective recompute drops only the attention core, so a short convolution keeps its gate products under
    it as under none (the model dropped them until 2026-12: +20% traced over the prediction)."""
    text = DENSE.replace("attention(heads = 4, kv_heads = 2, rope_theta = 10000)", NEW_KINDS["short_conv"]).replace(
        "d_model = 64", "d_model = 256")
    spec = ltmdsl.loads(text)
    m = measure(spec.model, _budget(spec, "train"), recompute=policy)
    assert abs(m.relative["activations"]) <= ACTIVATIONS_TOL, m.to_text()


def traceable_tiny_hybrid():
    """tiny-hybrid, every mixer kind of the runtime in one stack: all of them have a fake-tensor path."""
    return ltmdsl.load(EXAMPLES / "tiny-hybrid.ltm")


def test_every_kind_of_the_tiny_hybrid_traces_its_caches_exactly():
    spec = traceable_tiny_hybrid()
    m = measure(spec.model, spec.budgets[0], context=256)
    for component in ("weights", "kv_cache", "recurrent_state", "logits"):
        assert m.measured[component] == m.predicted[component], component
    assert m.measured["recurrent_state"] > 0
    assert any("balanced routing" in n for n in m.notes)


MOE = DENSE.replace("model dense", "model sparse").replace("for dense", "for sparse").replace(
    "layer ffn = mlp(d_ff = 176, act = swiglu)", "layer ffn = moe(experts = 4, top_k = 2, d_ff = 64)")


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_moe_activations_within_5_percent_with_balanced_routing(recompute):
    spec = ltmdsl.loads(MOE)
    m = measure(spec.model, _budget(spec, "train"), recompute=recompute)
    for component in ("weights", "gradients", "optimizer", "logits"):
        assert m.measured[component] == m.predicted[component], component
    assert abs(m.relative["activations"]) <= ACTIVATIONS_TOL, m.to_text()
    assert any("balanced routing" in n for n in m.notes)


SHARED_MOE = MOE.replace("moe(experts = 4, top_k = 2, d_ff = 64)",
                         "moe(experts = 4, top_k = 2, d_ff = 64, shared_d_ff = 96, shared_gate = true)")


def test_moe_with_a_gated_shared_expert_traces_with_exact_states():
    """The balanced dispatch runs the runtime's expert maths and its shared expert (Qwen-MoE's)."""
    spec = ltmdsl.loads(SHARED_MOE)
    m = measure(spec.model, _budget(spec, "train"), recompute="none")
    for component in ("weights", "gradients", "optimizer", "logits"):
        assert m.measured[component] == m.predicted[component], component
    serve = measure(spec.model, _budget(spec, "serve"))
    assert serve.measured["weights"] == serve.predicted["weights"]


def test_moe_training_states_exact_with_balanced_routing():
    spec = traceable_tiny_hybrid()
    attn_moe = spec.model  # every traceable kind; MoE dispatch static
    m = measure(attn_moe, None, mode="training", context=128, batch=1, recompute="none")
    for component in ("weights", "gradients", "optimizer", "logits"):
        assert m.measured[component] == m.predicted[component], component


def test_kind_without_fake_safe_path_is_refused_by_name(dense, monkeypatch):
    monkeypatch.delitem(fakesafe.TRACE_PATHS, "mlp")
    with pytest.raises(NotTraceable, match="layer kind 'mlp' has no fake-tensor path"):
        measure(dense.model, _budget(dense, "train"))


PARALLEL = {  # one rank of each plan, built by ltmdsl.distributed under a fake process group
    "cp4": (DENSE, dict(cp=4, gpus=4)),
    "cp2-zero2-dp2": (DENSE, dict(cp=2, zero=2, gpus=4)),
    "cp2-full-recompute": (DENSE, dict(cp=2, gpus=2, recompute="full")),
    "zero3-dp4": (DENSE, dict(zero=3, gpus=4)),
    "zero3-dp2-cp2": (DENSE, dict(zero=3, cp=2, gpus=4)),
    "ep2-moe": (MOE, dict(ep=2, gpus=2)),
    "tp2": (DENSE, dict(tp=2, gpus=2)),
    "tp2-zero3-dp2": (DENSE, dict(tp=2, zero=3, gpus=4)),
    "tp2-sp": (DENSE, dict(tp=2, gpus=2, sequence_parallel=True)),
    "tp2-sp-eager": (DENSE, dict(tp=2, gpus=2, sequence_parallel=True, flash_attention=False)),
    "tp2-sp-zero3-dp2": (DENSE, dict(tp=2, zero=3, gpus=4, sequence_parallel=True)),
    "tp2-sp-moe": (MOE, dict(tp=2, gpus=2, sequence_parallel=True)),
    # a pipeline rank (the most loaded stage: here the last, with the loss) split further inside its stage
    "pp2-tp2": (DENSE, dict(pp=2, tp=2, microbatches=2, gpus=4)),
    "pp2-tp2-sp": (DENSE, dict(pp=2, tp=2, microbatches=2, gpus=4, sequence_parallel=True)),  # receives T/2 tokens
    "pp2-cp2": (DENSE, dict(pp=2, cp=2, microbatches=2, gpus=4)),
    "pp2-zero3-dp2": (DENSE, dict(pp=2, zero=3, microbatches=2, gpus=4)),
    "pp2-tp2-zero3-dp2": (DENSE, dict(pp=2, tp=2, zero=3, microbatches=2, gpus=8)),
    "pp2-ep2-moe": (MOE, dict(pp=2, ep=2, microbatches=2, gpus=4)),
    # MoE parallel folding: whole experts over the tp ranks, each dispatching its half of the tokens
    "tp2-ep2-etp1-moe": (MOE, dict(tp=2, ep=2, etp=1, gpus=2)),
    "tp2-sp-ep2-etp1-moe": (MOE, dict(tp=2, ep=2, etp=1, gpus=2, sequence_parallel=True)),
}


@pytest.mark.parametrize("case", PARALLEL, ids=PARALLEL)
def test_one_rank_of_a_parallel_plan_traces_states_exactly_and_activations_within_5_percent(case):
    text, overrides = PARALLEL[case]
    spec = ltmdsl.loads(text)
    m = measure(spec.model, _budget(spec, "train"), **overrides)
    for component in ("weights", "gradients", "optimizer", "logits"):
        assert m.measured[component] == m.predicted[component], component
    assert abs(m.relative["activations"]) <= ACTIVATIONS_TOL, m.to_text()
    assert abs(m.peak_relative) <= PEAK_TOL, m.to_text()
    assert any("fake process group" in n for n in m.notes)


VOCAB_PARALLEL = {  # tp rank's loss: training's vocab-parallel cross-entropy, whole, chunked, soft-capped
    "whole": (DENSE, {}),
    "chunked-by-32": (DENSE, dict(chunked_loss=True, chunk=32)),
    "soft-capped": (DENSE.replace("head = untied", "head = untied\n    logit_cap = 30.0"), {}),
}


@pytest.mark.parametrize("case", VOCAB_PARALLEL, ids=VOCAB_PARALLEL)
def test_tp_rank_traces_the_vocab_parallel_loss_on_its_vocabulary_rows(case):
    """The traced loss keeps d loss / d hidden [b*s, d] (bf16) and d loss / d head rows [V/2, d] (fp32), no
    logits, exactly as predicted, and the peak within PEAK_TOL (10%): unchunked with its [b*s, V/2] working set;
    chunked by 32 the loss's working set is small and the peak is the stack's backward (the kinds' `backward`)."""
    text, extra = VOCAB_PARALLEL[case]
    spec = ltmdsl.loads(text)
    m = measure(spec.model, _budget(spec, "train"), tp=2, gpus=2, **extra)
    assert m.measured["logits"] == m.predicted["logits"] == 2 * 2 * 256 * 64 + 4 * 64 * 256 // 2
    assert abs(m.peak_relative) <= PEAK_TOL, m.to_text()


@pytest.mark.parametrize("overrides", [{}, dict(flash_attention=False)], ids=["flash", "eager"])
def test_sequence_parallel_rank_saves_what_the_model_says_it_saves(dense, overrides):
    """sp = true on 2 tp ranks: the norms' and the residual's activations are a rank's T/2 tokens, while each
    mixer keeps its input all-gathered (whole) and so does the loss the final norm's output. The bytes sp
    saves are exactly the bytes the memory model says it saves."""
    plain = measure(dense.model, _budget(dense, "train"), tp=2, gpus=2, **overrides)
    sp = measure(dense.model, _budget(dense, "train"), tp=2, gpus=2, sequence_parallel=True, **overrides)
    saved = plain.measured["activations"] - sp.measured["activations"]
    assert saved > 0
    assert saved == plain.predicted["activations"] - sp.predicted["activations"]


def test_sequence_parallel_rank_of_every_kind_within_5_percent():
    """tiny-hybrid's kinds, splittable at tp = 2 (its MQA window given 2 KV heads, its Mamba-2 2 groups, no
    transformer_block), traced as one sp rank: states exact, activations within 5% (measured +2.3%, the same
    bytes as without sp)."""
    text = (EXAMPLES / "tiny-hybrid.ltm").read_text()
    for old, new in (("heads = 4, kv_heads = 1, window = 16", "heads = 4, kv_heads = 2, window = 16"),
                     ("head_dim = 16, expand = 2, chunk = 16", "head_dim = 16, expand = 2, n_groups = 2, chunk = 16"),
                     ("        tf ffn\n", "")):
        assert old in text
        text = text.replace(old, new)
    model = ltmdsl.loads(text).model
    m = measure(model, None, mode="training", context=128, batch=2, tp=2, gpus=2, sequence_parallel=True)
    for component in ("weights", "gradients", "optimizer", "logits"):
        assert m.measured[component] == m.predicted[component], component
    assert abs(m.relative["activations"]) <= ACTIVATIONS_TOL, m.to_text()


def test_first_pipeline_stage_under_zero3_traces_states_exactly_and_activations_within_5_percent(dense):
    """With a chunked loss the first stage (2 micro-batches in flight) is the most loaded: FSDP2 shards that
    stage alone (its mixers, then the stage as the root of its embedding), as a pipeline rank runs it; its
    weights are the shard plus the gathered embedding. The peak is not held to 10% here: the first stage's
    backward transients, which the memory model does not count, put it ~12% over with or without ZeRO."""
    m = measure(dense.model, _budget(dense, "train"), pp=2, zero=3, microbatches=2, gpus=4, chunked_loss=True,
                chunk=32)
    assert m.stage == 0
    for component in ("weights", "gradients", "optimizer", "logits"):
        assert m.measured[component] == m.predicted[component], component
    assert abs(m.relative["activations"]) <= ACTIVATIONS_TOL, m.to_text()


SP_BUDGET = DENSE.replace("""budget train for dense {
    training context = 256, batch = 2
    on 1 x H100
}""", """budget train_long for dense {
    training context = 256Ki, batch = 8, chunked_loss = true, chunk = 512
    on 4 x H100 with tp = 2, cp = 2, zero = 1, sp = true
}""")


def test_cli_measures_a_tp_cp_sequence_parallel_budget(tmp_path):
    """`ltmdsl memory --measure` on a budget shaped as ltm-100m's train_256k (tp x cp, ZeRO 1, sp) at a
    smaller context traces one rank (in a fresh process: one tp x cp trace per process, ranks.py)."""
    import subprocess
    import sys

    assert "sp = true" in SP_BUDGET
    path = tmp_path / "dense.ltm"
    path.write_text(SP_BUDGET)
    done = subprocess.run([sys.executable, "-c", "import sys; from ltmdsl.cli import main; sys.exit(main(sys.argv[1:]))",
                           "memory", str(path), "--measure", "--budget", "train_long", "--context", "1024", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    for component in ("weights", "gradients", "optimizer", "logits"):
        assert data["measured"][component] == data["predicted"][component], component
    activations = data["measured"]["activations"] / data["predicted"]["activations"] - 1
    assert abs(activations) <= ACTIVATIONS_TOL, data


TP_INFERENCE = {  # one tp rank's inference: each kind's cache of its own heads (runtime.cache), logits gathered
    "dense-whole-context": (WIDE, {}),
    "dense-chunk-on-cache": (WIDE, dict(chunk=128)),
    **{f"{kind}-chunk-on-cache": (DENSE.replace("attention(heads = 4, kv_heads = 2, rope_theta = 10000)", layer)
                                  .replace("d_model = 64", "d_model = 256"), dict(chunk=128))
       for kind, layer in SCAN_KINDS.items() if kind in ("mamba", "mamba2", "mlstm")},
}


@pytest.mark.parametrize("case", TP_INFERENCE, ids=TP_INFERENCE)
def test_tp_inference_rank_traces_its_heads_cache_exactly_and_activations_within_5_percent(case):
    """One rank of tp = 2 in inference: weights, caches and the gathered fp32 logits (4*b*V) equal the per-GPU
    prediction to the byte; activations within 5% and the peak within 10%. DTensor's shape propagation runs
    in a fake mode of its own (ltmdsl.measure.ranks): traced in ours it added +68% to the dense prefill."""
    text, extra = TP_INFERENCE[case]
    spec = ltmdsl.loads(text)
    m = measure(spec.model, _budget(spec, "serve"), tp=2, gpus=2, **extra)
    for component in ("weights", "kv_cache", "recurrent_state", "logits"):
        assert m.measured[component] == m.predicted[component], component
    assert m.measured["logits"] == 4 * 2 * 256  # fp32, b = 2 sequences, all V = 256 on every rank
    if text == WIDE:
        assert m.measured["kv_cache"] == 2 * 2 * 2 * 512 * 1 * 128 * 2  # layers, K+V, b, T, Hkv/t, D, bf16
    assert abs(m.relative["activations"]) <= ACTIVATIONS_TOL, m.to_text()
    assert abs(m.peak_relative) <= INFERENCE_PEAK_TOL, m.to_text()
    assert any("fake process group" in n for n in m.notes)


def test_zero3_rank_holds_a_quarter_of_the_weights_and_context_parallel_ranks_a_share_of_the_tokens(dense):
    whole = measure(dense.model, _budget(dense, "train"))
    z3 = measure(dense.model, _budget(dense, "train"), zero=3, gpus=4)
    root = 2 * 256 * 64 + 5 * 64  # embedding, head, four sub-layer norms and the final norm: FSDP2's root
    assert z3.measured["weights"] == whole.measured["weights"] // 4 + 2 * root  # the shard + the root gathered (bf16)
    assert z3.measured["optimizer"] * 4 == whole.measured["optimizer"]
    cp = measure(dense.model, _budget(dense, "train"), cp=4, gpus=4)
    assert cp.measured["logits"] * 4 == whole.measured["logits"]  # T/4 tokens' logits


def test_expert_parallel_inference_activations_within_5_percent():
    spec = ltmdsl.loads(MOE)
    m = measure(spec.model, _budget(spec, "serve"), ep=2, gpus=2)
    for component in ("weights", "kv_cache", "logits"):
        assert m.measured[component] == m.predicted[component], component
    assert abs(m.relative["activations"]) <= ACTIVATIONS_TOL, m.to_text()


def test_expert_parallel_serving_at_width_1024_counts_the_moments_ep_experts_holds():
    """At d_model 1024 (4 experts, top 2, F 1024; 512 tokens per rank) the experts' rows dominate: the runtime
    adds the experts' results into the received rows' buffer in place and releases those rows before sending
    the results back; the model counts two [n*k, d] buffers beside the larger of one expert's moment and the
    combine's output (was three buffers beside one expert's 3d + 4F: -6.5% under the last trace, -26% after
    the in-place add)."""
    spec = ltmdsl.loads(MOE.replace("d_model = 64", "d_model = 1024").replace(
        "moe(experts = 4, top_k = 2, d_ff = 64)", "moe(experts = 4, top_k = 2, d_ff = 1024)").replace(
        "repeat 2", "repeat 1"))
    m = measure(spec.model, _budget(spec, "serve"), ep=2, gpus=2)
    for component in ("weights", "kv_cache", "logits"):
        assert m.measured[component] == m.predicted[component], component
    assert abs(m.relative["activations"]) <= ACTIVATIONS_TOL, m.to_text()


def test_plans_ltmdsl_does_not_run_are_refused_saying_why(dense):
    with pytest.raises(NotTraceable, match="ltmdsl.distributed does not run this plan.*interleave = 2 needs a"):
        measure(ltmdsl.loads(MOE).model, _budget(ltmdsl.loads(MOE), "train"), cp=2, ep=2, zero=2, interleave=2, gpus=2)
    with pytest.raises(ValueError, match=r"etp\*ep = 1\*4 = 4 does not divide the tp\*cp\*dp = 1\*1\*2 = 2"):
        measure(ltmdsl.loads(MOE).model, _budget(ltmdsl.loads(MOE), "train"), ep=4, zero=2, gpus=2)  # no one runs it
    mla = ltmdsl.loads(DENSE.replace("attention(heads = 4, kv_heads = 2, rope_theta = 10000)", NEW_KINDS["mla"]))
    with pytest.raises(NotTraceable, match=r"context parallelism \(cp = 2\) in inference: no form for kind 'mla'"):
        measure(mla.model, _budget(mla, "serve"), cp=2, gpus=2)
    with pytest.raises(ValueError, match="etp = 1 fits"):  # minimax's old tp x ep: the experts over 4 ranks of 2
        measure(ltmdsl.loads(MOE).model, _budget(ltmdsl.loads(MOE), "serve"), tp=2, ep=2, gpus=2)


@pytest.mark.parametrize("mode, plan", [("train", {"ep": 2, "zero": 3, "gpus": 4}),
                                        ("train", {"ep": 2, "zero": 1, "gpus": 4}),
                                        ("train", {"cp": 2, "ep": 2, "zero": 3, "gpus": 4}),
                                        ("serve", {"tp": 2, "ep": 2, "gpus": 4}),
                                        ("train", {"tp": 2, "ep": 2, "etp": 1, "zero": 1, "gpus": 4}),
                                        ("serve", {"tp": 2, "ep": 2, "etp": 1, "gpus": 2})],
                         ids=["dp4-ep2-zero3", "dp4-ep2-zero1", "dp2-cp2-ep2-zero3", "serve-tp2-dp2-ep2",
                              "tp2-dp2-ep2-etp1-zero1", "serve-tp2-ep2-etp1"])
def test_expert_parallel_with_zero_and_tp_states_as_predicted(mode, plan):
    """ep carved out of dp (expert state ZeRO-sharded over the dp*cp/ep ranks holding the same experts, with cp
    too), ep x tp (each expert's width split over tp as well) and folded (etp = 1: whole experts over the tp
    ranks, their state ZeRO-sharded over edp = tp*dp/ep): the traced rank's model states equal the prediction
    exactly."""
    spec = ltmdsl.loads(MOE)
    m = measure(spec.model, _budget(spec, mode), **plan)
    for component in ("weights", "gradients", "optimizer") if mode == "train" else ("weights",):
        assert m.measured[component] == m.predicted[component], component


def _cp_hybrid():
    """tiny-hybrid's kinds that cp inference runs (tests/distributed/test_cp_inference.py), a window of 64."""
    text = (EXAMPLES / "tiny-hybrid.ltm").read_text().replace("window = 16", "window = 64")
    head, _, rest = text.partition("    stack {")
    _, _, tail = rest.partition("    }\n}")
    stack = "ssm1 ffn ssm2 moe swa ffn attn ffn gdn ffn kda ffn conv ffn lit ffn lru ffn mem ffn"
    return ltmdsl.loads(f"{head}    stack {{ {stack} }}\n}}{tail}")


CP_INFERENCE = {"dense-cp2": ("dense", 2), "dense-cp4": ("dense", 4), "hybrid-cp2": ("hybrid", 2)}


@pytest.mark.parametrize("case", CP_INFERENCE, ids=CP_INFERENCE)
def test_cp_inference_rank_traces_its_share_of_the_caches_exactly_and_activations_within_5_percent(dense, case):
    """One rank of context-parallel inference (ltmdsl.distributed.cp_inference under the fake group), the last
    prefill chunk of 512 against a cache of 2048 (dense at d_model 64; tiny-hybrid's cp kinds with a window of
    64): its KV cache is 1/cp of one process's and its recurrent states whole, equal to the per-GPU prediction
    to the byte, as are its weights and the last position's logits; activations within 5%, peak within 10%
    (measured: dense +0.06% / +0.08% at d_model 1024, hybrid -4.3%: the window's explicit scores)."""
    what, cp = CP_INFERENCE[case]
    spec = dense if what == "dense" else _cp_hybrid()
    budget = _budget(spec, "serve") if what == "dense" else spec.budgets[0]
    settings = dict(context=2048, chunk=512, batch=2)
    whole = measure(spec.model, budget, **settings)
    m = measure(spec.model, budget, cp=cp, gpus=cp, **settings)
    for component in ("weights", "kv_cache", "recurrent_state", "logits"):
        assert m.measured[component] == m.predicted[component], component
    assert m.measured["kv_cache"] * cp == whole.measured["kv_cache"]
    assert m.measured["recurrent_state"] == whole.measured["recurrent_state"]
    assert abs(m.relative["activations"]) <= ACTIVATIONS_TOL, m.to_text()
    assert abs(m.peak_relative) <= INFERENCE_PEAK_TOL, m.to_text()
    assert any("context-parallel inference" in n for n in m.notes)


def test_transformer_block_tp_rank_traces_as_predicted():
    """Zamba2's block under tp = 2 (its attention and MLP split, each use's adapters and out_proj split with
    what they feed, the mid norm replicated): the traced rank's model states equal the prediction exactly,
    its activations within the activation tolerance (+0.9% measured)."""
    zamba = ltmdsl.loads(DENSE.replace(
        "    stack { repeat 2 { attn ffn } }",
        "    layer tf = transformer_block(attn = attn, ffn = ffn, adapter_rank = 4, into = next_input)\n"
        "    stack { repeat 2 { tf ffn } }"))
    m = measure(zamba.model, _budget(zamba, "train"), tp=2, gpus=2)
    for component in ("weights", "gradients", "optimizer", "logits"):
        assert m.measured[component] == m.predicted[component], component
    assert abs(m.relative["activations"]) <= ACTIVATIONS_TOL, m.to_text()


def test_budget_too_large_to_trace_suggests_a_context():
    spec = ltmdsl.load(EXAMPLES / "mamba-2.8b.ltm")
    with pytest.raises(TooLargeToTrace, match=r"--context \d+"):
        measure(spec.model, None, mode="training", context=2**20)


def test_cli_measure_json(tmp_path, capsys):
    path = tmp_path / "dense.ltm"
    path.write_text(DENSE)
    assert main(["memory", str(path), "--measure", "--budget", "train", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["predicted"]) == set(data["measured"]) == {
        "weights", "gradients", "optimizer", "activations", "logits", "temporaries"}
    assert data["measured"]["weights"] == data["predicted"]["weights"] > 0
    assert data["peak_bytes"] > 0


def test_cli_measure_text_and_refusal(tmp_path, capsys, monkeypatch):
    path = tmp_path / "dense.ltm"
    path.write_text(DENSE)
    assert main(["memory", str(path), "--measure", "--budget", "serve"]) == 0
    out = capsys.readouterr().out
    assert "kv_cache" in out and "traced peak" in out and "+0.00%" in out
    monkeypatch.delitem(fakesafe.TRACE_PATHS, "attention")
    assert main(["memory", str(path), "--measure"]) == 3
    assert "layer kind 'attention' has no fake-tensor path" in capsys.readouterr().err


def test_a_parallel_layer_with_a_moe_branch_is_refused_by_name():
    """A parallel layer runs its branches unsubstituted, so a MoE branch (whose dispatch needs the balanced
    tracing path) is refused naming the layer and the branch."""
    from ltmdsl.measure.fakesafe import NotTraceable, check

    ir = ltmdsl.loads("model m {\n vocab = 32\n d_model = 16\n layer a = attention(heads = 2)\n"
                      " layer e = moe(experts = 2, d_ff = 16)\n layer p = parallel(a = a, b = e)\n stack { p }\n}\n").ir.model()
    with pytest.raises(NotTraceable, match=r"layer 0 'p': branch b \(moe\) of a parallel layer"):
        check(ir)


def test_trace_cost_counts_the_masked_query_blocks_of_a_chunk_on_a_long_cache():
    """A chunk against cached keys runs `mask_rows(T)` queries per SDPA call: the estimate grows with T."""
    from ltmdsl.kinds.attention import mask_rows
    from ltmdsl.measure.cost import OPS_PER_STEP, estimate_ops
    from ltmdsl.memory import report

    model = ltmdsl.load(EXAMPLES / "llama-3.1-8b.ltm").model
    whole = report(model, None, context=8192, chunk=8192).settings
    cached = report(model, None, context=1 << 20, chunk=8192).settings
    layers = sum(1 for layer in model.layers if layer.kind == "attention")
    blocks = -(-8192 // mask_rows(1 << 20))
    assert estimate_ops(model, cached, 0) - estimate_ops(model, whole, 0) == layers * OPS_PER_STEP * blocks


CHUNKED = {
    "gated_deltanet": "gated_deltanet(key_heads = 2, head_dim = 16, chunk = 16)",
    "kda": "kda(heads = 2, head_dim = 16, chunk = 16)",
    "lightning": "lightning(heads = 2, chunk = 16)",
    "mamba2": "mamba2(d_state = 16, head_dim = 16, chunk = 16)",
    "mlstm": "mlstm(heads = 2, chunk = 16)",
    "rg_lru": "rg_lru(heads = 2, chunk = 16)",
}


@pytest.mark.parametrize("layer", CHUNKED.values(), ids=CHUNKED)
def test_trace_cost_counts_the_chunks_of_the_chunked_rules(layer):
    """The chunked scans and rules run one chunk at a time: T/chunk loop steps per layer (each runtime kind's
    `trace_loops`; mLSTM and RG-LRU were counted as straight-line code until 2026-12)."""
    from ltmdsl.measure.cost import OPS_PER_LAYER, OPS_PER_STEP, estimate_ops
    from ltmdsl.memory import report

    model = ltmdsl.loads(f"model m {{\n vocab = 32\n d_model = 32\n layer x = {layer}\n stack {{ x x }}\n}}\n").model
    s = report(model, None, context=200, chunk=200).settings
    assert estimate_ops(model, s, 0) == 2 * (OPS_PER_LAYER + OPS_PER_STEP * 13)  # ceil(200 / 16) chunks


def test_trace_cost_of_a_parallel_layer_counts_both_branches():
    """A parallel layer runs both branches, so its loops are theirs together (a Mamba-2 branch's chunks here;
    until 2026-12 a composite was counted as straight-line code)."""
    from ltmdsl.measure.cost import OPS_PER_LAYER, OPS_PER_STEP, estimate_ops
    from ltmdsl.memory import report

    model = ltmdsl.loads("model m {\n vocab = 32\n d_model = 32\n layer a = attention(heads = 2)\n"
                         " layer s = mamba2(d_state = 16, head_dim = 16, chunk = 16)\n"
                         " layer p = parallel(a = a, b = s)\n stack { p }\n}\n").model
    s = report(model, None, context=200, chunk=200).settings
    assert estimate_ops(model, s, 0) == OPS_PER_LAYER + OPS_PER_STEP * 13  # the attention runs in one call


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.ltm")), ids=lambda p: p.stem)
def test_trace_cost_is_counted_for_every_example(path):
    """Every kind of every example states its loops (composites through their parts' registry entries)."""
    from ltmdsl.measure.cost import OPS_PER_LAYER, estimate_ops
    from ltmdsl.memory import report

    model = ltmdsl.load(path).models[0]
    s = report(model, None, mode="training", context=4096, sharding="plan").settings
    assert estimate_ops(model, s, 0) >= 3 * OPS_PER_LAYER * len(model.layers)


def test_counting_saved_tensors_keeps_nothing_alive():
    """The working-set probe counts what autograd saves, then drops it: exp saves its own output, which a pack
    hook returning the tensor itself would keep forever (a cycle through its grad_fn) and so inflate the peak."""
    import torch
    from torch.multiprocessing.reductions import StorageWeakRef

    from ltmdsl.measure.train import saved_bytes

    x = torch.ones(4, 8, requires_grad=True)
    kept, y = saved_bytes(lambda a: (a * 2).exp().sum(), x)
    assert kept == 4 * 8 * 4  # exp's fp32 output (a * 2 by a scalar saves nothing)
    ref = StorageWeakRef(y.grad_fn.next_functions[0][0]._saved_result.untyped_storage())
    del y
    assert ref.expired()


FULL_TP = {"tp2-full": dict(tp=2, gpus=2, recompute="full"),
           "tp2-sp-full": dict(tp=2, gpus=2, sequence_parallel=True, recompute="full")}


@pytest.mark.parametrize("overrides", FULL_TP.values(), ids=FULL_TP)
def test_full_recompute_working_set_of_a_tp_rank_counts_its_local_shards(dense, overrides):
    """The working-set probe counts a DTensor as its rank's local shard: its wrapper's storage has the global
    shape's bytes, which counted a tp = 2 rank's working set up to twice over (+25%, +34% with sp)."""
    m = measure(dense.model, _budget(dense, "train"), **overrides)
    assert abs(m.relative["activations"]) <= ACTIVATIONS_TOL, m.to_text()
    assert abs(m.peak_relative) <= PEAK_TOL, m.to_text()


HYBRID_UNITS = """
model units {
    vocab = 64
    d_model = 64
    dtype = bf16
    norm = rmsnorm(eps = 1e-5)
    head = untied
    layer ssm = mamba2(d_state = 16, head_dim = 16, n_groups = 2, chunk = 32)
    layer conv = short_conv(kernel = 3)
    layer attn = attention(heads = 4, kv_heads = 2, rope_theta = 10000)
    layer ffn = mlp(d_ff = 128, act = swiglu)
    stack { repeat 2 { ssm conv attn ffn } }
}
"""
CP_PLANS = {"one-gpu": dict(), "cp2": dict(cp=2, gpus=2), "tp2-cp2-sp": dict(cp=2, tp=2, gpus=4, sequence_parallel=True)}


@pytest.mark.parametrize("plan", CP_PLANS.values(), ids=CP_PLANS)
def test_full_recompute_working_set_is_the_largest_unit(plan):
    """ltm-100m's block shape (Mamba-2 and a short convolution without an FFN after them, attention with one):
    the working set is the largest checkpoint unit's activations, not the largest mixer's plus the largest
    FFN's (-28%, -26% and -21% with that convention)."""
    model = ltmdsl.loads(HYBRID_UNITS).model
    m = measure(model, None, mode="training", context=256, batch=2, recompute="full", **plan)
    assert abs(m.relative["activations"]) <= ACTIVATIONS_TOL, m.to_text()
    assert abs(m.peak_relative) <= PEAK_TOL, m.to_text()


MAMBA2_CP = DENSE.replace("attention(heads = 4, kv_heads = 2, rope_theta = 10000)",
                          "mamba2(d_state = 16, head_dim = 16, n_groups = 2, chunk = 32)")


@pytest.mark.parametrize("recompute", ["none", "full"])
@pytest.mark.parametrize("plan", [p for k, p in CP_PLANS.items() if k != "one-gpu"], ids=["cp2", "tp2-cp2-sp"])
def test_mamba2_context_parallel_rank_keeps_what_the_model_counts(plan, recompute):
    """Mamba-2's cp_forward recomputes its scans and gate in backward as its forward does, and the states the
    ranks exchange are counted (the kind's `stored` facet): +64% to +72% with its fp32 internals kept."""
    spec = ltmdsl.loads(MAMBA2_CP)
    m = measure(spec.model, _budget(spec, "train"), recompute=recompute, **plan)
    assert abs(m.relative["activations"]) <= ACTIVATIONS_TOL, m.to_text()
    assert abs(m.peak_relative) <= PEAK_TOL, m.to_text()


def test_windowed_attention_under_cp_keeps_the_gathered_keys_as_global_attention_does(dense):
    """A cp rank's windowed attention saves views of every rank's all-gathered keys and values, as global
    attention does, and its pieces' masks, each over only the keys its window reaches: traced as the model counts
    (it counted no gathered keys for a window, then no masks). Its masks are smaller than the global layers'
    causal masks over every key (windows of 64 over pieces of 64 tokens)."""
    windowed = ltmdsl.loads(DENSE.replace("rope_theta = 10000)", "rope_theta = 10000, window = 64)"))
    plan = dict(cp=2, gpus=2, recompute="none")
    glob = measure(dense.model, _budget(dense, "train"), **plan)
    win = measure(windowed.model, _budget(windowed, "train"), **plan)
    assert win.measured["activations"] == win.predicted["activations"], win.to_text()
    assert win.measured["activations"] < glob.measured["activations"]


def test_counting_saved_tensors_skips_what_the_function_freed():
    """A storage saved by a graph that fn frees before returning (a chunk recomputed inside an op) is not
    among what fn keeps."""
    import torch

    from ltmdsl.measure.train import saved_bytes

    def fn(a):
        inner = (a * 2).exp()  # exp saves its output, freed with `inner`
        del inner
        return (a * 3).exp().sum()  # this one is kept: 4 * 8 fp32

    x = torch.ones(4, 8, requires_grad=True)
    kept, y = saved_bytes(fn, x)
    assert kept == 4 * 8 * 4


def test_a_cache_dtype_the_runtime_does_not_allocate_is_refused_by_name(dense):
    with pytest.raises(NotTraceable, match="no fp8_e4m3 recurrent state"):
        measure(dense.model, _budget(dense, "serve"), state_dtype="fp8_e4m3")


FP8_KV = {  # a long context on one sequence, so that the attention's workspace (not the MLP's) is the largest
    "global": (WIDE, dict(batch=1, context=32768, chunk=256)),
    "global-batch-2": (WIDE, dict(batch=2, context=16384, chunk=128)),
}


DECODE_STEPS = {  # a chunk so short that the decode step's workspace is the largest
    "fp8-batch-1": dict(batch=1, context=32768, chunk=16, kv_dtype="fp8_e4m3"),
    "fp8-batch-2": dict(batch=2, context=16384, chunk=16, kv_dtype="fp8_e4m3"),
    "bf16-batch-2": dict(batch=2, context=16384, chunk=16),
}


@pytest.mark.parametrize("overrides", DECODE_STEPS.values(), ids=DECODE_STEPS.keys())
def test_decode_step_copies_the_cached_keys_only_for_several_sequences(overrides):
    """The decode einsum over [b, S, Hkv, D] keys copies them contiguous only when its [b, Hkv] batch is not one
    stride apart (b > 1 and Hkv > 1); for one sequence it reads the cache (or its read-back) as it is
    (Nemotron-H-8B at 1M tokens, fp8 KV, batch 1: the copy over-predicted its activations by 28%)."""
    spec = ltmdsl.loads(WIDE)
    m = measure(spec.model, _budget(spec, "serve"), **overrides)
    assert m.peak_phase == "decode", m.to_text()
    assert abs(m.relative["activations"]) <= ACTIVATIONS_TOL, m.to_text()


@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("case", FP8_KV, ids=FP8_KV)
def test_fp8_kv_cache_traces_exactly_and_its_read_back_is_counted(case, kv_dtype):
    """The runtime keeps keys and values in fp8 and reads them back whole in the compute dtype for a chunk's
    attention (runtime/kinds/attention.py); the attention's workspace facet counts that temporary."""
    text, overrides = FP8_KV[case]
    spec = ltmdsl.loads(text)
    m = measure(spec.model, _budget(spec, "serve"), kv_dtype=kv_dtype, **overrides)
    bf16 = measure(spec.model, _budget(spec, "serve"), **overrides)
    assert m.measured["kv_cache"] == m.predicted["kv_cache"] == bf16.measured["kv_cache"] // 2
    read_back = 2 * overrides["batch"] * overrides["context"] * 2 * (128 + 128)  # bf16 bytes, b, T, Hkv, D + Dv
    assert m.predicted["activations"] - bf16.predicted["activations"] == read_back
    assert abs(m.relative["activations"]) <= ACTIVATIONS_TOL, m.to_text()
    assert abs(m.peak_relative) <= INFERENCE_PEAK_TOL, m.to_text()


SHARED_BLOCKS = """
model zamba_like {
    vocab = 256
    d_model = 64
    dtype = bf16
    norm = rmsnorm(eps = 1e-5)
    head = tied
    layer ssm = mamba2(d_state = 16, head_dim = 16, expand = 2, chunk = 32)
    layer sattn = attention(heads = 4, head_dim = 32, rope_theta = none)
    layer smlp = mlp(d_ff = 256, act = geglu)
    layer tf = transformer_block(attn = sattn, ffn = smlp, adapter_rank = 8, attn_adapters = false,
                                 input = concat_embed, into = next_input)
    shared block z0 { tf }
    shared block z1 { tf }
    stack { ssm z0 ssm z1 ssm z0 ssm }
}
"""
SHARED_STEPS = {
    "inference": dict(mode="inference", context=256, batch=2, chunk=128),
    "training": dict(mode="training", context=128, batch=2, recompute="none"),
}


@pytest.mark.parametrize("step", SHARED_STEPS.values(), ids=SHARED_STEPS.keys())
def test_shared_blocks_used_in_turn_trace_like_zamba2(step):
    """Zamba2's shape: two shared transformer blocks used in turn (z0 twice: its weights once, its adapters,
    out_proj and KV cache per use), reading cat[h, embeddings] and sending their output into the next input.
    Every forward runs inside one traced module call, so MemTracker follows the repeated modules: the held
    components exactly as predicted (the shared weights counted once); activations within 5% (in inference the
    embeddings held through the stack, in training the 2d-wide pre-norm of the block's sub-layers, counted)."""
    spec = ltmdsl.loads(SHARED_BLOCKS)
    m = measure(spec.model, None, **step)
    for component in m.predicted:
        if component not in ("activations", "temporaries"):
            assert m.measured[component] == m.predicted[component], (component, m.to_text())
    assert abs(m.relative["activations"]) <= ACTIVATIONS_TOL, m.to_text()


REAL = {"training": "train", "inference": "serve"}


@pytest.mark.parametrize("budget", REAL.values(), ids=REAL.keys())
def test_a_real_run_tracks_what_the_fake_trace_tracks(dense, budget):
    """`device=` runs the same step on real (uninitialised) tensors, as a GPU run does with its allocator's
    peak beside: on the CPU every tracked component and the peak equal the fake trace's, to the byte."""
    fake = measure(dense.model, _budget(dense, budget))
    real = measure(dense.model, _budget(dense, budget), device="cpu")
    assert (real.device, fake.device) == ("cpu", "fake")
    assert real.measured == fake.measured
    assert real.peak_bytes == fake.peak_bytes
    assert real.allocated_peak is None  # the CUDA allocator's peak only on a CUDA device
    assert "run on cpu" in real.to_text()


def test_a_real_run_refuses_a_plan_that_needs_its_process_group(dense):
    with pytest.raises(NotTraceable, match="one GPU's plan"):
        measure(dense.model, _budget(dense, "train"), zero=3, gpus=4, device="cpu")


def test_device_needs_measure_and_a_present_device(tmp_path, capsys):
    spec = tmp_path / "dense.ltm"
    spec.write_text(DENSE)
    assert main(["memory", str(spec), "--device", "cpu"]) == 2
    assert "give --measure too" in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():
        assert main(["memory", str(spec), "--measure", "--device", "cuda"]) == 2
        assert "no CUDA device here" in capsys.readouterr().err
    assert main(["memory", str(spec), "--measure", "--device", "cpu", "--budget", "serve", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["device"] == "cpu" and out["measured"]["kv_cache"] == out["predicted"]["kv_cache"]


def test_multi_token_prediction_modules_are_traced_as_held_weights(dense):
    """DeepSeek-V3's MTP modules (`mtp = mtp(...)`): the memory model holds them beside the head, and the traced
    rank now does too (they were built but not tracked: deepseek-v3 at 128Ki traced 'differ', -1.66% peak)."""
    text = DENSE.replace("    stack {", "    mtp = mtp(depth = 1, mixer = attn, ffn = ffn)\n    stack {")
    spec = ltmdsl.loads(text)
    plain = measure(dense.model, _budget(dense, "serve"))
    m = measure(spec.model, _budget(spec, "serve"))
    assert m.measured["weights"] == m.predicted["weights"]
    assert m.measured["weights"] - plain.measured["weights"] == spec.model.params_mtp * 2  # bf16
