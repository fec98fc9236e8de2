"""Lightning attention (runtime/ops_lightning.py): block form vs token loop, steps, and transformers' MiniMax.

Tolerances: fp64 op vs op 1e-10 (same math, different association); fp32 vs the fp64 oracle 1e-4;
against transformers' MiniMaxLightningAttention in fp64 1e-6 (relative max-abs error).
Inputs are seeded random, lengths odd (1, 63, 65, 127), slopes MiniMax's (decays in (0, 1)).
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, rel_err

from ltmdsl.runtime import ops_lightning as ol

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, g):
    return torch.randn(*shape, generator=g, dtype=F64)


def inputs(Bsz, T, H, D, Dv, g):
    """q, k, v as MiniMax feeds them (SiLU'd, so mostly positive), the slopes of layer 1 of 4."""
    q, k, v = (torch.nn.functional.silu(randn(Bsz, T, H, n, g=g)) for n in (D, D, Dv))
    return q, k, v, ol.minimax_slopes(H, 1, 4)


@pytest.mark.parametrize("T", [1, 63, 65, 127])
@pytest.mark.parametrize("chunk", [16, 5], ids=["chunk16", "chunk5"])
@pytest.mark.parametrize("init", [False, True], ids=["zero-state", "given-state"])
def test_blocks_match_token_loop(T, chunk, init):
    g = gen(T + chunk)
    q, k, v, s = inputs(2, T, 3, 4, 5, g)
    h0 = randn(2, 3, 4, 5, g=g) if init else None
    o, h = ol.lightning_attention(q, k, v, s, chunk=chunk, state=h0)
    o_ref, h_ref = ol.lightning_attention_reference(q, k, v, s, state=h0)
    assert o.shape == (2, T, 3, 5) and h.shape == (2, 3, 4, 5)
    assert_close(o, o_ref, 1e-10, "outputs")
    assert_close(h, h_ref, 1e-10, "final state")


@pytest.mark.parametrize("T,k", [(65, 1), (63, 4), (1, 1)], ids=["65-1", "63-4", "1-1"])
def test_prefill_then_steps_equals_prefill(T, k):
    g = gen(2)
    q, kk, v, s = inputs(2, T, 3, 4, 5, g)
    o_full, h_full = ol.lightning_attention(q, kk, v, s, chunk=16, state=None)
    o_head, state = ol.lightning_attention(q[:, : T - k], kk[:, : T - k], v[:, : T - k], s, chunk=16, state=None)
    steps = [ol.lightning_step(q[:, t], kk[:, t], v[:, t], s, state) for t in range(T - k, T)]
    assert_close(torch.cat([o_head, torch.stack(steps, dim=1)], dim=1), o_full, 1e-10, "outputs")
    assert_close(state, h_full, 1e-10, "state after steps")


def test_chunk_sizes_agree():
    """T = 127 is a multiple of none of these block lengths; 200 is longer than the sequence."""
    g = gen(3)
    q, k, v, s = inputs(2, 127, 3, 4, 5, g)
    o1, h1 = ol.lightning_attention(q, k, v, s, chunk=1, state=None)
    for chunk in (7, 32, 64, 200):
        o, h = ol.lightning_attention(q, k, v, s, chunk=chunk, state=None)
        assert_close(o, o1, 1e-10, f"outputs, chunk {chunk}")
        assert_close(h, h1, 1e-10, f"state, chunk {chunk}")


def test_batch_equals_per_sequence():
    g = gen(4)
    q, k, v, s = inputs(3, 65, 3, 4, 5, g)
    h0 = randn(3, 3, 4, 5, g=g)
    o, h = ol.lightning_attention(q, k, v, s, chunk=16, state=h0)
    for b in range(3):
        ob, hb = ol.lightning_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], s, chunk=16, state=h0[b : b + 1])
        assert_close(o[b : b + 1], ob, 1e-12, f"outputs of sequence {b}")
        assert_close(h[b : b + 1], hb, 1e-12, f"state of sequence {b}")


def test_fp32_vs_fp64_oracle():
    g = gen(5)
    q, k, v, s = inputs(2, 127, 3, 8, 8, g)
    o, h = ol.lightning_attention(q.float(), k.float(), v.float(), s.float(), chunk=32, state=None)
    o_ref, h_ref = ol.lightning_attention_reference(q, k, v, s, state=None)
    assert o.dtype == torch.float32
    assert_close(o, o_ref, 1e-4, "fp32 outputs")
    assert_close(h, h_ref, 1e-4, "fp32 state")


def _grads(fn, args):
    """Gradients of sum(w * fn(args)) for a fixed seeded weight w: one per floating input."""
    leaves = [a.clone().requires_grad_() for a in args]
    out = fn(*leaves)
    w = torch.randn(out.shape, generator=gen(99), dtype=out.dtype)
    (out * w).sum().backward()
    return [a.grad for a in leaves]


def test_gradients_match_token_loop():
    """Training differentiates the block form under autograd: its gradients equal the token loop's."""
    q, k, v, s = inputs(2, 21, 3, 4, 5, gen(10))
    ours = _grads(lambda *a: ol.lightning_attention(*a, chunk=8, state=None)[0], [q, k, v, s])
    ref = _grads(lambda *a: ol.lightning_attention_reference(*a, state=None)[0], [q, k, v, s])
    for name, a, e in zip("qkvs", ours, ref):
        assert_close(a, e, 1e-10, f"d/d{name}")


def test_decay_is_applied_per_head():
    """A single key/value at t = 0 seen from later queries: o_t = exp(-s_h t) (q_t . k_0) v_0 per head;
    the undecayed (slope 0) result must differ, so dropping the decay fails here."""
    g = gen(6)
    q, k, v, s = inputs(1, 40, 3, 4, 5, g)
    k[:, 1:] = 0
    o, _ = ol.lightning_attention(q, k, v, s, chunk=16, state=None)
    t = torch.arange(40, dtype=F64)
    expected = torch.exp(-s[None, :] * t[:, None])[None, :, :, None] * torch.einsum(
        "bthd,bhd,bhv->bthv", q, k[:, 0], v[:, 0]
    )
    assert_close(o, expected, 1e-12, "decayed single key")
    o_flat, _ = ol.lightning_attention(q, k, v, torch.zeros_like(s), chunk=16, state=None)
    assert rel_err(o_flat, o) > 0.5


def test_minimax_slopes_match_transformers():
    MiniMaxLightningAttention = _transformers_minimax().MiniMaxLightningAttention

    for layer in (0, 2, 5):
        cfg = _tiny_config(layers=6)
        mod = MiniMaxLightningAttention(cfg, layer)
        assert_close(ol.minimax_slopes(4, layer, 6), mod.slope_rate.reshape(-1), 1e-6, f"slopes of layer {layer}")


def _transformers_minimax():
    """transformers' MiniMax modelling module (skips where the installed transformers predates it)."""
    return pytest.importorskip("transformers.models.minimax.modeling_minimax")


def _tiny_config(layers=4):
    return _transformers_minimax().MiniMaxConfig(
        hidden_size=16, num_attention_heads=4, num_key_value_heads=4, head_dim=4, num_hidden_layers=layers,
        block_size=16, layer_types=["linear_attention"] * layers, intermediate_size=32, vocab_size=32,
    )


def _minimax_module(layer=1):
    torch.manual_seed(0)
    mod = _transformers_minimax().MiniMaxLightningAttention(_tiny_config(), layer).double()
    with torch.no_grad():
        mod.norm.weight.normal_(1.0, 0.2)  # not all ones, so the comparison sees the norm's weight
    return mod


def _our_layer(mod, x, state, steps=0):
    """MiniMax's lightning layer around our op, with the module's own weights and norm: SiLU(qkv), the op
    over the first T - steps tokens in blocks of 16 and the rest one step at a time, RMSNorm, sigmoid gate."""
    Bsz, T, _ = x.shape
    H, D = mod.num_attention_heads, mod.head_dim
    qkv = torch.nn.functional.silu(mod.qkv_proj(x)).reshape(Bsz, T, H, 3 * D)  # [B, T, H, 3D]
    q, k, v = qkv.split(D, dim=-1)
    s = ol.minimax_slopes(H, mod.layer_idx, mod.num_hidden_layers)
    o, state = ol.lightning_attention(q[:, : T - steps], k[:, : T - steps], v[:, : T - steps], s, chunk=16, state=state)
    tail = [ol.lightning_step(q[:, t], k[:, t], v[:, t], s, state) for t in range(T - steps, T)]
    o = torch.cat([o, *(y[:, None] for y in tail)], dim=1).reshape(Bsz, T, H * D)  # [B, T, H*D]
    o = mod.norm(o) * torch.sigmoid(mod.output_gate(x))
    return mod.out_proj(o), state


@pytest.mark.parametrize("T", [1, 37, 48], ids=["T1", "T37", "T48"])
def test_matches_transformers_minimax_prefill(T):
    """transformers' block path (block 16; 37 ends in a partial block) equals our op inside the same layer."""
    mod = _minimax_module()
    x = randn(2, T, 16, g=gen(7))
    with torch.no_grad():
        ref, ref_state = mod(x, position_embeddings=None, attention_mask=None)
        ours, state = _our_layer(mod, x, None)
    assert_close(ours, ref, 1e-6, "layer output")
    assert_close(state, ref_state, 1e-6, "state (K^T V)")


def test_matches_transformers_minimax_decode():
    """Prefill 21 tokens, then 5 decode steps through transformers' MiniMaxCache (its token-loop path)."""
    mod = _minimax_module(layer=2)
    x = randn(2, 26, 16, g=gen(8))
    cache = _transformers_minimax().MiniMaxCache()
    with torch.no_grad():
        refs = [mod(x[:, :21], position_embeddings=None, attention_mask=None, cache=cache)[0]]
        for t in range(21, 26):
            refs.append(mod(x[:, t : t + 1], position_embeddings=None, attention_mask=None, cache=cache)[0])
        ours, state = _our_layer(mod, x, None, steps=5)
    assert_close(ours, torch.cat(refs, dim=1), 1e-6, "prefill + decode outputs")
    assert_close(state, cache.get_linear_cache(2), 1e-6, "cached state")


def test_rejects_bad_chunk():
    g = gen(9)
    q, k, v, s = inputs(1, 3, 1, 2, 2, g)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        ol.lightning_attention(q, k, v, s, chunk=0, state=None)
