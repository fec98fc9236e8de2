"""transformer_block in shared blocks (Zamba2's shared transformer with per-use LoRA adapters, its input
cat[h, embeddings] and its output into the next Mamba layer's input only) and Mamba-2's dt_min: the whole model
against transformers' Zamba2ForCausalLM in float64, cached decode against one pass, the count against transformers'
and the KV cache (one per use) against the memory model."""

from __future__ import annotations

import pytest
import torch

import ltmdsl
from helpers import assert_close

F64 = 1e-10  # float64 against float64: the same arithmetic in another order
HF_TOL = 1e-6  # float64 against transformers' float64 modules

transformers = pytest.importorskip("transformers")

D, H, F, R, NMB = 16, 4, 32, 4, 2
TYPES = ["m", "h", "m", "h", "m", "m", "h", "m"]  # Zamba2 layers: m a Mamba layer, h a hybrid one
SPEC = """model tz {{
    vocab = 64
    d_model = {d}
    dtype = fp32
    head = tied
    layer ssm = mamba2(d_state = 8, head_dim = 8, expand = 2, chunk = 4, dt_min = 0.001)
    layer sattn = attention(heads = {h}, head_dim = {hd}, scale = {scale}, rope_theta = 10000)
    layer smlp = mlp(d_ff = {f}, act = {act})
    layer tf = transformer_block(attn = sattn, ffn = smlp, adapter_rank = {r}, attn_adapters = {attn_ad},
                                 input = concat_embed, into = next_input)
    shared block z0 {{ tf }}
    shared block z1 {{ tf }}
    stack {{ {stack} }}
}}
budget b for tz {{ inference context = 64, batch = 2 }}
"""


def _stack() -> tuple[str, list[tuple[int, int | None, int | None]]]:
    """Our stack text and, per Zamba2 layer j, (our Mamba sub-layer, our transformer sub-layer, use)."""
    items, plan, k, use = [], [], 0, 0
    for t in TYPES:
        if t == "h":
            items.append(f"z{use % NMB}")
            plan.append((k + 1, k, use))
            use += 1
            k += 2
        else:
            plan.append((k, None, None))
            k += 1
        items.append("ssm")
    return " ".join(items), plan


def _spec(attn_adapters: bool, dt_min: bool = True, act: str = "geglu"):
    stack, _ = _stack()
    hd = 2 * D // H
    text = SPEC.format(d=D, h=H, hd=hd, scale=(hd / 2) ** -0.5, f=F, r=R, stack=stack, act=act,
                       attn_ad="true" if attn_adapters else "false")
    return ltmdsl.loads(text if dt_min else text.replace("dt_min = 0.001", "dt_min = 0"))


def _hf_model(attn_adapters: bool):
    cfg = transformers.Zamba2Config(
        vocab_size=64, hidden_size=D, num_hidden_layers=len(TYPES),
        layers_block_type=["hybrid" if t == "h" else "mamba" for t in TYPES],
        mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_ngroups=1, n_mamba_heads=4, chunk_size=4,
        num_attention_heads=H, num_key_value_heads=H, intermediate_size=F, hidden_act="gelu",
        num_mem_blocks=NMB, use_shared_attention_adapter=attn_adapters, adapter_rank=R, use_mem_rope=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-5,
        time_step_min=1e-3, tie_word_embeddings=True, pad_token_id=0)
    torch.manual_seed(0)
    hf = transformers.Zamba2ForCausalLM(cfg).double().eval()
    with torch.no_grad():
        for p in hf.parameters():  # every weight random, norms included, so each mapping is exercised
            p.add_(0.05 * torch.randn_like(p))
        for name, p in hf.named_parameters():  # two heads with softplus(dt) well below time_step_min: the clamp acts
            if name.endswith("mamba.dt_bias"):
                p[:2] = -9.0
    return hf


def _copy_weights(ours, hf) -> None:
    """transformers' Zamba2 state into our names: each Zamba2 layer is our Mamba sub-layer, after, for a hybrid
    one, our transformer_block sub-layer (its shared part from the layer that owns it, its use's adapters and
    `linear`)."""
    src = hf.state_dict()
    dst = ours.state_dict()
    out = {"embed.weight": src["model.embed_tokens.weight"], "final_norm.weight": src["model.final_layernorm.weight"]}
    _, plan = _stack()
    for j, (mk, tk, use) in enumerate(plan):
        pre = f"model.layers.{j}." + ("mamba_decoder." if tk is not None else "")
        for name in dst:
            if name.startswith(f"layers.{mk}.mixer."):
                out[name] = src[pre + "mamba." + name[len(f"layers.{mk}.mixer."):]]
        out[f"layers.{mk}.norm.weight"] = src[pre + "input_layernorm.weight"]
        if tk is None:
            continue
        st = f"model.layers.{j}.shared_transformer."
        m = f"layers.{tk}.mixer."
        out[f"layers.{tk}.norm.weight"] = src[st + "input_layernorm.weight"]
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"{m}attn.{p}.weight"] = src[st + f"self_attn.{p}.weight"]
        out[f"{m}mid_norm.weight"] = src[st + "pre_ff_layernorm.weight"]
        gate, up = src[st + "feed_forward.gate_up_proj.weight"].chunk(2, dim=0)
        out[f"{m}ffn.gate_proj.weight"], out[f"{m}ffn.up_proj.weight"] = gate, up
        out[f"{m}ffn.down_proj.weight"] = src[st + "feed_forward.down_proj.weight"]
        u = f"uses.{tk}."
        for x in ("q", "k", "v"):
            key = st + f"self_attn.linear_{x}_adapter_list.{use}.0.weight"
            if key in src:
                out[u + f"adapters.{x}.0.weight"] = src[key]
                out[u + f"adapters.{x}.1.weight"] = src[key.replace(".0.weight", ".1.weight")]
        out[u + "adapters.gate_up.0.weight"] = src[st + f"feed_forward.gate_up_proj_adapter_list.{use}.0.weight"]
        out[u + "adapters.gate_up.1.weight"] = src[st + f"feed_forward.gate_up_proj_adapter_list.{use}.1.weight"]
        out[u + "out_proj.weight"] = src[f"model.layers.{j}.linear.weight"]
    missing = sorted(set(dst) - set(out))
    assert not missing, f"unmapped: {missing}"
    ours.load_state_dict(out, strict=True)


@pytest.mark.parametrize("attn_adapters", [True, False], ids=["qkv-and-mlp-adapters", "mlp-adapters-only"])
def test_model_matches_transformers_zamba2_in_float64(attn_adapters):
    """Logits of the whole model (shared blocks used in turn, per-use adapters and linear, cat[h, embeddings],
    the output into the next Mamba layer's input) equal Zamba2ForCausalLM's in float64 (1e-6), and the
    parameter count equals transformers' (tied shared blocks once, adapters per use)."""
    hf = _hf_model(attn_adapters)
    spec = _spec(attn_adapters)
    ours = ltmdsl.build(spec, seed=0).double().eval()
    assert ours.num_parameters() == spec.ir.model().params_total == hf.num_parameters()
    _copy_weights(ours, hf)
    ids = torch.randint(1, 64, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits  # [2, 11, 64]
        got = ours(ids)
    assert_close(got, want, HF_TOL, "logits against Zamba2ForCausalLM")


def test_greedy_generation_through_the_cache_equals_transformers():
    """Ten greedy tokens through our cache (per-use KV caches of the shared attention, Mamba states) equal
    transformers' generate in float64."""
    hf = _hf_model(True)
    ours = ltmdsl.build(_spec(True), seed=0).double().eval()
    _copy_weights(ours, hf)
    ids = torch.randint(1, 64, (1, 7), generator=torch.Generator().manual_seed(2))
    want = hf.generate(ids, max_new_tokens=10, do_sample=False, min_new_tokens=10)
    got = ours.generate(ids, max_new_tokens=10)
    assert got.tolist() == want.tolist()


def test_chunked_prefill_and_decode_equal_one_pass():
    """Prefill in two chunks then one-token steps through the cache == one forward pass (float64). Without
    dt_min: like mamba_ssm's, its clamp applies in the prefill form only, so a decoded token whose dt falls
    below it differs from the same token in one pass."""
    spec = _spec(True, dt_min=False)
    model = ltmdsl.build(spec, seed=3).double().eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 12)
        parts = [model(ids[:, :5], cache), model(ids[:, 5:9], cache)]
        parts += [model(ids[:, t:t + 1], cache) for t in range(9, 12)]
    assert_close(torch.cat(parts, dim=1), full, F64, "chunked prefill and decode")


@pytest.mark.parametrize("act", ["geglu", "swiglu", "relu"])
def test_inference_ffn_in_place_equals_the_autograd_path(act):
    """Without autograd the block's MLP adds each adapter's rows into gate and up in place (two [.., F] tensors
    live, as the memory model counts); with autograd it builds the graph of separate sums: the same values
    (float64), and the graph's gradient reaches the adapters."""
    spec = _spec(True, act=act)
    model = ltmdsl.build(spec, seed=5).double()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        inplace = model(ids)
    graph = model(ids)
    assert_close(inplace, graph.detach(), F64, f"in-place inference MLP ({act}) against the autograd path")
    graph.sum().backward()
    assert model.uses["1"].adapters["gate_up"][1].weight.grad.abs().sum() > 0


def test_kv_cache_is_per_use_and_equals_the_memory_model():
    """Each use of a shared attention keeps its own keys: the runtime allocates what the memory model counts,
    3 uses x 2 x H x (2d/H) values per token, plus the Mamba states."""
    from ltmdsl.memory import cache_bytes

    spec = _spec(True)
    ir = spec.ir.model()
    model = ltmdsl.build(spec, seed=0)
    cache = model.new_cache(2, 40)
    want = cache_bytes(ir, batch=2, context=40, kv_dtype=ir.dtype, state_dtype=ir.dtype)
    assert cache.breakdown() == want
    uses = sum(1 for layer in ir.layers if layer.kind == "transformer_block")
    assert want["kv_cache"] == uses * 2 * 2 * 40 * H * (2 * D // H) * 4


def test_shared_weights_are_one_tensor_and_adapters_one_per_use():
    """Uses of one shared block run the very same attention and MLP tensors; each use has its own adapters."""
    model = ltmdsl.build(_spec(True), seed=0)
    ir = model.ir
    tf = [layer.index for layer in ir.layers if layer.kind == "transformer_block"]
    assert model.layers[tf[0]].mixer is model.layers[tf[2]].mixer  # uses 0 and 2: block z0
    assert model.layers[tf[0]].mixer is not model.layers[tf[1]].mixer
    qa = [model.uses[str(i)].adapters["q"][0].weight for i in tf]
    assert len({id(w) for w in qa}) == len(tf)
    assert not torch.equal(qa[0], qa[2])
