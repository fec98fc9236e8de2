"""The assembled model: parameter counts and names, the cache, and the end-to-end invariants (prefill(T) == prefill(T-k) + k steps, chunked == one-shot, batch == per-sequence) on the bundled examples (tiny-hybrid has every mixer kind; stream-hybrid is SSM + window),
on a Zamba-style spec with a shared block, LayerNorm, a tied head and GELU, and on a hybrid of the short
convolution, lightning attention (two depths), RG-LRU and mLSTM mixers.

    prefill(T) == prefill(T - k) + k one-token steps      (outputs and cache state)
    chunked prefill == one-shot prefill                     (outputs and cache state)
    batch of sequences == per-sequence loop
Tolerance 1e-4 relative (max-abs over max|ref|) in fp32; exact equalities for bytes and counts.
"""

from __future__ import annotations

import re
import sys

import pytest
import torch
from paths import EXAMPLES
from helpers import assert_close

import ltmdsl
from ltmdsl.runtime.build import build
from ltmdsl.runtime.kinds import runtime_kind
from ltmdsl.runtime.kinds.attention import KVCache
from ltmdsl.runtime.kinds.mamba import ConvSSMState

FP32_TOL = 1e-4

SHARED_SPEC = """
model zamba_like {
    vocab = 64
    d_model = 32
    dtype = fp32
    norm = layernorm(eps = 1e-5)
    head = tied
    layer a = attention(heads = 2, window = 8, qk_norm = true)
    layer m = mamba(d_state = 4, inner_norms = true)
    layer m2 = mamba2(d_state = 8, head_dim = 8, n_groups = 2, chunk = 8)
    layer f = mlp(d_ff = 64, act = gelu)
    shared block sb { a f }
    stack { m sb m2 sb }
}
"""

NEW_MIXERS_SPEC = """
model new_mixers {
    vocab = 64
    d_model = 32
    dtype = fp32
    norm = rmsnorm(eps = 1e-5)
    head = untied
    layer c = short_conv(kernel = 3, bias = true)
    layer l = lightning(heads = 2, chunk = 8)
    layer r = rg_lru(heads = 2, chunk = 8)
    layer x = mlstm(heads = 2, chunk = 8)
    layer a = attention(heads = 2, window = 8)
    layer f = mlp(d_ff = 48)
    stack { c f l f r f x f a f l f }
}
"""

SPECS = {
    "tiny-hybrid": EXAMPLES / "tiny-hybrid.ltm",
    "stream-hybrid": EXAMPLES / "stream-hybrid.ltm",
    "shared-block": SHARED_SPEC,
    "new-mixers": NEW_MIXERS_SPEC,
}


@pytest.fixture(scope="module", params=list(SPECS), ids=list(SPECS))
def model(request):
    spec = SPECS[request.param]
    loaded = ltmdsl.loads(spec) if isinstance(spec, str) else ltmdsl.load(spec)
    return build(loaded, dtype=torch.float32, seed=0).eval()


def tokens(model, B, T, seed=0):
    return torch.randint(0, model.ir.vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def cache_tensors(cache):
    return [t for e in cache.layers if e is not None for t in e.tensors()]


def assert_caches_close(a, b, what):
    assert a.seen == b.seen
    for i, (x, y) in enumerate(zip(cache_tensors(a), cache_tensors(b))):
        assert_close(x, y, FP32_TOL, f"{what}: cache tensor {i}")


# ---- structure ------------------------------------------------------------------------------


def test_parameter_count_and_bytes(model):
    ir = model.ir
    assert model.num_parameters() == ir.params_total
    from ltmdsl.memory import weights_bytes

    assert model.parameter_bytes() == weights_bytes(ir, "fp32") == ir.params_total * 4


def test_bf16_parameter_bytes():
    m = build(ltmdsl.load(SPECS["tiny-hybrid"]), dtype=torch.bfloat16)
    assert m.parameter_bytes() == m.ir.params_total * 2
    assert m(tokens(m, 1, 5)).dtype == torch.bfloat16


CONTRACT_NAMES = re.compile(
    r"^(embed\.weight|final_norm\.(weight|bias)|lm_head\.weight|layers\.\d+\.norm\.(weight|bias))$"
)
MIXER_NAME = re.compile(r"^layers\.(\d+)\.mixer\.(.+)$")
USE_NAME = re.compile(r"^uses\.(\d+)\.(.+)$")
CONTRACTS_DOC = (EXAMPLES.parent / "docs" / "CONTRACTS.md").read_text()


def test_parameter_names_follow_contract(model):
    """Model-level names are the contract's; each mixer's are exactly those its kind declares
    (`RuntimeKind.state_names`), and every declared module name is listed in docs/CONTRACTS.md."""
    names = [n for n, _ in model.named_parameters()]
    bad = []
    for n in names:
        mixer = MIXER_NAME.match(n)
        use = USE_NAME.match(n)
        if use is not None:  # a sub-layer's per-use parameters (transformer_block's adapters), `uses.{i}.*`
            layer = model.ir.layers[int(use.group(1))]
            declared = set(runtime_kind(layer.kind).new_use(layer.mixer, model.ir.d_model).state_dict())
            if use.group(2) not in declared or "uses.{i}." + use.group(2).split(".")[0] not in CONTRACTS_DOC:
                bad.append(n)
            continue
        if mixer is None:
            bad += [] if CONTRACT_NAMES.match(n) else [n]
            continue
        layer = model.ir.layers[int(mixer.group(1))]
        declared = runtime_kind(layer.kind).state_names(layer.mixer)
        module = mixer.group(2).split(".")[0]
        if mixer.group(2) not in declared or not re.search(rf"(mixer\.|[ /,]){re.escape(module)}\b", CONTRACTS_DOC):
            bad.append(n)
    assert not bad, f"names outside docs/CONTRACTS.md: {bad}"
    assert ("lm_head.weight" in names) == (not model.ir.tie_embeddings)


def test_shapes_follow_contract():
    m = build(ltmdsl.load(SPECS["tiny-hybrid"]))
    p = dict(m.named_parameters())
    ir = m.ir
    d = ir.d_model
    for i, layer in enumerate(ir.layers):
        c = layer.mixer
        pre = f"layers.{i}.mixer."
        if layer.kind == "mamba":
            assert p[pre + "conv1d.weight"].shape == (c.d_inner, 1, c.d_conv)
            assert p[pre + "A_log"].shape == (c.d_inner, c.d_state) and p[pre + "D"].shape == (c.d_inner,)
        if layer.kind == "mamba2":
            assert p[pre + "A_log"].shape == (c.heads,) and p[pre + "dt_bias"].shape == (c.heads,)
            assert p[pre + "norm.weight"].shape == (c.d_inner,)
        if layer.kind == "moe":
            assert p[pre + "router.weight"].shape == (c.experts, d)
            assert p[pre + "experts.gate_proj"].shape == (c.experts, c.d_ff, d)
            assert p[pre + "experts.down_proj"].shape == (c.experts, d, c.d_ff)


def test_shared_block_shares_modules_not_caches():
    m = build(ltmdsl.loads(SHARED_SPEC))
    assert m.layers[1] is m.layers[4] and m.layers[2] is m.layers[5]
    assert m.layers[0] is not m.layers[3]
    cache = m.new_cache(1, 16)
    assert cache.layers[1] is not cache.layers[4] and isinstance(cache.layers[4], KVCache)


def test_build_takes_ir_and_the_top_level_takes_paths():
    """The runtime builds IR only (a Spec, SpecIR or ModelIR); paths are resolved by `ltmdsl.build`."""
    path = SPECS["stream-hybrid"]
    ids = torch.arange(6)[None]
    spec = ltmdsl.load(path)
    ref = build(spec)(ids)
    for ir in (spec.ir, spec.model):
        assert_close(build(ir)(ids), ref, 0, f"build from {type(ir).__name__}")
    for where in (str(path), path, spec, spec.model):
        assert_close(ltmdsl.build(where)(ids), ref, 0, f"ltmdsl.build from {type(where).__name__}")
    for bad in (str(path), path, path.read_text()):
        with pytest.raises(TypeError, match="ModelIR"):
            build(bad)
    with pytest.raises(ltmdsl.SpecError, match="no such file"):  # text is never taken for a path's content
        ltmdsl.build(path.read_text())


def test_seed_controls_weights():
    spec = ltmdsl.load(SPECS["stream-hybrid"])
    a, b, c = build(spec, seed=0), build(spec, seed=0), build(spec, seed=1)
    ids = torch.arange(8)[None]
    assert torch.equal(a(ids), b(ids))
    assert not torch.allclose(a(ids), c(ids))
    assert a(ids).std() > 1e-3  # non-trivial outputs


def test_triton_backend_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ltmdsl.codegen.backend", None)  # makes the import fail
    with pytest.raises(RuntimeError, match="backend='triton'"):
        build(ltmdsl.load(SPECS["stream-hybrid"]), backend="triton")
    with pytest.raises(ValueError, match="unknown backend"):
        build(ltmdsl.load(SPECS["stream-hybrid"]), backend="jax")


# ---- cache ----------------------------------------------------------------------------------


@pytest.mark.parametrize("conv_taps", ["full", "minus_one"])
@pytest.mark.parametrize("batch,context", [(1, 10), (3, 4096)], ids=["b1-t10", "b3-t4096"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cache_bytes_equal_memory_model(model, conv_taps, batch, context, dtype):
    from ltmdsl.memory import cache_bytes
    from ltmdsl.units import DTYPES

    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    cache = model.new_cache(batch, context, dtype=dtype, conv_taps=conv_taps)
    predicted = cache_bytes(model.ir, batch=batch, context=context, kv_dtype=DTYPES[name],
                            state_dtype=DTYPES[name], conv_taps=conv_taps)
    assert cache.breakdown() == predicted
    assert cache.nbytes() == sum(predicted.values())


def test_window_cache_is_a_ring_of_w_slots():
    m = build(ltmdsl.load(SPECS["tiny-hybrid"]))
    cache = m.new_cache(2, 4096)
    kv = [e for e in cache.layers if isinstance(e, KVCache)]
    assert sorted(e.slots for e in kv) == [16, 4096, 4096]  # swa, attn and tf's attention
    assert m.new_cache(2, 8).layers[4].slots == 8  # min(max_context, W)
    ssm = [e for e in cache.layers if isinstance(e, ConvSSMState)]
    assert [e.conv.shape[-1] for e in ssm] == [4, 4]
    assert [e.conv.shape[-1] for e in m.new_cache(2, 8, conv_taps="minus_one").layers if isinstance(e, ConvSSMState)] == [3, 3]


def test_global_cache_overflow_raises():
    m = build(ltmdsl.load(SPECS["tiny-hybrid"]))
    cache = m.new_cache(1, 8)
    m(tokens(m, 1, 8), cache)
    with pytest.raises(ValueError, match="cache holds 8"):
        m(tokens(m, 1, 1), cache)


# ---- invariants -----------------------------------------------------------------------------


@pytest.mark.parametrize("T,k", [(40, 6), (9, 9)], ids=["T40-k6", "T9-all-steps"])
def test_prefill_equals_prefix_plus_steps(model, T, k):
    B = 2
    ids = tokens(model, B, T)
    with torch.no_grad():
        full_cache = model.new_cache(B, 64)
        full = model(ids, full_cache)  # [B, T, V]
        assert_close(model(ids), full, FP32_TOL, "cache-free prefill")
        cache = model.new_cache(B, 64)
        outs = [model(ids[:, : T - k], cache)] if T > k else []
        outs += [model(ids[:, t : t + 1], cache) for t in range(T - k, T)]
    assert_close(torch.cat(outs, 1), full, FP32_TOL, "logits")
    assert_caches_close(cache, full_cache, "state")


@pytest.mark.parametrize("chunks", [(7, 16, 1, 20), (13, 13, 13, 1)], ids=["7-16-1-20", "13x3-1"])
def test_chunked_prefill_equals_one_shot(model, chunks):
    B, T = 2, sum(chunks)
    ids = tokens(model, B, T, seed=1)
    with torch.no_grad():
        one_cache = model.new_cache(B, 64)
        one = model(ids, one_cache)
        cache = model.new_cache(B, 64)
        outs, t = [], 0
        for c in chunks:
            outs.append(model(ids[:, t : t + c], cache))
            t += c
    assert_close(torch.cat(outs, 1), one, FP32_TOL, "logits")
    assert_caches_close(cache, one_cache, "state")


def test_batch_equals_per_sequence_loop(model):
    ids = tokens(model, 3, 21, seed=2)
    with torch.no_grad():
        batched = model(ids)
        cache = model.new_cache(3, 32)
        model(ids[:, :20], cache)
        step = model(ids[:, 20:], cache)
        for b in range(3):
            assert_close(batched[b], model(ids[b : b + 1])[0], FP32_TOL, f"sequence {b}")
            c1 = model.new_cache(1, 32)
            model(ids[b : b + 1, :20], c1)
            assert_close(step[b], model(ids[b : b + 1, 20:], c1)[0], FP32_TOL, f"decode {b}")


def test_minus_one_conv_taps_decode_the_same():
    m = build(ltmdsl.load(SPECS["stream-hybrid"])).eval()
    ids = tokens(m, 2, 12)
    with torch.no_grad():
        a, b = m.new_cache(2, 16), m.new_cache(2, 16, conv_taps="minus_one")
        m(ids[:, :5], a), m(ids[:, :5], b)
        for t in range(5, 12):
            assert_close(m(ids[:, t : t + 1], b), m(ids[:, t : t + 1], a), FP32_TOL, f"step {t}")


def test_output_modes(model):
    ids = tokens(model, 2, 9)
    with torch.no_grad():
        full = model(ids)
        assert_close(model(ids, output="last"), full[:, -1:], 1e-6, "last")
        hidden = model(ids, output="hidden")
    assert hidden.shape == (2, 9, model.ir.d_model)
    assert_close(model.head(hidden), full, 1e-6, "head(hidden)")


# ---- generation -----------------------------------------------------------------------------


def test_greedy_generate_matches_recomputation(model):
    prompt = tokens(model, 2, 7, seed=3)
    out = model.generate(prompt, max_new_tokens=10, temperature=0.0)
    assert out.shape == (2, 17) and torch.equal(out[:, :7], prompt)
    seq = prompt
    with torch.no_grad():
        for _ in range(10):  # no cache: recompute the whole prefix each time
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def test_sampling_is_seeded():
    m = build(ltmdsl.load(SPECS["tiny-hybrid"]))
    prompt = tokens(m, 2, 4)
    a = m.generate(prompt, 12, temperature=1.0, seed=5)
    assert torch.equal(a, m.generate(prompt, 12, temperature=1.0, seed=5))
    assert not torch.equal(a, m.generate(prompt, 12, temperature=1.0, seed=6))
    top1 = m.generate(prompt, 12, temperature=1.0, top_k=1, seed=7)
    assert torch.equal(top1, m.generate(prompt, 12, temperature=0.0))
