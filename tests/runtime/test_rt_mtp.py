"""Multi-token prediction (DeepSeek-V3's MTP modules, `mtp = mtp(...)`): the batched extra head against a float64
token loop written from the DeepSeek-V3 paper's equations (explicit RMSNorms, the concatenation [norm(h) ;
norm(e)], the block's mixers decoding one position at a time through their caches, the shared head), the
parameter count on its own line, the weights in the memory model, and the spec's errors."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import ltmdsl  # noqa: E402
from helpers import assert_close  # noqa: E402

from ltmdsl.cli import main  # noqa: E402
from ltmdsl.errors import SpecError  # noqa: E402
from ltmdsl.runtime.cache import CacheRequest  # noqa: E402
from ltmdsl.runtime.kinds import runtime_kind  # noqa: E402

SPEC = """model m {{
    vocab = 61
    d_model = 24
    norm = rmsnorm(eps = 1e-6)
    layer attn = mla(heads = 2, q_lora_rank = 10, kv_lora_rank = 8, qk_nope_head_dim = 4, qk_rope_head_dim = 4,
                     v_head_dim = 6, rope_theta = 300.0)
    layer moe = moe(experts = 4, top_k = 2, d_ff = 10, routing = sigmoid_topk_renorm, groups = 2, top_groups = 1,
                    selection_bias = true, routed_scale = 2.5, shared_d_ff = 10)
    layer dense = mlp(d_ff = 30)
    {mtp}
    stack {{ attn dense attn moe }}
}}
"""
DEPTH2 = "mtp = mtp(depth = 2, mixer = attn, ffn = moe)"


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _token_loop(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """The paper's MTP, one position at a time: x_i = M [rms(h_i) ; rms(emb(t_{i+k}))], the block's sub-layers
    through their one-token `step` and caches, logits_i = rms(x_i) @ W_head^T; x feeds the next depth."""
    ir, (B, T) = model.ir, ids.shape
    h, e = model(ids, output="hidden"), model.embed(ids)
    eps, out = ir.final_norm.eps, []
    for k, module in enumerate(model.mtp, start=1):
        n = T - k
        request = CacheRequest(B, n, torch.float64, torch.float64, "full", "cpu")
        caches = [None if runtime_kind(x.kind).new_cache is None else runtime_kind(x.kind).new_cache(x.mixer, request)
                  for x in ir.mtp.block]
        rows, states = [], []
        for i in range(n):
            x = torch.cat([_rms(h[:, i], module.norm_h.weight, eps), _rms(e[:, i + k], module.norm_e.weight, eps)],
                          dim=-1) @ module.proj.weight.t()  # [B, d]
            for layer, block, cache in zip(ir.mtp.block, module.layers, caches):
                x = x + block.mixer.step(_rms(x, block.norm.weight, layer.norm.eps), cache, i)
            states.append(x)
            rows.append(_rms(x, module.norm_o.weight, eps) @ model.head_weight().t())  # [B, V]
        h = torch.stack(states, 1)  # [B, n, d]
        out.append(torch.stack(rows, 1))  # [B, n, V]
    return out


def _model(seed: int = 0):
    model = ltmdsl.build(ltmdsl.loads(SPEC.format(mtp=DEPTH2)), backend="torch", seed=seed).double()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial norms and selection biases, so that each one's place matters
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith(("norm_h.weight", "norm_e.weight", "norm_o.weight", "selection_bias")):
                t.copy_((1.0 if "norm" in name else 0.0) + 0.3 * torch.randn(t.shape, generator=gen,
                                                                            dtype=torch.float64))
    return model.eval()


def test_mtp_head_matches_float64_token_loop():
    """Two depths over 11 tokens: module 1 gives 10 rows predicting tokens 2..11, module 2 nine rows; the batched
    head (prefill attention) equals the token loop (absorbed-latent decode) to 1e-10 in float64."""
    model = _model()
    ids = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = model.mtp_logits(ids), _token_loop(model, ids)
    assert [tuple(x.shape) for x in got] == [(2, 10, 61), (2, 9, 61)]
    for k, (a, b) in enumerate(zip(got, want), start=1):
        assert_close(a, b, 1e-10, f"MTP depth {k} logits")


def test_mtp_head_is_causal_and_uses_the_next_tokens():
    """Row i of depth 1 depends on tokens 0..i + 1 only: changing token j changes rows >= j - 1, never earlier."""
    model = _model()
    ids = torch.randint(0, 61, (1, 9), generator=torch.Generator().manual_seed(4))
    changed = ids.clone()
    changed[0, 5] = (ids[0, 5] + 1) % 61
    with torch.no_grad():
        a, b = model.mtp_logits(ids)[0], model.mtp_logits(changed)[0]
    same = (a - b).abs().amax(-1)[0] == 0
    assert same[:4].all() and not same[4:].any()


def test_mtp_parameters_on_their_own_line(capsys, tmp_path):
    """params_total is the main model's; each module adds 3 norms, the [d, 2d] projection and its block."""
    ir = ltmdsl.loads(SPEC.format(mtp=DEPTH2)).model
    plain = ltmdsl.loads(SPEC.format(mtp="")).model
    d = 24
    block = sum(x.params for x in plain.layers[2:])  # attn + moe, as in the stack
    assert ir.params_total == plain.params_total
    assert ir.params_mtp == 2 * (3 * d + 2 * d * d + block)
    model = ltmdsl.build(ir, backend="torch", seed=0)
    assert model.num_parameters() == ir.params_total + ir.params_mtp
    path = tmp_path / "m.ltm"
    path.write_text(SPEC.format(mtp=DEPTH2))
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"({ir.params_total:,})\n" in out
    assert f"multi-token prediction (depth 2): " in out and f"({ir.params_mtp:,}) besides the total" in out
    assert main(["memory", str(path), "--context", "1K", "--json"]) == 0
    import json

    weights = json.loads(capsys.readouterr().out)["by_kind"]["weights"]
    assert weights["mtp"] == ir.params_mtp * 2  # bf16, beside the main model's weights


@pytest.mark.parametrize("mtp, message", [
    ("mtp = mtp(depth = 0, mixer = attn, ffn = moe)", "mtp\\(\\) depth must be at least 1"),
    ("mtp = mtp(mixer = attn)", "mtp\\(\\) needs ffn"),
    ("mtp = mtp(mixer = attn, ffn = mo)", "mtp\\(\\) ffn names unknown layer 'mo'; did you mean 'moe'"),
    ("mtp = mtp(mixer = moe, ffn = moe)", "mtp\\(\\) mixer must name a sequence-mixer layer; 'moe' is moe"),
    ("mtp = mtp(mixer = attn, ffn = attn)", "mtp\\(\\) ffn must name a feed-forward layer"),
    ("mtp = mtp(mixer = attn, ffn = moe, width = 3)", "unknown parameter 'width' of mtp\\(\\)"),
    ("mtp = 2", "mtp must be mtp\\(depth = ..., mixer = ..., ffn = ...\\) or none"),
], ids=["depth-0", "no-ffn", "typo", "mixer-is-ffn", "ffn-is-mixer", "unknown-kwarg", "number"])
def test_mtp_spec_errors(mtp, message):
    with pytest.raises(SpecError, match=message):
        ltmdsl.loads(SPEC.format(mtp=mtp))


def test_mtp_maps_only_to_deepseek_v3():
    """A DeepSeek-V3-shaped model's mtp is its checkpoints' num_nextn_predict_layers (the tensors: test_hf_deepseek);
    one whose block is not what DeepSeek's layer num_hidden_layers would be, or a model of another family, is
    refused by name."""
    from ltmdsl.hf import HFError
    from ltmdsl.hf.export import config_from_ir, hf_plan

    cfg = config_from_ir(ltmdsl.loads(SPEC.format(mtp=DEPTH2)).model)
    assert (cfg["model_type"], cfg["num_nextn_predict_layers"]) == ("deepseek_v3", 2)
    with pytest.raises(HFError, match="does not map back to deepseek_v3 exactly: its multi-token-prediction"):
        hf_plan(ltmdsl.loads(SPEC.format(mtp="mtp = mtp(depth = 2, mixer = attn, ffn = dense)")).model)
    llama = ("model l {\n vocab = 64\n d_model = 32\n layer attn = attention(heads = 4)\n layer ffn = mlp(d_ff = 48)\n"
             " mtp = mtp(mixer = attn, ffn = ffn)\n stack { repeat 2 { attn ffn } }\n}\n")
    with pytest.raises(HFError, match="mtp\\) map only to DeepSeek-V3 checkpoints .*; llama has none"):
        config_from_ir(ltmdsl.loads(llama).model)


def test_mtp_modules_round_trip_through_a_runtime_checkpoint(tmp_path):
    """The modules (selection bias included) are saved and loaded with the model; the head gives the same rows."""
    from ltmdsl.checkpoints import load_checkpoint
    from ltmdsl.runtime.checkpoint import save

    model = _model().float()
    path = save(model, tmp_path / "m.safetensors")
    back = load_checkpoint(path)
    ids = torch.randint(0, 61, (1, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for a, b in zip(model.mtp_logits(ids), back.mtp_logits(ids)):
            assert torch.equal(a, b)
