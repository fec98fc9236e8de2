"""Attention under context parallelism, both splits, and the contiguous split's recurrent terms, traced on one rank
(the last: its queries see every key) against the memory model.

The eager core (the explicit softmax, `flash = false`) scores each cp piece's L = T/chunks queries against the
(k + 1)*L keys up to its last token, not s x T: its probabilities, fp32 softmax, mask and repeated keys were
counted over s x T, -21% of a d_model 64 stack's activations at cp 2 (global or windowed), and under selective
recompute the gathered keys the recomputed calls read were not counted (+4% at cp 2, +12% at cp 4). With flash
attention the global masks are the pieces' (in blocks of `mask_rows` queries) and the pieces' outputs are kept
beside their concatenation (+0.9% balanced, +3.6% contiguous before). The eager backward holds 8 - a bytes a
score of one piece at a time: with max(4, a) over every piece, and every piece's core live again at once under
selective recompute, the traced peak at T = 1024 was +16.9% over the per-GPU total in one process, -51.4%
(selective) and -40.0% (full recompute) at cp 2.

Tolerances: activations 1% (the facets state every tensor the runtime keeps; traced +0.00% in every case here);
the peak within issue 14's 10% target (traced within 4.1%).
"""

from __future__ import annotations

import pytest

from ltmdsl.measure import measure
from measure_cases import stack as shared_stack

EXACT_TOL = 0.01
PEAK_TOL = 0.10  # issue 14's target for the traced peak against the predicted per-GPU total

MIXERS = {
    "global": "attention(heads = 4, kv_heads = 2, rope_theta = 10000)",
    "window": "attention(heads = 4, kv_heads = 2, rope_theta = 10000, window = 24)",
    "mha": "attention(heads = 4, rope_theta = 10000)",  # G = 1: the keys are not repeated, but still copied
    "mamba2": "mamba2(d_state = 16, head_dim = 16, n_groups = 1, expand = 2, d_conv = 4, chunk = 16)",
}


def stack(mixer: str):
    """The named mixer and a SwiGLU MLP, twice (d_model 64, bf16, vocabulary 256)."""
    return shared_stack(MIXERS[mixer])


def plan(cp: int, split: str, recompute: str, flash: bool, tp: int = 1) -> dict:
    """One rank's training settings; with tp > 1 under sequence parallelism."""
    extra = dict(tp=tp, sequence_parallel=True) if tp > 1 else {}
    return dict(mode="training", context=256, batch=2, cp=cp, gpus=cp * tp, cp_split=split, recompute=recompute,
                flash_attention=flash, **extra)


#: (mixer, cp, split, recompute, flash attention[, tp]): pieces of 64 tokens (32 under cp 4's balanced split)
CASES = {
    "eager-global-cp2-none": ("global", 2, "balanced", "none", False),
    "eager-global-cp2-selective": ("global", 2, "balanced", "selective", False),
    "eager-global-cp2-full": ("global", 2, "balanced", "full", False),
    "eager-global-cp4-selective": ("global", 4, "balanced", "selective", False),
    "eager-mha-cp2-none": ("mha", 2, "balanced", "none", False),
    "eager-window-cp2-none": ("window", 2, "balanced", "none", False),
    "eager-global-contiguous-cp2-none": ("global", 2, "contiguous", "none", False),
    "eager-global-contiguous-cp4-selective": ("global", 4, "contiguous", "selective", False),
    "eager-window-contiguous-cp2-full": ("window", 2, "contiguous", "full", False),
    "eager-global-tp2-cp2-sp-selective": ("global", 2, "balanced", "selective", False, 2),
    "eager-global-contiguous-tp2-cp2-sp-none": ("global", 2, "contiguous", "none", False, 2),
    "flash-global-cp2-none": ("global", 2, "balanced", "none", True),
    "flash-global-contiguous-cp2-none": ("global", 2, "contiguous", "none", True),
    "flash-global-contiguous-cp4-full": ("global", 4, "contiguous", "full", True),
    "flash-window-contiguous-cp2-none": ("window", 2, "contiguous", "none", True),
    "mamba2-contiguous-cp2-none": ("mamba2", 2, "contiguous", "none", True),
    "mamba2-contiguous-cp4-full": ("mamba2", 4, "contiguous", "full", True),
}


@pytest.mark.parametrize("case", CASES, ids=CASES)
def test_cp_rank_activations_and_peak_as_predicted(case):
    mixer, cp, split, recompute, flash, *tp = CASES[case]
    m = measure(stack(mixer), None, **plan(cp, split, recompute, flash, *tp))
    assert any(f"the {split} split: cp rank {cp - 1} of {cp}" in note for note in m.notes), m.notes
    for component in ("weights", "gradients", "optimizer", "logits"):
        assert m.measured[component] == m.predicted[component], component
    assert abs(m.relative["activations"]) <= EXACT_TOL, m.to_text()
    assert abs(m.peak_relative) <= PEAK_TOL, m.to_text()


#: where the eager core's backward is the step's peak (the score gradients outgrow the loss's at T = 1024)
BACKWARD = {"one-process-none": (1, "none"), "cp2-selective": (2, "selective"), "cp2-full": (2, "full")}


@pytest.mark.parametrize("case", BACKWARD, ids=BACKWARD)
def test_eager_backward_peak_is_one_pieces_score_gradients(case):
    cp, recompute = BACKWARD[case]
    overrides = dict(mode="training", context=1024, batch=2, recompute=recompute, flash_attention=False)
    if cp > 1:
        overrides.update(cp=cp, gpus=cp)
    m = measure(stack("global"), None, **overrides)
    assert abs(m.relative["activations"]) <= EXACT_TOL, m.to_text()
    assert m.peak_phase.endswith("backward"), m.peak_phase
    assert abs(m.peak_relative) <= PEAK_TOL, m.to_text()


@pytest.mark.parametrize("Tq, shift", [(64, 64), (64, 128), (512, 512), (300, 900), (1000, 37)],
                         ids=["one-call", "one-call-later-piece", "two-blocks", "partial-block", "short-shift"])
def test_causal_mask_elements_are_the_runtime_masks(Tq, shift, monkeypatch):
    """`causal_mask_elements` is the sum over the runtime's SDPA calls of their masks' elements for queries that
    start past key 0 (a cp piece): blocks of `mask_rows` queries, each against the keys up to its last query;
    the result equals the float64 one-mask reference (1e-10)."""
    from ltmdsl.kinds.attention import causal_mask_elements
    from ltmdsl.memory.symbols import compile_exact
    from measure_cases import runtime_masks

    masks = runtime_masks(monkeypatch, Tq, shift, None, seed=5)
    assert sum(m.numel() for m in masks) == compile_exact(causal_mask_elements(Tq, shift))(1, 1, 1)
