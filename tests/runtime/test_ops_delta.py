"""The gated delta rule (runtime/ops_delta.py): chunked WY form and one-token step against the token-loop
oracle, for both decays (Gated DeltaNet's per-head scalar, KDA's per-channel), and against transformers'
own functions (qwen3_next's gated delta rule, kimi_linear's KDA).

Tolerances: fp64 comparisons 1e-10 (same math, different association); fp32 vs the fp64 oracle 1e-4;
transformers 1e-6 (its functions cast every input to fp32 internally: the gap measured ~2e-7 is that cast).
Inputs are seeded random, lengths odd (1, 63, 65, 127), log-decays well conditioned
(g = -softplus(randn) / 2, per-token decays in about [0.2, 1)), beta = sigmoid(randn).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, rel_err

from ltmdsl.runtime import ops_delta
from ltmdsl.runtime.ops_delta import gated_delta_chunked, gated_delta_reference, gated_delta_step

F64 = torch.float64
DK, DV = 8, 6

DECAYS = ["gdn", "kda"]  # per-head scalar g [B,T,Hv]; per-channel g [B,T,Hv,Dk]
HEADS = [(2, 2), (2, 4), (1, 4)]  # (Hk, Hv)
HEAD_IDS = ["hv=hk", "gva2", "gva4"]


def make_inputs(B: int, T: int, Hk: int, Hv: int, decay: str, *, seed: int, dtype=F64):
    """Seeded q, k [B,T,Hk,Dk], v [B,T,Hv,Dv], g (log-decay <= 0), beta in (0, 1), and a start state."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    q, k, v = randn(B, T, Hk, DK), randn(B, T, Hk, DK), randn(B, T, Hv, DV)
    g = -F.softplus(randn(B, T, Hv, DK) if decay == "kda" else randn(B, T, Hv)) / 2
    beta = torch.sigmoid(randn(B, T, Hv))
    state = randn(B, Hv, DK, DV)
    return [t.to(dtype) for t in (q, k, v, g, beta)], state.to(dtype)


def run_steps(args, state, *, l2norm=True, scale=None):
    """Feed tokens one at a time through gated_delta_step; returns the outputs [B,T,Hv,Dv] (state in place)."""
    q, k, v, g, beta = args
    outs = [
        gated_delta_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state, l2norm=l2norm, scale=scale)
        for t in range(q.shape[1])
    ]
    return torch.stack(outs, dim=1)


def sliced(args, lo, hi):
    return [t[:, lo:hi] for t in args]


# ---- chunked form vs the token loop ----------------------------------------------------------


@pytest.mark.parametrize("T", [1, 63, 65, 127])
@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("Hk,Hv", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("init", [False, True], ids=["zero-state", "given-state"])
def test_chunked_matches_token_loop(T, decay, Hk, Hv, init):
    args, s0 = make_inputs(2, T, Hk, Hv, decay, seed=T + 7 * Hv)
    start = s0 if init else None
    o, s = gated_delta_chunked(*args, chunk=16, state=start, l2norm=True, scale=None)
    ro, rs = gated_delta_reference(*args, state=start, l2norm=True, scale=None)
    assert o.shape == (2, T, Hv, DV) and s.shape == (2, Hv, DK, DV)
    assert_close(o, ro, 1e-10, "chunked output")
    assert_close(s, rs, 1e-10, "chunked final state")


@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("l2norm,scale", [(False, 0.3), (True, 1.0)], ids=["raw-qk-scale0.3", "l2norm-scale1"])
def test_chunked_matches_token_loop_without_l2norm_or_default_scale(decay, l2norm, scale):
    """The other settings of the two switches; unnormalised keys need beta |k|^2 < 2 to stay a contraction."""
    args, s0 = make_inputs(1, 65, 2, 4, decay, seed=3)
    if not l2norm:
        args[1] = args[1] / args[1].norm(dim=-1, keepdim=True) * 0.9  # |k| = 0.9
    o, s = gated_delta_chunked(*args, chunk=8, state=s0, l2norm=l2norm, scale=scale)
    ro, rs = gated_delta_reference(*args, state=s0, l2norm=l2norm, scale=scale)
    assert_close(o, ro, 1e-10, "output")
    assert_close(s, rs, 1e-10, "state")


@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("chunk", [1, 3, 7, 40, 64, 128], ids=lambda c: f"C{c}")
def test_chunk_sizes_agree(decay, chunk):
    """T = 65 is a multiple of none of these except 1; every chunk size gives chunk 16's result."""
    args, s0 = make_inputs(2, 65, 2, 4, decay, seed=11)
    o16, s16 = gated_delta_chunked(*args, chunk=16, state=s0, l2norm=True, scale=None)
    o, s = gated_delta_chunked(*args, chunk=chunk, state=s0, l2norm=True, scale=None)
    assert_close(o, o16, 1e-10, f"output, chunk {chunk} vs 16")
    assert_close(s, s16, 1e-10, f"state, chunk {chunk} vs 16")


@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("split", [1, 30, 64], ids=lambda a: f"at{a}")
def test_chunked_continues_from_its_own_state(decay, split):
    """Chunked prefill in two calls, the second starting from the first's state, equals one call."""
    args, s0 = make_inputs(2, 65, 1, 2, decay, seed=5)
    o, s = gated_delta_chunked(*args, chunk=16, state=s0, l2norm=True, scale=None)
    o1, s1 = gated_delta_chunked(*sliced(args, 0, split), chunk=16, state=s0, l2norm=True, scale=None)
    o2, s2 = gated_delta_chunked(*sliced(args, split, 65), chunk=16, state=s1, l2norm=True, scale=None)
    assert_close(torch.cat([o1, o2], dim=1), o, 1e-10, "output")
    assert_close(s2, s, 1e-10, "state")


@pytest.mark.parametrize("decay", DECAYS)
def test_chunked_survives_strong_decays(decay):
    """Log-decays of -100 on ~30% of tokens (over a chunk of 32: ~-1000, beyond exp(+-709)) beside ones near 0:
    the chunked form only exponentiates differences <= 0, so it stays finite and equal to the token loop."""
    args, s0 = make_inputs(2, 65, 2, 4, decay, seed=19)
    gen = torch.Generator().manual_seed(20)
    strong = torch.rand(args[3].shape, generator=gen, dtype=F64) < 0.3
    args[3] = torch.where(strong, -100.0, args[3] / 50)
    o, s = gated_delta_chunked(*args, chunk=32, state=s0, l2norm=True, scale=None)
    ro, rs = gated_delta_reference(*args, state=s0, l2norm=True, scale=None)
    assert_close(o, ro, 1e-10, "output")
    assert_close(s, rs, 1e-10, "state")


# ---- decode -------------------------------------------------------------------------------------


@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("Hk,Hv", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("k_steps", [1, 5])
def test_prefill_then_steps_equals_prefill(decay, Hk, Hv, k_steps):
    """prefill(T) == prefill(T - k) then k one-token steps: outputs and final state."""
    T = 63
    args, s0 = make_inputs(2, T, Hk, Hv, decay, seed=21 + Hv)
    o, s = gated_delta_chunked(*args, chunk=16, state=s0, l2norm=True, scale=None)
    o1, state = gated_delta_chunked(*sliced(args, 0, T - k_steps), chunk=16, state=s0, l2norm=True, scale=None)
    o2 = run_steps(sliced(args, T - k_steps, T), state)
    assert_close(torch.cat([o1, o2], dim=1), o, 1e-10, "outputs")
    assert_close(state, s, 1e-10, "final state")


@pytest.mark.parametrize("decay", DECAYS)
def test_step_updates_the_state_in_place_and_matches_the_oracle(decay):
    args, s0 = make_inputs(3, 9, 2, 4, decay, seed=8)
    state = s0.clone()
    ptr = state.data_ptr()
    o = run_steps(args, state)
    ro, rs = gated_delta_reference(*args, state=s0, l2norm=True, scale=None)
    assert state.data_ptr() == ptr
    assert_close(o, ro, 1e-10, "step outputs")
    assert_close(state, rs, 1e-10, "state after the steps")


# ---- batch, precision ---------------------------------------------------------------------------


@pytest.mark.parametrize("decay", DECAYS)
def test_batch_equals_per_sequence(decay):
    args, s0 = make_inputs(3, 33, 2, 4, decay, seed=13)
    o, s = gated_delta_chunked(*args, chunk=8, state=s0, l2norm=True, scale=None)
    for b in range(3):
        one = [t[b : b + 1] for t in args]
        ob, sb = gated_delta_chunked(*one, chunk=8, state=s0[b : b + 1], l2norm=True, scale=None)
        assert_close(o[b : b + 1], ob, 1e-12, f"output of sequence {b}")
        assert_close(s[b : b + 1], sb, 1e-12, f"state of sequence {b}")


@pytest.mark.parametrize("decay", DECAYS)
def test_fp32_vs_fp64_oracle(decay):
    args64, s64 = make_inputs(2, 127, 2, 4, decay, seed=17)
    args32, s32 = [t.float() for t in args64], s64.float()
    ro, rs = gated_delta_reference(*args64, state=s64, l2norm=True, scale=None)
    o, s = gated_delta_chunked(*args32, chunk=32, state=s32, l2norm=True, scale=None)
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    assert_close(o, ro, 1e-4, "fp32 chunked output")
    assert_close(s, rs, 1e-4, "fp32 chunked state")
    state = s32.clone()
    assert_close(run_steps(args32, state), ro, 1e-4, "fp32 step outputs")
    assert_close(state, rs, 1e-4, "fp32 step state")


@pytest.mark.parametrize("decay", DECAYS)
def test_chunked_gradients_match_the_token_loop(decay):
    """Training differentiates the chunked form: its gradients (inputs and start state) equal the oracle's,
    through both the exact diagonal blocks and the factored ones below them (chunk 20 > SUB = 16)."""
    args, s0 = make_inputs(1, 23, 1, 2, decay, seed=9)
    weights = make_inputs(1, 23, 1, 2, decay, seed=10)[0][2]  # a random cotangent for o

    def grads(fn, **kw):
        leaves = [t.clone().requires_grad_() for t in (*args, s0)]
        o, s = fn(*leaves[:5], state=leaves[5], l2norm=True, scale=None, **kw)
        ((o * weights).sum() + s.sum()).backward()
        return [t.grad for t in leaves]

    chunked, looped = grads(gated_delta_chunked, chunk=20), grads(gated_delta_reference)  # 2 chunks, > SUB rows
    for name, gc, gr in zip(["q", "k", "v", "g", "beta", "state"], chunked, looped):
        assert_close(gc, gr, 1e-10, f"d/d{name}")


# ---- the decay and the gate matter --------------------------------------------------------------


def test_two_tokens_by_hand():
    """Two tokens written out: S1 = a1 S0 + b1 k1 (v1 - a1 S0^T k1)^T, S2 likewise from S1, o_t = S_t^T q_t."""
    args, s0 = make_inputs(1, 2, 1, 1, "gdn", seed=2)
    q, k, v, g, beta = (t[0, :, 0] for t in args)  # q, k [2, Dk], v [2, Dv], g, beta [2]
    S = s0[0, 0]
    expected = []
    for t in range(2):
        S = g[t].exp() * S
        S = S + beta[t] * torch.outer(k[t], v[t] - S.T @ k[t])
        expected.append(S.T @ q[t])
    o, s = gated_delta_chunked(*args, chunk=2, state=s0, l2norm=False, scale=1.0)
    assert_close(o[0, :, 0], torch.stack(expected), 1e-12, "outputs")
    assert_close(s[0, 0], S, 1e-12, "state")


@pytest.mark.parametrize("decay", DECAYS)
def test_decay_and_beta_change_the_result(decay):
    """Dropping the decay (g = 0) or the gate (beta = 1) must change the output well beyond rounding,
    and the chunked form must follow the oracle in each variant."""
    args, s0 = make_inputs(2, 40, 2, 4, decay, seed=4)
    q, k, v, g, beta = args
    o, _ = gated_delta_chunked(*args, chunk=16, state=s0, l2norm=True, scale=None)
    variants = [("no decay", [q, k, v, torch.zeros_like(g), beta]), ("beta = 1", [q, k, v, g, torch.ones_like(beta)])]
    for name, variant in variants:
        ov, _ = gated_delta_chunked(*variant, chunk=16, state=s0, l2norm=True, scale=None)
        rv, _ = gated_delta_reference(*variant, state=s0, l2norm=True, scale=None)
        assert_close(ov, rv, 1e-10, name)
        assert rel_err(ov, o) > 0.05, f"{name}: output barely changed"


def test_per_channel_decay_equal_across_channels_is_the_scalar_decay():
    """KDA with g[..., c] the same for every c is Gated DeltaNet; a genuinely per-channel g is not."""
    args, s0 = make_inputs(2, 37, 2, 4, "gdn", seed=6)
    q, k, v, g, beta = args
    o, s = gated_delta_chunked(*args, chunk=8, state=s0, l2norm=True, scale=None)
    g_wide = g[..., None].expand(*g.shape, DK).contiguous()
    ow, sw = gated_delta_chunked(q, k, v, g_wide, beta, chunk=8, state=s0, l2norm=True, scale=None)
    assert_close(ow, o, 1e-12, "output")
    assert_close(sw, s, 1e-12, "state")
    ramp = torch.linspace(0.2, 1.8, DK, dtype=F64)  # same mean decay rate, spread over the channels
    op, _ = gated_delta_chunked(q, k, v, g_wide * ramp, beta, chunk=8, state=s0, l2norm=True, scale=None)
    assert rel_err(op, o) > 0.05


# ---- against transformers ------------------------------------------------------------------------


@pytest.mark.parametrize("Hk,Hv", [(2, 2), (2, 4)], ids=["hv=hk", "gva2"])
@pytest.mark.parametrize("T", [1, 65])
def test_gated_deltanet_matches_transformers(Hk, Hv, T):
    qwen3_next = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    args, s0 = make_inputs(2, T, Hk, Hv, "gdn", seed=30 + T)
    o, s = gated_delta_chunked(*args, chunk=16, state=s0, l2norm=True, scale=None)
    kw = dict(initial_state=s0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    ho, hs = qwen3_next.torch_chunk_gated_delta_rule(*args, chunk_size=16, **kw)
    assert_close(o, ho, 1e-6, "vs torch_chunk_gated_delta_rule: output")
    assert_close(s, hs, 1e-6, "vs torch_chunk_gated_delta_rule: state")
    ro, rs = qwen3_next.torch_recurrent_gated_delta_rule(*args, **kw)
    state = s0.clone()
    assert_close(run_steps(args, state), ro, 1e-6, "vs torch_recurrent_gated_delta_rule: output")
    assert_close(state, rs, 1e-6, "vs torch_recurrent_gated_delta_rule: state")


@pytest.mark.parametrize("T", [1, 65])
def test_kda_matches_transformers(T):
    """Kimi-Linear's KDA has as many key heads as value heads; its decay is per key channel."""
    kimi = pytest.importorskip("transformers.models.kimi_linear.modeling_kimi_linear")
    args, s0 = make_inputs(2, T, 4, 4, "kda", seed=40 + T)
    o, s = gated_delta_chunked(*args, chunk=16, state=s0, l2norm=True, scale=None)
    kw = dict(initial_state=s0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    ho, hs = kimi.chunk_kimi_delta_attention(*args, chunk_size=16, **kw)
    assert_close(o, ho, 1e-6, "vs chunk_kimi_delta_attention: output")
    assert_close(s, hs, 1e-6, "vs chunk_kimi_delta_attention: state")
    ro, rs = kimi.recurrent_kimi_delta_attention(*args, **kw)
    state = s0.clone()
    assert_close(run_steps(args, state), ro, 1e-6, "vs recurrent_kimi_delta_attention: output")
    assert_close(state, rs, 1e-6, "vs recurrent_kimi_delta_attention: state")


# ---- bad shapes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: a.__setitem__(2, a[2][:, :, :3]), "multiple of key heads"),
        (lambda a: a.__setitem__(3, a[3][..., None]), r"g \(1, 5, 4, 1\)"),
        (lambda a: a.__setitem__(4, a[4][..., :1]), r"beta \(1, 5, 1\)"),
        (lambda a: a.__setitem__(1, a[1][..., :4]), r"k \(1, 5, 2, 4\)"),
    ],
    ids=["hv-not-multiple", "g-shape", "beta-shape", "k-shape"],
)
def test_bad_shapes_are_one_clear_error(change, message):
    args, _ = make_inputs(1, 5, 2, 4, "gdn", seed=1)
    change(args)
    with pytest.raises(ValueError, match=f"gated delta rule: .*{message}"):
        gated_delta_chunked(*args, chunk=4, state=None, l2norm=True, scale=None)
    with pytest.raises(ValueError, match="gated delta rule"):
        gated_delta_reference(*args, state=None, l2norm=True, scale=None)


def test_chunk_must_be_positive():
    args, _ = make_inputs(1, 5, 2, 4, "gdn", seed=1)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        gated_delta_chunked(*args, chunk=0, state=None, l2norm=True, scale=None)
