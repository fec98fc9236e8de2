"""The recurrent kinds' and MLA's context-parallel training forms, traced on one rank against the memory model.

Each kind's cp_forward keeps what its one-process form keeps (its scans' fp32 internals recomputed in backward,
Mamba-2's convention: `recompute` regions with the ranks' exchange of states outside them), and its `stored`
facet counts what the exchange must keep beyond that: the states entering the rank's pieces and chunks, the
gathered decays or transitions, the pieces' conv halos, MLA's keys and values over every earlier chunk. Until
then a rank of the two-sub-layer stack below (context 256, batch 2, cp 2, no recompute) traced Mamba-1 +85%,
RG-LRU +37%, mLSTM +24%, MLA +18%, Gated DeltaNet +8.4%, KDA +6.5% and Lightning +1.5% over the prediction.

Target (issue 14): training activations within 5%. Measured at the README's shape and here (context 128,
batch 1, to keep each trace to a second or two): within 0.01% for every kind and plan (the delta kinds'
remainder is 32 bytes a sub-layer).
"""

from __future__ import annotations

import pytest

from ltmdsl.measure import measure
from measure_cases import stack

ACTIVATIONS_TOL = 0.05  # issue 14's target for training activations

#: each kind's mixer in the stack (d_model 64): tiny-hybrid's shapes, chunks no longer than a cp piece
KINDS = {
    "mamba": "mamba(d_state = 16)",
    "rg_lru": "rg_lru(heads = 4)",
    "mlstm": "mlstm(heads = 4)",
    "mla": "mla(heads = 4, q_lora_rank = 32, kv_lora_rank = 16, qk_nope_head_dim = 8, qk_rope_head_dim = 8, "
           "v_head_dim = 16)",
    "gated_deltanet": "gated_deltanet(key_heads = 2, value_heads = 4, head_dim = 16, chunk = 32)",
    "kda": "kda(heads = 4, head_dim = 16, chunk = 32)",
    "lightning": "lightning(heads = 4, chunk = 32)",
}

#: one rank's plan and recompute policy: cp alone, and with tp, sequence parallelism and full recompute (selective
#: recompute drops nothing more from these kinds under flash attention: the same as none)
PLANS = {
    "cp2": dict(cp=2, gpus=2, recompute="none"),
    "tp2-cp2-sp-full": dict(cp=2, tp=2, gpus=4, sequence_parallel=True, recompute="full"),
}


@pytest.mark.parametrize("plan", PLANS, ids=PLANS)
@pytest.mark.parametrize("kind", KINDS, ids=KINDS)
def test_cp_rank_activations_within_5_percent(kind, plan):
    m = measure(stack(KINDS[kind]), None, mode="training", context=128, batch=1, **PLANS[plan])  # pieces of 32 tokens
    assert abs(m.relative["activations"]) <= ACTIVATIONS_TOL, m.to_text()


@pytest.mark.parametrize("recompute", ["none", "selective"])
def test_mla_without_flash_attention_under_cp_counts_each_pieces_scores(recompute):
    """The eager core's scores, fp32 softmax and mask over each piece's keys (cl x (k + 1)*cl), not s x T: the
    one-process count traced -19% at cp 2 without recompute, and +10% under selective (the keys and values over
    every earlier chunk uncounted); the peak (the last piece's score gradient) within 10%."""
    m = measure(stack(KINDS["mla"]), None, mode="training", context=128, batch=1, cp=2, gpus=2, recompute=recompute,
                flash_attention=False)
    assert abs(m.relative["activations"]) <= ACTIVATIONS_TOL, m.to_text()
    assert abs(m.peak_relative) <= 0.10, m.to_text()
