"""The recurrent kinds' backward facets, derived from their chunk steps, against the traced training peak.

Each kind's `backward` facet counts one chunk re-run and differentiated (ltmdsl/kinds/mlstm.py, ltmdsl/kinds/rg_lru.py,
ltmdsl/kinds/mamba.py, ltmdsl/kinds/mamba2.py, and ltmdsl/kinds/gated_deltanet.py `delta_backward` for KDA and Gated
DeltaNet), under context parallelism over the rank's rows (b times its pieces), not its tokens. Until these
conventions a two-sub-layer stack's rank traced its peak over the per-GPU total by +18.6% (mLSTM, cp 2, no recompute)
and +30.7% (full recompute) at context 256, batch 2, chunk 64; KDA's by +8.0% / +14.9% / +14.6% at chunk 16 / 32 / 64
(cp 2, context 256) with a fitted chunk term; Gated DeltaNet's by +15.3% (cp 2, Dk 24, Dv 16, b = 2) with a counted
one, and its cp activations +4.7% (b = 1); Mamba-2's by +49.9% (cp 2, one 64-token chunk a piece, N 32, context 256,
batch 1; +57.8% under full recompute), and Mamba-1's 13.1% under it (cp 2, 32-token pieces: five scan levels counted
as six).

Tolerances: issue 14's targets, the traced peak within 10% of the per-GPU total and the activations within 5%.
Measured here: mLSTM -1.3% to -3.4%, KDA -3.8% to +0.2%, RG-LRU -3.7% to -1.1%, Gated DeltaNet -2.9% to +0.4%,
Mamba-1 -0.8% to -2.1%, Mamba-2 -1.6% to +0.2% (peaks; activations within 0.22%), on shapes other than those the
terms were read off (mLSTM qk_dim 32 and v_dim 96 here, read off at 32 / 64 and 64 / 128; KDA 2 heads of 32 here,
read off at 4 heads of 16; RG-LRU widths 96 and 64 here, read off at 128; Gated DeltaNet 2 heads of 32 and 2 key
heads of 24 with 4 value heads of 16 here, read off at 2 key heads of 16 with 4 value heads of 24; Mamba-1 (N,
context) (8, 256), (32, 128) and (1, 512) here, read off at (16, 256), (16, 128) at cp 2, (4, 1024) and (1, 2048);
Mamba-2 (N, P, chunk) (48, 16, 64), (16, 32, 16) and (32, 8, 32) without the norm here, read off at (16, 16, 32),
(24, 8, 32) and (32, 16, 64) at cp 2, context 256 / 128 / 256).
"""

from __future__ import annotations

import pytest

from ltmdsl.measure import measure
from tests.measure.test_training_peak import stack

PEAK_TOL = 0.10  # issue 14's target for the traced peak against the predicted per-GPU total
ACTIVATIONS_TOL = 0.05  # issue 14's target for training activations

#: one rank's plan: one process, cp 2 (two balanced pieces of the rank folded into the batch), tp 2 x cp 2 x sp
PLANS = {"one": {}, "cp2": dict(cp=2, gpus=2), "tp2-cp2-sp": dict(cp=2, tp=2, gpus=4, sequence_parallel=True)}

#: (mixer, context, batch, plan, recompute); mLSTM's README shape (chunk 64 = a cp piece), with and without recompute
MLSTM = {f"c{chunk}-{plan}-{policy}": (f"mlstm(heads = 4, qk_dim = 32, v_dim = 96, chunk = {chunk})", ctx, batch,
                                       plan, policy)
         for chunk, ctx, batch, plan, policy in [
             (64, 256, 2, "cp2", "none"), (64, 256, 2, "cp2", "full"), (64, 256, 2, "tp2-cp2-sp", "full"),
             (32, 128, 1, "one", "full"), (16, 128, 1, "cp2", "selective")]}

#: KDA at chunk 16, 32 and 64 (a cp piece is 64 tokens at context 256)
KDA = {f"c{chunk}-{plan}": (f"kda(heads = 2, head_dim = 32, chunk = {chunk})", 256, 1, plan, "none")
       for chunk, plan in [(16, "one"), (32, "cp2"), (64, "cp2"), (32, "tp2-cp2-sp")]}

#: RG-LRU at width 96 (2 gate blocks: one a rank under tp 2) and at d_model's width 64 (4 blocks, b = 2)
RG_LRU = {f"w{width}-c{chunk}-{plan}-{policy}": (f"rg_lru(heads = {heads}, width = {width}, chunk = {chunk})", ctx,
                                                 batch, plan, policy)
          for width, heads, chunk, ctx, batch, plan, policy in [
              (96, 2, 32, 256, 1, "one", "none"), (96, 2, 32, 256, 1, "cp2", "full"),
              (96, 2, 32, 256, 1, "tp2-cp2-sp", "selective"), (64, 4, 8, 128, 2, "one", "full"),
              (64, 4, 8, 128, 2, "cp2", "none")]}

#: Gated DeltaNet at chunk 16, 32 and 64 (2 heads of 32), and with keys wider than values (Dk 24, Dv 16, b = 2)
GATED_DELTANET = {f"c{chunk}-{plan}-{policy}": (f"gated_deltanet(key_heads = 2, head_dim = 32, chunk = {chunk})", 256,
                                                1, plan, policy)
                  for chunk, plan, policy in [(16, "one", "none"), (32, "cp2", "none"), (64, "cp2", "none"),
                                              (32, "tp2-cp2-sp", "full")]} | {
    "dk24-dv16-cp2-none": ("gated_deltanet(key_heads = 2, value_heads = 4, head_dim = 24, v_head_dim = 16, chunk = 32)",
                           128, 2, "cp2", "none")}

#: Mamba-1: one process (L = 64, six scan levels), cp 2 with pieces of 32 tokens (five levels; the fitted facet
#: traced 13% under the prediction here), tp 2 x cp 2 x sp, and a one-state scan over 512 tokens, where the
#: gate's moment is larger than the chunk's
MAMBA = {f"n{n}-{plan}-{policy}": (f"mamba(d_state = {n}, expand = {expand})", ctx, batch, plan, policy)
         for n, expand, ctx, batch, plan, policy in [
             (8, 2, 256, 2, "one", "none"), (32, 1, 128, 1, "cp2", "selective"), (8, 2, 256, 1, "tp2-cp2-sp", "full"),
             (1, 2, 512, 1, "one", "none")]}

#: Mamba-2: cp 2 with one 64-token chunk a piece (the chunk's moment the larger; the fitted facet, the norm's
#: moment alone, traced +50%), one process at chunk 16 (the norm's), tp 2 x cp 2 x sp with one group over two
#: ranks (the norm's sum of squares over the ranks), and without the gated norm
MAMBA2 = {f"{name}-{plan}-{policy}": (f"mamba2(d_state = {n}, head_dim = {p}, n_groups = {g}, chunk = {chunk}{extra})",
                                       ctx, batch, plan, policy)
          for name, n, p, g, chunk, extra, ctx, batch, plan, policy in [
              ("c64", 48, 16, 2, 64, "", 256, 1, "cp2", "none"),
              ("c64", 48, 16, 2, 64, "", 256, 1, "tp2-cp2-sp", "full"),
              ("c16", 16, 32, 1, 16, "", 128, 2, "one", "selective"),
              ("c16", 16, 32, 1, 16, "", 128, 2, "tp2-cp2-sp", "none"),
              ("c32-no-norm", 32, 8, 1, 32, ", gated_norm = false", 256, 1, "one", "none")]}

CASES = ({f"mlstm-{k}": v for k, v in MLSTM.items()} | {f"kda-{k}": v for k, v in KDA.items()}
         | {f"rg_lru-{k}": v for k, v in RG_LRU.items()} | {f"gated_deltanet-{k}": v for k, v in GATED_DELTANET.items()}
         | {f"mamba-{k}": v for k, v in MAMBA.items()} | {f"mamba2-{k}": v for k, v in MAMBA2.items()})


@pytest.mark.parametrize("case", CASES, ids=CASES)
def test_recurrent_backward_peak_within_10_percent(case):
    mixer, context, batch, plan, policy = CASES[case]
    m = measure(stack(mixer), None, mode="training", context=context, batch=batch, recompute=policy, **PLANS[plan])
    assert abs(m.relative["activations"]) <= ACTIVATIONS_TOL, m.to_text()
    assert abs(m.peak_relative) <= PEAK_TOL, m.to_text()
    assert m.peak_phase.endswith("backward"), m.to_text()
