"""The mlstm sub-layer (xLSTM-7B's mLSTM layer) against its oracles, in float64.

- transformers' own xLSTMLayer (weight_mode "single", its native chunkwise / sequence / step kernels) with
  our weights, run with autocast_kernel_dtype and inference_state_dtype set to float64 past its config
  validator (which admits 16- and 32-bit types only: its precision choices for speed, not its maths), without and with a carried state, and one decoding step
  (HF_TOL = 1e-6 relative);
- the token-loop oracle kernels (REFERENCE_KERNELS) against the chunked form (1e-10 relative);
- the checks of tests/runtime/mixer_checks.py (prefill + steps, chunked prefill, batch; gradients of the
  parallel form against the token-loop oracle) (1e-10).
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from mixer_checks import (
    check_batch_is_per_sequence, check_chunked_prefill, check_gradients_match, check_prefill_then_steps, fresh_cache,
)

from ltmdsl.kinds.mlstm import MlstmConfig
from ltmdsl.runtime.kernels import REFERENCE_KERNELS, TORCH_KERNELS
from ltmdsl.runtime.kinds.mlstm import Mlstm

F64 = torch.float64
D = 32
HF_TOL = 1e-6
TOL = 1e-10


def config(heads=4, qk_dim=16, v_dim=32, soft_cap=15.0, bias=False, chunk=8) -> MlstmConfig:
    return MlstmConfig(heads, qk_dim, v_dim, soft_cap, bias, chunk, 1e-6, 1e-6)


def layer(cfg=None, kernels=TORCH_KERNELS, seed=0) -> Mlstm:
    m = Mlstm(cfg or config(), D, 1e-5, kernels)
    m.init_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():  # gates that both write and forget, and norm parameters off their init values
        g = torch.Generator().manual_seed(seed + 1)
        m.igate_preact.bias.copy_(torch.randn(m.cfg.heads, generator=g))
        m.fgate_preact.weight.mul_(20.0)  # pre-activations past the soft-cap
        for name, p in m.named_parameters():
            if "norm" in name or (name.endswith("bias") and "gate_preact" not in name):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return m.double().eval()


def hidden(B=2, T=37, seed=1) -> torch.Tensor:
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed), dtype=F64)


def hf_layer(ours: Mlstm, chunk: int):
    from transformers.models.xlstm.modeling_xlstm import xLSTMConfig, xLSTMLayer

    c = ours.cfg
    conf = xLSTMConfig(hidden_size=D, num_heads=c.heads, qk_dim_factor=c.qk_dim / D, v_dim_factor=c.v_dim / D,
                       use_bias=c.bias, chunk_size=chunk, mode="inference", eps=c.eps,
                       norm_eps=c.norm_eps, weight_mode="single", num_hidden_layers=1, vocab_size=8,
                       norm_reduction_force_float32=False)  # its norm in fp64 as well
    for name in ("autocast_kernel_dtype", "inference_state_dtype"):  # its validator admits 16/32-bit only
        object.__setattr__(conf, name, "float64")
    object.__setattr__(conf, "gate_soft_cap", c.soft_cap)  # None (uncapped) is its soft_cap's own no-op case
    hf = xLSTMLayer(conf).double().eval()
    hf.load_state_dict(ours.state_dict())
    return hf


@pytest.mark.parametrize("bias", [False, True], ids=["xlstm-7b", "bias"])
def test_matches_transformers_xlstm_layer(bias):
    transformers = pytest.importorskip("transformers")
    ours = layer(config(bias=bias))
    hf = hf_layer(ours, chunk=16)  # 37 tokens: two chunks of 16 and a 5-token sequence tail in transformers
    x = hidden()
    with torch.no_grad():
        ref, (C, n, m) = hf(x)
        cache = fresh_cache(ours, 2)
        assert_close(ours(x, cache, 0), ref, HF_TOL, f"mlstm vs transformers {transformers.__version__}")
        assert_close(cache.C, C, HF_TOL, "C vs transformers")
        assert_close(cache.n, n, HF_TOL, "n vs transformers")
        assert_close(cache.m, m[..., 0], HF_TOL, "m vs transformers")
        # one more token, from the carried state, through transformers' step kernel
        nxt = torch.randn(2, 1, D, generator=torch.Generator().manual_seed(9), dtype=F64)
        ref1, _ = hf(nxt, (C, n, m))
        assert_close(ours.step(nxt[:, 0], cache, 37)[:, None], ref1, HF_TOL, "mlstm step vs transformers")


def test_matches_transformers_without_soft_cap():
    pytest.importorskip("transformers")
    ours = layer(config(soft_cap=None))
    hf = hf_layer(ours, chunk=8)
    x = hidden(T=16)
    with torch.no_grad():
        assert_close(ours(x), hf(x)[0], HF_TOL, "uncapped mlstm vs transformers")


def test_chunked_form_matches_token_loop():
    cfg = config(chunk=5)
    fast, slow = layer(cfg), layer(cfg, kernels=REFERENCE_KERNELS)
    x = hidden(T=23)
    with torch.no_grad():
        assert_close(fast(x), slow(x), TOL, "chunked form vs token loop")


@pytest.mark.parametrize("chunk", [4, 7], ids=["chunk4", "chunk7"])
def test_cache_consistency(chunk):
    m = layer(config(chunk=chunk))
    x = hidden(T=17)
    check_prefill_then_steps(m, x, k=5)
    check_prefill_then_steps(m, x, k=17)
    check_chunked_prefill(m, x, [3, 8, 1, 5])
    check_batch_is_per_sequence(m, hidden(B=3, T=9))


def test_gradients_match_token_loop_oracle():
    cfg = config(chunk=4)
    check_gradients_match(layer(cfg), layer(cfg, kernels=REFERENCE_KERNELS), hidden(T=11))
