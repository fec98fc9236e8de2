"""The lightning sub-layer (MiniMax-01's lightning attention) against its oracles, in float64.

- transformers' own MiniMaxLightningAttention with our weights, built with float64 buffers (its slopes and
  decay tables), at several depths of a 4-layer stack and a block length different from ours
  (HF_TOL = 1e-6 relative; ~1e-7 is seen, since MiniMaxRMSNorm normalises in fp32 even in a float64 module);
- the token-loop oracle kernels (REFERENCE_KERNELS) against the block form (1e-10 relative);
- the checks of tests/runtime/mixer_checks.py (prefill + steps, chunked prefill, batch; gradients of the
  parallel form against the token-loop oracle) (1e-10);
- the model passes each sub-layer its place among the stack's mixers, so the slopes follow the depth.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from mixer_checks import (
    check_batch_is_per_sequence, check_chunked_prefill, check_gradients_match, check_prefill_then_steps,
)

import ltmdsl
from ltmdsl.kinds.lightning import LightningConfig
from ltmdsl.runtime.build import build
from ltmdsl.runtime.kernels import REFERENCE_KERNELS, TORCH_KERNELS
from ltmdsl.runtime.kinds import LayerPlace, layer_places
from ltmdsl.runtime.kinds.lightning import Lightning
from ltmdsl.runtime.ops_lightning import minimax_slopes

F64 = torch.float64
D = 24
HF_TOL = 1e-6
TOL = 1e-10


def config(heads=3, head_dim=8, act="silu", chunk=8, gate=True, depth_decay=True) -> LightningConfig:
    return LightningConfig(heads, head_dim, act, chunk, gate, 1e-6, depth_decay)


def layer(cfg=None, place=LayerPlace(1, 4), kernels=TORCH_KERNELS, seed=0) -> Lightning:
    m = Lightning(cfg or config(), D, 1e-5, kernels, place=place)
    m.init_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():  # move the norm weight off one so the comparison covers it
        m.norm.weight.add_(0.1 * torch.randn(m.norm.weight.shape, generator=torch.Generator().manual_seed(seed + 1)))
    return m.double().eval()


def hidden(B=2, T=40, seed=1) -> torch.Tensor:
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("depth", [0, 2, 3], ids=["first", "middle", "last"])
def test_matches_transformers_minimax_lightning_attention(depth):
    transformers = pytest.importorskip("transformers")
    from transformers.models.minimax.modeling_minimax import MiniMaxConfig, MiniMaxLightningAttention

    cfg = config(heads=3, head_dim=8)
    ours = layer(cfg, LayerPlace(depth, 4))
    conf = MiniMaxConfig(hidden_size=D, num_attention_heads=3, num_key_value_heads=3, head_dim=8, num_hidden_layers=4,
                         block_size=16, layer_types=["linear_attention"] * 4, vocab_size=8, intermediate_size=8,
                         num_local_experts=2, num_experts_per_tok=1)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(F64)  # MiniMax's slope and decay buffers computed in float64
    try:
        hf = MiniMaxLightningAttention(conf, layer_idx=depth).eval()
    finally:
        torch.set_default_dtype(previous)
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and set(missing) == {"slope_rate", "query_decay", "key_decay", "diagonal_decay"}
    assert_close(ours.slopes, hf.slope_rate.flatten(), 1e-15, "slopes")
    x = hidden()
    with torch.no_grad():
        ref, _ = hf(x, position_embeddings=None, attention_mask=None)
        assert_close(ours(x), ref, HF_TOL, f"lightning vs transformers {transformers.__version__}, layer {depth}")


@pytest.mark.parametrize("gate, depth_decay, act", [(True, True, "silu"), (False, False, "gelu")],
                         ids=["minimax", "plain-gelu"])
def test_block_form_matches_token_loop(gate, depth_decay, act):
    cfg = config(gate=gate, depth_decay=depth_decay, act=act, chunk=5)
    fast, slow = layer(cfg), layer(cfg, kernels=REFERENCE_KERNELS)
    x = hidden(T=23)
    with torch.no_grad():
        assert_close(fast(x), slow(x), TOL, "block form vs token loop")


def test_slopes_without_depth_decay_are_the_alibi_sequence():
    m = layer(config(heads=4, depth_decay=False), LayerPlace(3, 4))
    assert torch.equal(m.slopes, torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8], dtype=F64))


@pytest.mark.parametrize("chunk", [4, 7], ids=["block4", "block7"])
def test_cache_consistency(chunk):
    m = layer(config(chunk=chunk))
    x = hidden(T=17)
    check_prefill_then_steps(m, x, k=5)
    check_prefill_then_steps(m, x, k=17)
    check_chunked_prefill(m, x, [3, 8, 1, 5])
    check_batch_is_per_sequence(m, hidden(B=3, T=9))


def test_model_gives_each_layer_its_depth():
    spec = ltmdsl.loads("model m {\n vocab = 8\n d_model = 24\n layer lin = lightning(heads = 3)\n"
                       " layer f = mlp(d_ff = 8)\n stack { repeat 5 { lin f } }\n}\n")
    net = build(spec.model, init=False)
    got = [block.mixer.slopes for block in net.layers[0::2]]
    for depth, s in enumerate(got):
        assert torch.equal(s, minimax_slopes(3, depth, 5))
    net = net.to(torch.bfloat16)  # the slopes stay float64 whatever the weights are cast to
    assert net.layers[2].mixer.slopes.dtype == F64 and torch.equal(net.layers[2].mixer.slopes, got[1])


def test_gradients_match_token_loop_oracle():
    cfg = config(chunk=4)
    check_gradients_match(layer(cfg), layer(cfg, kernels=REFERENCE_KERNELS), hidden(T=11))


def test_layer_places_count_sequence_mixers_only():
    spec = ltmdsl.loads("model m {\n vocab = 8\n d_model = 24\n layer lin = lightning(heads = 3)\n"
                       " layer a = attention(heads = 3)\n layer f = mlp(d_ff = 8)\n stack { f lin f a lin f }\n}\n")
    places = layer_places(spec.model.layers)
    assert [(p.depth, p.depths) for p in places] == [(0, 3), (0, 3), (0, 3), (1, 3), (2, 3), (2, 3)]
    with pytest.raises(ValueError, match="outside a stack of 3 mixers"):
        LayerPlace(3, 3)


def _decode_error(state_dtype: torch.dtype, slope: float, steps: int = 500) -> float:
    """Relative error of `steps` one-token steps (fp32 work, the state stored in `state_dtype` after each
    token) against the float64 token loop, for one head of slope `slope`."""
    from ltmdsl.runtime.ops_lightning import lightning_attention_reference, lightning_step

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.rand(1, steps, 1, 16, generator=g, dtype=F64) for _ in range(3))  # [B, T, H, D]
    s = torch.tensor([slope], dtype=F64)
    ref, _ = lightning_attention_reference(q, k, v, s, state=None)  # [B, T, H, D]
    state = torch.zeros(1, 1, 16, 16, dtype=state_dtype)
    out = torch.stack([lightning_step(q[:, t].float(), k[:, t].float(), v[:, t].float(), s, state)
                       for t in range(steps)], dim=1)  # [B, T, H, D]
    from helpers import rel_err

    return rel_err(out, ref)


def test_a_bf16_state_loses_the_updates_of_slowly_decaying_heads():
    """Why the state is fp32: with a decay exp(-s) near 1, S sums about 1/s tokens, so one token adds about
    s|S|, under bf16's 2^-8 relative step for s < 2^-8. Rounding S to bf16 after every token then drops updates:
    after 500 tokens at s = 1e-4 the bf16 state is off by 7.5e-2 (3.1e-2 at s = 1e-3), the fp32 one by 5e-6."""
    assert _decode_error(torch.bfloat16, 1e-4) > 3e-2
    assert _decode_error(torch.float32, 1e-4) < 1e-5
    assert _decode_error(torch.bfloat16, 0.5) < 1e-2  # a fast decay keeps few tokens: bf16 rounding stays small


@pytest.mark.parametrize("requested, kept", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                             (torch.float32, torch.float32), (torch.float64, torch.float64)],
                         ids=["bf16", "fp16", "fp32", "fp64"])
def test_state_is_fp32_or_wider_and_the_memory_model_agrees(requested, kept):
    spec = ltmdsl.loads("""
model m {
    vocab = 32
    d_model = 24
    layer lit = lightning(heads = 3, chunk = 8)
    layer ffn = mlp(d_ff = 16)
    stack { lit ffn lit ffn }
}
""")
    model = build(spec.model, dtype=torch.float32, seed=0)
    cache = model.new_cache(batch_size=2, max_context=64, state_dtype=requested)
    assert {t.dtype for layer in cache.layers if layer is not None for t in layer.tensors()} == {kept}
    if requested != torch.float64:  # the memory model's dtypes stop at fp32
        from ltmdsl.memory.inference import cache_bytes
        from ltmdsl.units import dtype

        name = str(requested).removeprefix("torch.")
        predicted = cache_bytes(spec.model, batch=2, context=64, kv_dtype=dtype(name), state_dtype=dtype(name))
        assert cache.nbytes() == 2 * 2 * 3 * 8 * 8 * 4 == int(predicted["recurrent_state"])
