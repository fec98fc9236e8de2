"""The short_conv sub-layer (LFM2's gated short convolution) against its oracles, in float64.

- transformers' own Lfm2ShortConv with our weights (HF_TOL = 1e-6 relative; both fp64, so the error is
  rounding only), with and without biases;
- a hand-written token loop of y_t = C_t * sum_j w_j (B x)_{t-L+1+j} (1e-10 relative);
- the checks of tests/runtime/mixer_checks.py (prefill + steps, chunked prefill, batch, for both conv-tap
  layouts; gradients of the parallel form against the token-loop oracle) (1e-10 relative).
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from mixer_checks import (
    check_batch_is_per_sequence, check_chunked_prefill, check_gradients_match, check_prefill_then_steps,
)

from ltmdsl.kinds.short_conv import ShortConvConfig
from ltmdsl.runtime.kernels import REFERENCE_KERNELS, TORCH_KERNELS
from ltmdsl.runtime.kinds.short_conv import ShortConv

F64 = torch.float64
D = 16
HF_TOL = 1e-6
TOL = 1e-10


def layer(kernel=3, bias=False, kernels=TORCH_KERNELS, seed=0) -> ShortConv:
    m = ShortConv(ShortConvConfig(D, kernel, bias), D, 1e-5, kernels)
    m.init_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():  # move the biases off zero so the comparisons cover them
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return m.double().eval()


def hidden(B=2, T=19, seed=1) -> torch.Tensor:
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("kernel, bias", [(3, False), (4, True)], ids=["lfm2-L3", "L4-bias"])
def test_matches_transformers_lfm2_short_conv(kernel, bias):
    transformers = pytest.importorskip("transformers")
    from transformers.models.lfm2.modeling_lfm2 import Lfm2Config, Lfm2ShortConv

    ours = layer(kernel, bias)
    conf = Lfm2Config(hidden_size=D, conv_L_cache=kernel, conv_bias=bias, num_hidden_layers=1,
                      layer_types=["conv"], num_attention_heads=2, num_key_value_heads=2, vocab_size=8)
    hf = Lfm2ShortConv(conf, layer_idx=0).double().eval()
    hf.load_state_dict(ours.state_dict())
    x = hidden()
    with torch.no_grad():
        assert_close(ours(x), hf(x), HF_TOL, f"short_conv vs transformers {transformers.__version__}")


@pytest.mark.parametrize("kernels", [TORCH_KERNELS, REFERENCE_KERNELS], ids=["torch", "reference"])
def test_matches_token_loop(kernels):
    m = layer(kernel=3, bias=True, kernels=kernels)
    x = hidden(T=11)
    with torch.no_grad():
        Bg, Cg, xs = m.in_proj(x).chunk(3, dim=-1)
        bx = Bg * xs  # [B, T, D]
        w = m.conv.weight[:, 0]  # [D, L]
        L = w.shape[1]
        ys = []
        for t in range(x.shape[1]):
            acc = m.conv.bias.clone().expand(x.shape[0], D)
            for j in range(L):
                s = t - (L - 1) + j
                if s >= 0:
                    acc = acc + w[:, j] * bx[:, s]
            ys.append(Cg[:, t] * acc)
        ref = m.out_proj(torch.stack(ys, dim=1))
        assert_close(m(x), ref, TOL, "short_conv vs token loop")


@pytest.mark.parametrize("conv_taps", ["full", "minus_one"])
@pytest.mark.parametrize("kernel", [1, 3], ids=["L1", "L3"])
def test_cache_consistency(kernel, conv_taps):
    m = layer(kernel=kernel, bias=True)
    x = hidden(T=13)
    check_prefill_then_steps(m, x, k=4, conv_taps=conv_taps)
    check_prefill_then_steps(m, x, k=13, conv_taps=conv_taps)  # all steps, from the empty cache
    check_chunked_prefill(m, x, [1, 5, 2, 5], conv_taps=conv_taps)
    check_batch_is_per_sequence(m, hidden(B=3, T=7))


def test_gradients_match_token_loop_oracle():
    fast, slow = layer(bias=True), layer(bias=True, kernels=REFERENCE_KERNELS)
    check_gradients_match(fast, slow, hidden(T=9))
