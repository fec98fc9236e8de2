"""Context-parallel inference (ltmdsl.distributed.cp_inference, gloo, forked workers) against one process in
float64: a prompt prefilled in two chunks through the cache, greedy decode steps past a sliding window's span
and `generate`; logits within 1e-6 relative, the same tokens, on 2 and 4 cp ranks. The model: tiny-hybrid's
kinds that have a cp inference form (global GQA attention, an MQA window of 8 that the 24 tokens wrap three
times, Mamba-1, Mamba-2, Gated DeltaNet, KDA, short conv, lightning, RG-LRU, mLSTM, MLP, MoE). Each rank's
cache bytes equal the memory model's per-GPU cache at that cp (`cache_bytes(cp=...)`): attention 1/cp of
its slots, recurrent states whole. The kinds without a form are refused by name."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from paths import EXAMPLES

import ltmdsl
from ltmdsl.distributed import launch
from ltmdsl.distributed.cp_inference import (ContextParallelInferenceUnsupported, check_ir, check_model, serve,
                                              slot_positions)
from ltmdsl.memory import cache_bytes
from ltmdsl.runtime.build import build, dtype_ir

RTOL = 1e-6
B, FIRST, T, NEW = 2, 8, 16, 8  # sequences, first prefill chunk, prompt tokens, decoded tokens
CONTEXT = T + NEW

#: tiny-hybrid's stack without mla, parallel and transformer_block, its window narrowed to 8 so decode wraps it
STACK = "ssm1 ffn ssm2 moe swa ffn attn ffn gdn ffn kda ffn conv ffn lit ffn lru ffn mem ffn"


def cp_hybrid():
    text = (EXAMPLES / "tiny-hybrid.ltm").read_text().replace("window = 16", "window = 8")
    head, _, rest = text.partition("    stack {")
    _, _, tail = rest.partition("    }\n}")
    return ltmdsl.loads(f"{head}    stack {{ {STACK} }}\n}}{tail}").ir.model()


def _prompt(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(7))  # [B, T]


@torch.no_grad()
def _infer(net, new_cache, ids: torch.Tensor) -> dict:
    """Two prefill chunks, NEW greedy decode steps, and `generate` on a fresh cache."""
    cache = new_cache(B, CONTEXT)
    logits = torch.cat([net(ids[:, :FIRST], cache), net(ids[:, FIRST:], cache)], dim=1)  # [B, T, V]
    tokens, steps = [ids], []
    nxt = logits[:, -1].argmax(-1)  # [B]
    for _ in range(NEW):
        tokens.append(nxt[:, None])
        step = net(nxt[:, None], cache, output="last")[:, -1]  # [B, V]
        steps.append(step)
        nxt = step.argmax(-1)
    last = net(ids, new_cache(B, CONTEXT), output="last")[:, -1]  # [B, V]: a one-call prefill's last logits
    return {"prefill": logits, "steps": torch.stack(steps), "tokens": torch.cat(tokens, dim=1), "last": last,
            "bytes": cache.breakdown(), "generate": net.generate(ids, NEW)}


def _ranks(ir):
    """On each cp rank: the whole model (replicated weights), served over the cp group."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),), mesh_dim_names=("cp",))
    server = serve(build(ir, seed=0, dtype=torch.float64), mesh)
    return _infer(server, server.new_cache, _prompt(ir.vocab))


@pytest.fixture(scope="module")
def hybrid():
    ir = cp_hybrid()
    net = build(ir, seed=0, dtype=torch.float64)
    return ir, _infer(net, net.new_cache, _prompt(ir.vocab))


@pytest.mark.parametrize("cp", [2, 4], ids=["cp2", "cp4"])
def test_cp_inference_matches_one_process(hybrid, cp):
    ir, want = hybrid
    f64 = dtype_ir(torch.float64)
    predicted = cache_bytes(ir, batch=B, context=CONTEXT, kv_dtype=f64, state_dtype=f64, cp=cp)
    for got in launch(_ranks, cp, (ir,), timeout_s=600):
        assert_close(got["prefill"], want["prefill"], RTOL, "prefill logits")
        assert_close(got["steps"], want["steps"], RTOL, "decode logits")
        assert_close(got["last"], want["last"], RTOL, "one-call prefill's last logits")
        assert torch.equal(got["tokens"], want["tokens"]), "greedy tokens differ"
        assert torch.equal(got["generate"], want["tokens"]), "generate's tokens differ"
        assert got["bytes"] == predicted
        assert got["bytes"]["kv_cache"] * cp == want["bytes"]["kv_cache"]  # a share of the keys, not a copy
        assert got["bytes"]["recurrent_state"] == want["bytes"]["recurrent_state"]  # states whole


#: cp_hybrid without Mamba-2, whose single group tp = 2 cannot split
TP_STACK = "ssm1 ffn swa moe attn ffn gdn ffn kda ffn conv ffn lit ffn lru ffn mem ffn"


def _tp_ranks(ir):
    """On each of 4 ranks: the model split over tp = 2 (ltmdsl.distributed's tp plans), served over cp = 2."""
    from torch.distributed.device_mesh import init_device_mesh

    from ltmdsl.distributed.materialize import build_meta, materialize
    from ltmdsl.distributed.tensor_parallel import apply_tensor_parallel

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("cp", "tp"))
    net = build_meta(ir, torch.float64)
    apply_tensor_parallel(net, mesh["tp"])
    server = serve(materialize(net, "cpu", 0), mesh["cp"])
    return _infer(server, server.new_cache, _prompt(ir.vocab))


def test_tp2_cp2_inference_matches_one_process():
    """tp x cp on 4 ranks: each rank's cache holds its KV heads' 1/cp and its heads' states, the memory model's
    per-GPU cache at tp = 2, cp = 2."""
    text = (EXAMPLES / "tiny-hybrid.ltm").read_text().replace("window = 16", "window = 8")
    head, _, rest = text.partition("    stack {")
    _, _, tail = rest.partition("    }\n}")
    ir = ltmdsl.loads(f"{head}    stack {{ {TP_STACK} }}\n}}{tail}").ir.model()
    net = build(ir, seed=0, dtype=torch.float64)
    want = _infer(net, net.new_cache, _prompt(ir.vocab))
    f64 = dtype_ir(torch.float64)
    predicted = cache_bytes(ir, batch=B, context=CONTEXT, kv_dtype=f64, state_dtype=f64, tp=2, cp=2)
    for got in launch(_tp_ranks, 4, (ir,), timeout_s=600):
        assert_close(got["prefill"], want["prefill"], RTOL, "prefill logits")
        assert_close(got["steps"], want["steps"], RTOL, "decode logits")
        assert torch.equal(got["generate"], want["tokens"]), "generate's tokens differ"
        assert got["bytes"] == predicted


def test_slot_positions_cover_the_window_once():
    """Cyclic ownership: at every last position the rings of 4 ranks of 2 slots hold exactly the last 8
    positions (fewer before 8 are written); a global cache's slots hold positions <= last."""
    for last in range(30):
        held = torch.cat([slot_positions(r, 4, 2, last, ring=True) for r in range(4)])
        assert sorted(p for p in held.tolist() if p >= 0) == list(range(max(0, last - 7), last + 1))
    glob = torch.cat([slot_positions(r, 4, 6, 13, ring=False) for r in range(4)])
    assert sorted(p for p in glob.tolist() if p >= 0) == list(range(14))


@pytest.mark.parametrize("name", ["lat", "par", "tf"], ids=["mla", "parallel", "transformer_block"])
def test_kinds_without_a_form_are_named(name):
    text = (EXAMPLES / "tiny-hybrid.ltm").read_text()
    head, _, rest = text.partition("    stack {")
    _, _, tail = rest.partition("    }\n}")
    ir = ltmdsl.loads(f"{head}    stack {{ attn {name} ffn }}\n}}{tail}").ir.model()
    kind = {"lat": "mla", "par": "parallel", "tf": "transformer_block"}[name]
    with pytest.raises(ContextParallelInferenceUnsupported, match=f"kind '{kind}'"):
        check_model(build(ir, seed=0, device="meta"))


@pytest.mark.parametrize("variant", ["sinks = true", "causal = false", "softcap = 30.0", "chunk = 8"])
def test_attention_variants_without_a_merge_are_refused_naming_the_layer(variant):
    """Only causal plain-softmax attention's partial results merge by their log-sum-exp across ranks."""
    text = (EXAMPLES / "tiny-hybrid.ltm").read_text()
    spec = text.replace("attention(heads = 4, kv_heads = 2, rope_theta = 10000)",
                        f"attention(heads = 4, kv_heads = 2, rope_theta = 10000, {variant})")
    assert spec != text
    with pytest.raises(ContextParallelInferenceUnsupported,
                       match=r"layer 'attn' \(kind 'attention'\): .*causal plain-softmax attention only"):
        check_ir(ltmdsl.loads(spec).ir.model())
