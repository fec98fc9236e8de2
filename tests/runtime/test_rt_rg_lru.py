"""The rg_lru sub-layer (RecurrentGemma's recurrent block) against its oracles, in float64.

- transformers' own RecurrentGemmaRecurrentBlock with our weights, without and with its cache (prefill then
  one-token decoding). Its scan accumulates in `acc_dtype` (fp32 by default, even in a float64 module), so
  the comparison runs its `_rnn_scan` with acc_dtype float64: the same code, in the precision of the test
  (HF_TOL = 1e-6 relative);
- the token-loop oracle kernels (REFERENCE_KERNELS) against the chunked scan (1e-10 relative);
- the checks of tests/runtime/mixer_checks.py (prefill + steps, chunked prefill, batch; gradients of the
  parallel form against the token-loop oracle) (1e-10).
"""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import assert_close
from mixer_checks import (
    check_batch_is_per_sequence, check_chunked_prefill, check_gradients_match, check_prefill_then_steps,
)

from ltmdsl.kinds.rg_lru import RgLruConfig
from ltmdsl.runtime.kernels import REFERENCE_KERNELS, TORCH_KERNELS
from ltmdsl.runtime.kinds.rg_lru import RecurrentBlock

F64 = torch.float64
D = 16
HF_TOL = 1e-6
TOL = 1e-10


def layer(heads=2, width=D, d_conv=4, act="gelu_tanh", chunk=8, kernels=TORCH_KERNELS, seed=0) -> RecurrentBlock:
    m = RecurrentBlock(RgLruConfig(width, heads, d_conv, act, chunk), D, 1e-6, kernels)
    m.init_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():  # move the biases off zero so the comparisons cover them
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in m.named_parameters():
            if "bias" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return m.double().eval()


def hidden(B=2, T=30, seed=1) -> torch.Tensor:
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed), dtype=F64)


def hf_block(ours: RecurrentBlock):
    from transformers.models.recurrent_gemma.modeling_recurrent_gemma import (
        RecurrentGemmaConfig, RecurrentGemmaRecurrentBlock,
    )

    cfg = ours.cfg
    conf = RecurrentGemmaConfig(hidden_size=D, lru_width=cfg.width, num_attention_heads=cfg.heads,
                                conv1d_width=cfg.d_conv, num_hidden_layers=1, vocab_size=8, intermediate_size=8,
                                hidden_activation="gelu_pytorch_tanh")
    hf = RecurrentGemmaRecurrentBlock(conf, layer_idx=0).double().eval()
    hf.load_state_dict(ours.state_dict())
    hf.rg_lru._rnn_scan = functools.partial(type(hf.rg_lru)._rnn_scan, hf.rg_lru, acc_dtype=F64)
    return hf


@pytest.mark.parametrize("heads", [1, 4], ids=["one-block", "four-blocks"])
def test_matches_transformers_recurrent_block(heads):
    transformers = pytest.importorskip("transformers")
    ours = layer(heads=heads)
    hf = hf_block(ours)
    x = hidden()
    T = x.shape[1]
    with torch.no_grad():
        ref, _ = hf(x, position_ids=torch.arange(T)[None].expand(2, T), attention_mask=None, use_cache=False)
        assert_close(ours(x), ref, HF_TOL, f"rg_lru vs transformers {transformers.__version__}")


def test_matches_transformers_decoding_with_its_cache():
    """transformers' own cache path (prefill 20 tokens, then 10 single tokens) against ours (K-1 taps, as it keeps)."""
    pytest.importorskip("transformers")
    from mixer_checks import fresh_cache

    ours = layer(heads=2)
    hf = hf_block(ours)
    x = hidden()
    with torch.no_grad():
        refs = [hf(x[:, :20], position_ids=torch.arange(20)[None].expand(2, 20), attention_mask=None)[0]]
        for t in range(20, 30):
            refs.append(hf(x[:, t : t + 1], position_ids=torch.full((2, 1), t), attention_mask=None)[0])
        cache = fresh_cache(ours, 2, "minus_one")
        got = [ours(x[:, :20], cache, 0)] + [ours.step(x[:, t], cache, t)[:, None] for t in range(20, 30)]
        assert_close(torch.cat(got, dim=1), torch.cat(refs, dim=1), HF_TOL, "rg_lru decoding vs transformers")
        assert_close(cache.h, hf.rg_lru.recurrent_states, HF_TOL, "RG-LRU state vs transformers")


@pytest.mark.parametrize("act", ["gelu_tanh", "gelu"])
def test_chunked_scan_matches_token_loop(act):
    fast, slow = layer(act=act, chunk=5), layer(act=act, chunk=5, kernels=REFERENCE_KERNELS)
    x = hidden(T=23)
    with torch.no_grad():
        assert_close(fast(x), slow(x), TOL, "chunked scan vs token loop")


@pytest.mark.parametrize("conv_taps", ["full", "minus_one"])
@pytest.mark.parametrize("chunk", [4, 64], ids=["chunk4", "chunk64"])
def test_cache_consistency(chunk, conv_taps):
    m = layer(heads=4, chunk=chunk)
    x = hidden(T=15)
    check_prefill_then_steps(m, x, k=4, conv_taps=conv_taps)
    check_prefill_then_steps(m, x, k=15, conv_taps=conv_taps)  # position 0 (the reset) decoded as a step
    check_chunked_prefill(m, x, [1, 6, 3, 5], conv_taps=conv_taps)
    check_batch_is_per_sequence(m, hidden(B=3, T=9))


def test_gradients_match_token_loop_oracle():
    check_gradients_match(layer(chunk=4), layer(chunk=4, kernels=REFERENCE_KERNELS), hidden(T=11))
