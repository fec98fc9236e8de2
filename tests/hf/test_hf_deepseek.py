"""DeepSeek-V2 / V3 (model_types deepseek_v2, deepseek_v3): import-hf of the published configs (exact counts
against transformers on the meta device), from_hf against transformers on tiny random checkpoints (fp32 logits
within 1e-4 relative, greedy generation through our latent cache equal to transformers' uncached loop), the
HF -> ltmdsl -> HF round trip, DeepSeek-V3's multi-token-prediction module loaded from its checkpoint layout
(against a float64 computation from the HF tensors) and written back, and hostile config fields named in the
error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import ltmdsl
from ltmdsl.hf import HFError
from ltmdsl.hf.configs import spec_from_config
from paths import EXAMPLES

CONFIGS = Path(__file__).parent / "configs"
#: published config -> transformers' parameter count (DeepSeek-V3's leaves out its multi-token-prediction module)
PUBLISHED = {"DeepSeek-V3": 671_026_404_352, "DeepSeek-V2-Lite": 15_706_484_224}

_MLA = dict(vocab_size=61, hidden_size=36, intermediate_size=50, num_attention_heads=3, num_key_value_heads=3,
            kv_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=6, v_head_dim=5, moe_intermediate_size=14,
            n_routed_experts=8)
#: YaRN at toy size with all three bands: the 3 frequencies of qk_rope_head_dim 6 at theta 300 give the
#: correction range [0, 2] for betas 8 and 0.05 over an original context of 8 tokens, so frequency 0 is kept,
#: 1 blended half and half, 2 divided by the factor (prompts of 13 + 10 tokens run past the context); DeepSeek's
#: mscale / mscale_all_dim unequal, so that the cos/sin factor mscale(4, 0.8) / mscale(4, 1.3) and the
#: softmax-scale correction mscale(4, 1.3)^2 both matter
YARN = {"rope_type": "yarn", "rope_theta": 300.0, "factor": 4.0, "original_max_position_embeddings": 8,
        "beta_fast": 8, "beta_slow": 0.05, "mscale": 0.8, "mscale_all_dim": 1.3}

#: case id -> (model_type, config kwargs, save fused experts?)
CASES = {
    # DeepSeek-V2 without q-LoRA (q_proj), group-limited greedy routing (4 groups of 2, best 2 groups), two
    # shared experts, one dense first layer, a routed scale, and YaRN
    "v2": ("deepseek_v2", {**_MLA, "num_hidden_layers": 3, "q_lora_rank": None, "num_experts_per_tok": 3,
                           "n_shared_experts": 2, "first_k_dense_replace": 1, "topk_method": "group_limited_greedy",
                           "n_group": 4, "topk_group": 2, "routed_scaling_factor": 1.5,
                           "rope_parameters": YARN, "max_position_embeddings": 32}, False),
    # DeepSeek-V2 with q-LoRA, greedy routing, attention biases, tied embeddings, plain RoPE, fused experts
    "v2_qlora": ("deepseek_v2", {**_MLA, "num_hidden_layers": 2, "q_lora_rank": 12, "num_experts_per_tok": 2,
                                 "n_shared_experts": 1, "first_k_dense_replace": 0, "attention_bias": True,
                                 "tie_word_embeddings": True, "rope_theta": 500.0}, True),
    # DeepSeek-V3: q-LoRA, sigmoid routing with a random selection bias, 4 groups scored by their two best,
    # renormalised and scaled, two dense first layers, YaRN
    "v3": ("deepseek_v3", {**_MLA, "num_hidden_layers": 4, "q_lora_rank": 12, "num_experts_per_tok": 3,
                           "n_shared_experts": 1, "first_k_dense_replace": 2, "n_group": 4, "topk_group": 2,
                           "routed_scaling_factor": 2.5, "rope_parameters": YARN, "max_position_embeddings": 32},
           False),
    # DeepSeek-V3 without q-LoRA or groups, no renormalisation, experts from the first layer on, fused experts
    "v3_flat": ("deepseek_v3", {**_MLA, "num_hidden_layers": 2, "q_lora_rank": None, "num_experts_per_tok": 2,
                                "n_shared_experts": 2, "first_k_dense_replace": 0, "n_group": 1, "topk_group": 1,
                                "norm_topk_prob": False, "rope_theta": 500.0}, True),
}
PROMPT = 13


def _hf_model(case: str, seed: int = 0):
    """A float32 transformers model of the case with random weights, the selection bias included (a buffer)."""
    import torch
    from hf_tiny import randomize
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, kwargs, _ = CASES[case]
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kwargs),
                                             experts_implementation="eager").float().eval()
    randomize(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # as large as the sigmoid scores' spread
                b.copy_(0.2 * torch.randn(b.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case -> (folder, in-memory transformers model), built once per module."""
    root = tmp_path_factory.mktemp("deepseek")
    cache = {}

    def get(case):
        if case not in cache:
            model = _hf_model(case)
            model.save_pretrained(root / case, save_original_format=not CASES[case][2])
            cache[case] = (root / case, model)
        return cache[case]

    return get


def _meta_count(cfg: dict) -> int:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg))
    return sum(p.numel() for p in model.parameters())


# ---- import-hf of the published configs -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_config_counts_what_transformers_counts(name):
    cfg = json.loads((CONFIGS / f"{name}.json").read_text())
    ir = ltmdsl.loads(spec_from_config(cfg)).model
    assert ir.params_total == PUBLISHED[name] == _meta_count(cfg)


def test_deepseek_v3_reads_every_published_setting():
    """61 layers, 3 dense; MLA with q-LoRA 1536, latent 512 + 64; YaRN x40 from 4096 with mscale_all_dim 1, so
    the softmax scale is 192^-1/2 * (0.1 ln 40 + 1)^2; 256 experts, top 8 of the 4 best of 8 groups, sigmoid
    scores with the selection bias, renormalised, times 2.5, one shared expert; num_nextn_predict_layers 1 is the
    spec's mtp line (module 1 = layer 61: MLA, then the MoE, as layers past first_k_dense_replace are)."""
    text = spec_from_config(json.loads((CONFIGS / "DeepSeek-V3.json").read_text()))
    ir = ltmdsl.loads(text).model
    mla, moe = ir.layers[0].mixer, ir.layers[-1].mixer
    assert [layer.kind for layer in ir.layers[1::2]] == ["mlp"] * 3 + ["moe"] * 58
    assert (mla.heads, mla.q_lora_rank, mla.kv_lora_rank, mla.latent, mla.qk_head_dim) == (128, 1536, 512, 576, 192)
    s = mla.rope_scaling
    assert (s.kind, s.factor, s.original_context, s.mscale, s.mscale_all_dim) == ("yarn", 40.0, 4096, 1.0, 1.0)
    assert mla.scale == pytest.approx(192 ** -0.5 * (0.1 * __import__("math").log(40) + 1) ** 2, rel=1e-15)
    assert (moe.experts, moe.top_k, moe.groups, moe.top_groups, moe.group_score) == (256, 8, 8, 4, "top2_sum")
    assert (moe.routing, moe.selection_bias, moe.routed_scale, moe.shared_d_ff) == \
        ("sigmoid_topk_renorm", True, 2.5, 2048)
    assert "# NOTE" not in text and "mtp = mtp(depth = 1, mixer = attn, ffn = moe)" in text
    assert [(x.kind, x.mixer) for x in ir.mtp.block] == [("mla", mla), ("moe", moe)]  # layer 61: MLA, then MoE


def test_deepseek_v2_lite_reads_every_published_setting():
    """27 layers, the first dense; MLA without q-LoRA; 64 experts, softmax top 6 without renormalisation, two
    shared experts of 1408 (one of 2816); YaRN with mscale = mscale_all_dim = 0.707."""
    ir = ltmdsl.loads(spec_from_config(json.loads((CONFIGS / "DeepSeek-V2-Lite.json").read_text()))).model
    mla, moe = ir.layers[0].mixer, ir.layers[-1].mixer
    assert [layer.kind for layer in ir.layers[1::2]] == ["mlp"] + ["moe"] * 26
    assert (mla.heads, mla.q_lora_rank, mla.rope_scaling.mscale_all_dim) == (16, None, 0.707)
    assert (moe.experts, moe.top_k, moe.routing, moe.groups, moe.shared_d_ff, moe.selection_bias) == \
        (64, 6, "softmax_topk", 1, 2816, False)


@pytest.mark.parametrize("name, example", [("DeepSeek-V3", "deepseek-v3.ltm"),
                                           ("DeepSeek-V2-Lite", "deepseek-v2-lite.ltm")])
def test_published_config_is_the_example(name, example):
    """The examples are `ltmdsl import-hf` of the committed configs."""
    ir = ltmdsl.loads(spec_from_config(json.loads((CONFIGS / f"{name}.json").read_text()))).model
    ex = ltmdsl.load(EXAMPLES / example).model
    assert [(x.mixer, x.norm) for x in ir.layers] == [(x.mixer, x.norm) for x in ex.layers]
    assert (ir.vocab, ir.d_model, ir.final_norm, ir.tie_embeddings) == (ex.vocab, ex.d_model, ex.final_norm,
                                                                        ex.tie_embeddings)


def _kv_cache_at_128k(tmp_path, capsys, mixer: str | None) -> dict:
    """`ltmdsl memory --context 128K --json`'s KV cache of DeepSeek-V3, or of it with another mixer."""
    from ltmdsl.cli import main

    path = EXAMPLES / "deepseek-v3.ltm"
    if mixer is not None:
        text = path.read_text()
        start = text.index("    layer attn = mla(")
        end = text.index("    )\n", start) + len("    )\n")
        path = tmp_path / "variant.ltm"
        path.write_text(f"{text[:start]}    layer attn = {mixer}\n{text[end:]}")
    assert main(["memory", str(path), "--context", "128K", "--json"]) == 0
    return json.loads(capsys.readouterr().out)["by_kind"]["kv_cache"]


def test_memory_counts_mla_latent_cache_and_readme_comparison(tmp_path, capsys):
    """DeepSeek-V3 at 128K tokens caches 61 layers x (512 + 64) latent values x 2 B per token; the same 128
    heads with ordinary keys (192 channels) and values (128) would cache 61 x 128 x 320 x 2 B, or with 8 KV
    heads 61 x 8 x 320 x 2 B: the numbers of README's table."""
    T = 128_000
    assert _kv_cache_at_128k(tmp_path, capsys, None) == {"mla": 61 * (512 + 64) * 2 * T} == {"mla": 8_994_816_000}
    heads = "heads = 128, head_dim = 192, v_head_dim = 128, rope_theta = 10000.0"
    assert _kv_cache_at_128k(tmp_path, capsys, f"attention({heads}, kv_heads = 128)") == \
        {"attention": 61 * 128 * (192 + 128) * 2 * T} == {"attention": 639_631_360_000}
    assert _kv_cache_at_128k(tmp_path, capsys, f"attention({heads}, kv_heads = 8)") == \
        {"attention": 61 * 8 * (192 + 128) * 2 * T} == {"attention": 39_976_960_000}
    from ltmdsl.cli import main

    assert main(["memory", str(EXAMPLES / "deepseek-v3.ltm"), "--context", "128K"]) == 0
    assert "kv_cache            8.38 GiB    8.99 GB" in capsys.readouterr().out
    readme = (EXAMPLES.parent / "README.md").read_text()
    for row in ("| 576 values | 70,272 B | 8.99 GB |", "| 2,560 values | 312,320 B | 39.98 GB |",
                "| 40,960 values | 4,997,120 B | 639.63 GB |"):
        assert row in readme


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
@pytest.mark.parametrize("change", [{}, {"q_lora_rank": None}, {"first_k_dense_replace": 9},
                                    {"attention_bias": True, "n_shared_experts": 3}],
                         ids=["defaults", "no-q-lora", "all-dense", "bias-3-shared"])
def test_small_configs_count_what_transformers_counts(family, change):
    cfg = {"model_type": family, **_MLA, "num_hidden_layers": 3, "num_experts_per_tok": 2, "n_group": 2,
           "topk_group": 1, **change}
    assert ltmdsl.loads(spec_from_config(cfg)).model.params_total == _meta_count(cfg)


SMALL = {"model_type": "deepseek_v3", **_MLA, "num_hidden_layers": 3, "num_experts_per_tok": 2, "n_group": 2,
         "topk_group": 1, "q_lora_rank": 12, "first_k_dense_replace": 1}


@pytest.mark.parametrize("change, message", [
    ({"num_key_value_heads": 1}, "'num_key_value_heads' = 1 is not supported .*MLA up-projects"),
    ({"head_dim": 8}, "'head_dim' = 8 is not supported .*null or 6"),
    ({"qk_head_dim": 11}, "'qk_head_dim' = 11 is not supported .*null or 12"),
    ({"qk_rope_head_dim": 5}, "'qk_rope_head_dim' must be even"),
    ({"q_lora_rank": 0}, "'q_lora_rank' must be an integer"),
    ({"rope_interleave": False}, "'rope_interleave' = False is not supported"),
    ({"partial_rotary_factor": 0.5}, "'partial_rotary_factor' = 0.5 is not supported"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "'rope_scaling' = .* is not supported"),
    ({"rope_scaling": {"type": "yarn", "original_max_position_embeddings": 8}}, "'rope_scaling.factor' must be stated"),
    ({"rope_scaling": {"type": "yarn", "factor": 0.5, "original_max_position_embeddings": 8}},
     "'rope_scaling.factor' must be a number >= 1"),
    ({"rope_scaling": {"type": "yarn", "factor": 2, "original_max_position_embeddings": 8, "beta_fast": 1,
                       "beta_slow": 2}}, "'rope_scaling.beta_fast' \\(1\\) must be greater"),
    ({"rope_scaling": {"type": "yarn", "factor": 2, "original_max_position_embeddings": 8, "truncate": "no"}},
     "'rope_scaling.truncate' must be true or false"),
    ({"rope_scaling": {"type": "yarn", "factor": 2, "original_max_position_embeddings": 8, "mystery": 1}},
     "not mystery"),
    ({"scoring_func": "softmax"}, "'scoring_func' = 'softmax' is not supported"),
    ({"topk_method": "greedy"}, "'topk_method' = 'greedy' is not supported"),
    ({"n_group": 1, "topk_group": 2}, "'topk_group' \\(2\\) must be 1 when 'n_group' is 1"),
    ({"n_group": 3}, "groups"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok 9 > n_routed_experts 8"),
    ({"num_local_experts": 4}, "'num_local_experts' \\(4\\) disagrees with 'n_routed_experts'"),
    ({"num_mtp_layers": 2}, "'num_mtp_layers' \\(2\\) disagrees"),
    ({"moe_layer_freq": 2}, "'moe_layer_freq' = 2 is not supported"),
    ({"n_shared_experts": -1}, "'n_shared_experts' must be an integer"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"some_new_key": 1}, "some_new_key"),
], ids=lambda v: next(iter(v)) if isinstance(v, dict) else None)
def test_hostile_deepseek_v3_fields_name_the_key(change, message):
    with pytest.raises(HFError, match=message):
        spec_from_config({**SMALL, **change})


@pytest.mark.parametrize("change, message", [
    ({"norm_topk_prob": True}, "'norm_topk_prob' = True is not supported .*never renormalises"),
    ({"topk_method": "noaux_tc"}, "'topk_method' = 'noaux_tc' is not supported"),
    ({"topk_method": "group_limited_greedy"}, "config has no 'n_group'"),
    ({"scoring_func": "sigmoid"}, "'scoring_func' = 'sigmoid' is not supported"),
    ({"mlp_bias": True}, "'mlp_bias' = True is not supported"),
    ({"num_experts_per_tok": None}, "config has no 'num_experts_per_tok'"),
    ({"num_experts": 4}, "'num_experts' \\(4\\) disagrees with 'n_routed_experts'"),
], ids=lambda v: next(iter(v)) if isinstance(v, dict) else None)
def test_hostile_deepseek_v2_fields_name_the_key(change, message):
    with pytest.raises(HFError, match=message):
        spec_from_config({**SMALL, "model_type": "deepseek_v2", "n_group": None, "topk_group": None, **change})


# ---- from_hf and export-hf against transformers ------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_greedy_generation_match_transformers(case, saved):
    torch = pytest.importorskip("torch")
    from helpers import assert_close
    from hf_tiny import greedy_no_cache

    folder, hf = saved(case)
    ours = ltmdsl.from_hf(folder, dtype=torch.float32)
    ids = torch.randint(0, 61, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(ours(ids), hf(ids).logits, 1e-4, f"{case} logits")
    want = greedy_no_cache(hf, ids[:1], 10)
    assert ours.generate(ids[:1], 10).tolist() == want.tolist()  # ours decodes through its latent cache


def test_transformers_generate_agrees(saved):
    """transformers' own cached generate (its cache holds the latent too) equals ours."""
    torch = pytest.importorskip("torch")
    for case in ("v2", "v3"):
        folder, hf = saved(case)
        ids = torch.randint(0, 61, (1, PROMPT), generator=torch.Generator().manual_seed(2))
        want = hf.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
        assert ltmdsl.from_hf(folder).generate(ids, 10).tolist() == want.tolist(), case


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_is_exact(case, saved, tmp_path):
    """HF -> ltmdsl -> HF: the same family, every tensor (the selection bias too) equal, the same logits."""
    torch = pytest.importorskip("torch")
    from hf_tiny import load_hf
    from safetensors.torch import load_file

    from ltmdsl.hf import export_hf

    folder, _ = saved(case)
    out = export_hf(ltmdsl.from_hf(folder), tmp_path / "out", fused=CASES[case][2])
    cfg = json.loads((Path(out) / "config.json").read_text())
    assert cfg["model_type"] == CASES[case][0]
    before = ltmdsl.loads(spec_from_config(json.loads((folder / "config.json").read_text()))).model
    after = ltmdsl.loads(spec_from_config(cfg)).model
    assert [(x.mixer, x.norm) for x in after.layers] == [(x.mixer, x.norm) for x in before.layers]
    original, written = load_file(str(folder / "model.safetensors")), load_file(str(Path(out) / "model.safetensors"))
    original.pop("lm_head.weight", None) if CASES[case][1].get("tie_word_embeddings") else None
    assert sorted(written) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(written[name], tensor), name
    ids = torch.randint(0, 61, (2, PROMPT), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # both loaded alike (the in-memory model may differ in the last bit)
        assert torch.equal(load_hf(out)(ids).logits, load_hf(folder)(ids).logits)


# ---- the multi-token-prediction module in DeepSeek-V3's checkpoint layout ----------------------------------


def _mtp_tensors(case: str, folder, seed: int = 7) -> dict:
    """The tensors DeepSeek-V3 stores for MTP module 1 of a case's checkpoint, as decoder layer n (n =
    num_hidden_layers): that layer's own tensors, drawn by transformers for a model one layer deeper (so in its
    published names, the MoE's selection bias included), enorm, hnorm, eh_proj [d, 2d], shared_head.norm, and the
    copies of the embedding and the head (embed_tokens, shared_head.head)."""
    import torch
    from hf_tiny import randomize
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, kwargs, _ = CASES[case]
    n, d = kwargs["num_hidden_layers"], kwargs["hidden_size"]
    config = AutoConfig.for_model(model_type, **{**kwargs, "num_hidden_layers": n + 1})
    deeper = AutoModelForCausalLM.from_config(config, experts_implementation="eager").float()
    randomize(deeper, seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, b in deeper.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.2 * torch.randn(b.shape, generator=gen))
    deeper.save_pretrained(folder / "deeper")
    layer = f"model.layers.{n}."
    out = {k: v for k, v in load_file(str(folder / "deeper" / "model.safetensors")).items() if k.startswith(layer)}
    main = load_file(str(folder / "model.safetensors"))
    out.update({f"{layer}enorm.weight": 1 + 0.3 * torch.randn(d, generator=gen),
                f"{layer}hnorm.weight": 1 + 0.3 * torch.randn(d, generator=gen),
                f"{layer}eh_proj.weight": torch.randn(d, 2 * d, generator=gen) / (2 * d) ** 0.5,
                f"{layer}shared_head.norm.weight": 1 + 0.3 * torch.randn(d, generator=gen),
                f"{layer}embed_tokens.weight": main["model.embed_tokens.weight"].clone(),
                f"{layer}shared_head.head.weight": main["lm_head.weight"].clone()})
    return out


@pytest.fixture(scope="module")
def with_mtp(saved, tmp_path_factory):
    """The "v3" checkpoint with its MTP module added in DeepSeek's names: (folder, the MTP tensors)."""
    pytest.importorskip("torch")
    import shutil

    from safetensors.torch import load_file, save_file

    folder, _ = saved("v3")
    dest = tmp_path_factory.mktemp("mtp") / "v3_mtp"
    shutil.copytree(folder, dest)
    extra = _mtp_tensors("v3", dest)
    save_file({**load_file(str(dest / "model.safetensors")), **extra}, str(dest / "model.safetensors"),
              metadata={"format": "pt"})
    return dest, extra


def _reference_mtp_logits(main_folder, mtp: dict, ids, order: str = "eh"):
    """DeepSeek-V3's MTP module 1 in float64 from the HF tensors (technical report, section 2.2): h the main
    model's last hidden state after its final norm (transformers' own model), e the embeddings of the next tokens;
    x = eh_proj(cat[RMSNorm_e(e), RMSNorm_h(h)]) (order "eh", DeepSeek's inference code; "he" is the paper's
    equation), then decoder layer n, shared_head.norm and shared_head.head: the layer, norm and head run as
    transformers' own DeepseekV3 modules (a one-layer model given x as inputs_embeds), the rest by hand."""
    import tempfile

    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, kwargs, _ = CASES["v3"]
    n, eps = kwargs["num_hidden_layers"], 1e-6  # DeepseekV3Config's rms_norm_eps
    main = AutoModelForCausalLM.from_pretrained(main_folder, dtype=torch.float64, experts_implementation="eager")
    layer = f"model.layers.{n}."
    t = {k[len(layer):]: v.double() for k, v in mtp.items()}

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    with torch.no_grad():
        h = main.model(ids).last_hidden_state[:, :-1]  # [B, T-1, d]
        e = main.model.embed_tokens(ids)[:, 1:]  # [B, T-1, d]
        halves = [rms(e, t["enorm.weight"]), rms(h, t["hnorm.weight"])]
        x = torch.cat(halves if order == "eh" else halves[::-1], -1) @ t["eh_proj.weight"].T  # [B, T-1, d]
        with tempfile.TemporaryDirectory() as tmp:  # layer n as the only layer (an MoE one) of a 1-layer model
            cfg = AutoConfig.for_model(model_type, **{**kwargs, "num_hidden_layers": 1, "first_k_dense_replace": 0})
            cfg.save_pretrained(tmp)
            own = {"model.layers.0." + k: v for k, v in t.items()
                   if not k.startswith(("enorm", "hnorm", "eh_proj", "shared_head", "embed_tokens"))}
            save_file({**own, "model.norm.weight": t["shared_head.norm.weight"],
                       "model.embed_tokens.weight": t["embed_tokens.weight"],
                       "lm_head.weight": t["shared_head.head.weight"]}, f"{tmp}/model.safetensors",
                      metadata={"format": "pt"})
            block = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float64, experts_implementation="eager")
            return block(inputs_embeds=x).logits  # [B, T-1, V]


def test_mtp_logits_are_deepseek_v3s_from_the_hf_tensors(saved, with_mtp):
    """from_hf loads the MTP module (layer n in DeepSeek's names) into the model's mtp, and model.mtp_logits in
    float64 equals the reference computed from the HF tensors (relative 1e-6, the tolerance against transformers'
    modules in float64: their RoPE cos/sin are computed in float32); the paper's order of the halves gives other
    logits (relative error > 1e-2), so the test tells the two conventions apart."""
    torch = pytest.importorskip("torch")
    from helpers import assert_close, rel_err

    folder, extra = with_mtp
    ours = ltmdsl.from_hf(folder, dtype=torch.float64)
    assert ours.ir.mtp.depth == 1 and [x.kind for x in ours.ir.mtp.block] == ["mla", "moe"]
    assert ours.num_parameters() == ours.ir.params_total + ours.ir.params_mtp
    ids = torch.randint(0, 61, (2, PROMPT), generator=torch.Generator().manual_seed(4))
    want = _reference_mtp_logits(saved("v3")[0], extra, ids)
    with torch.no_grad():
        got = ours.mtp_logits(ids)[0]
    print(f"deepseek_v3 MTP logits: relative error {rel_err(got, want):.2e}")
    assert_close(got, want, 1e-6, "DeepSeek-V3 MTP logits")
    assert rel_err(_reference_mtp_logits(saved("v3")[0], extra, ids, order="he"), want) > 1e-2


def test_mtp_round_trips_exactly(with_mtp, tmp_path):
    """HF -> ltmdsl -> HF: the same tensors under the same names (the MTP layer's included: eh_proj's halves
    swapped back, the embedding and head copies rewritten), bit for bit, and num_nextn_predict_layers 1."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    from ltmdsl.hf.export import export_hf

    folder, _ = with_mtp
    out = export_hf(ltmdsl.from_hf(folder), tmp_path / "out")
    assert json.loads((Path(out) / "config.json").read_text())["num_nextn_predict_layers"] == 1
    before, after = load_file(str(folder / "model.safetensors")), load_file(str(Path(out) / "model.safetensors"))
    assert sorted(after) == sorted(before)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


def test_checkpoint_without_mtp_tensors_builds_no_mtp(saved):
    """transformers' own saves hold no MTP tensors (num_nextn_predict_layers 1 by default): the model is built
    without its mtp modules, and its spec says so."""
    pytest.importorskip("torch")
    model = ltmdsl.from_hf(saved("v3")[0])
    assert model.mtp is None and model.ir.mtp is None
    assert "NOTE: the checkpoint holds no multi-token-prediction tensors (model.layers.4.*)" in model.ir.source_text


@pytest.mark.parametrize("change, message", [
    ("drop:model.layers.4.hnorm.weight", "missing tensor model.layers.4.hnorm.weight"),
    ("zero:model.layers.4.shared_head.head.weight",
     "tensor model.layers.4.shared_head.head.weight is not a copy of lm_head.weight"),
    ("add:model.layers.5.eh_proj.weight", "unexpected tensor model.layers.5.eh_proj.weight"),
], ids=["missing", "copy-differs", "extra-layer"])
def test_mtp_tensors_must_be_whole(with_mtp, tmp_path, change, message):
    """Some MTP tensors but not all: the missing one is named; a head copy that is not the head, or a tensor of a
    layer past the MTP modules: named too."""
    torch = pytest.importorskip("torch")
    import shutil

    from safetensors.torch import load_file, save_file

    folder, _ = with_mtp
    dest = tmp_path / "bad"
    shutil.copytree(folder, dest)
    tensors = load_file(str(dest / "model.safetensors"))
    op, name = change.split(":")
    if op == "drop":
        del tensors[name]
    else:
        tensors[name] = torch.zeros(tensors[name].shape if name in tensors else (36, 72))
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HFError, match=message):
        ltmdsl.from_hf(dest)


def test_mtp_first_dense_inside_the_mtp_layers_is_refused():
    """ltmdsl's mtp modules share one block: first_k_dense_replace between two MTP layers is refused by name."""
    cfg = {**CASES["v3"][1], "model_type": "deepseek_v3", "num_nextn_predict_layers": 2, "first_k_dense_replace": 5}
    with pytest.raises(HFError, match="first_k_dense_replace 5 falls among the multi-token-prediction layers 4 to 5"):
        spec_from_config(cfg)
    dense = ltmdsl.loads(spec_from_config({**cfg, "first_k_dense_replace": 6})).model
    assert [x.kind for x in dense.mtp.block] == ["mla", "mlp"] and dense.mtp.depth == 2


def test_mla_maps_to_deepseek_with_rope_and_to_kimi_linear_without():
    """MLA with RoPE maps to DeepSeek; without RoPE (Kimi-Linear's NoPE MLA) to Kimi-Linear."""
    from ltmdsl.hf.export import config_from_ir

    spec = ("model m {{\n vocab = 64\n d_model = 32\n layer a = mla(heads = 2, kv_lora_rank = 8, qk_nope_head_dim = 4,"
            " qk_rope_head_dim = 4, v_head_dim = 4, rope_theta = {theta})\n layer f = mlp(d_ff = 48)\n"
            " stack {{ repeat 2 {{ a f }} }}\n}}\n")
    ir = ltmdsl.loads(spec.format(theta="10000")).model
    assert config_from_ir(ir)["model_type"] == "deepseek_v2"
    assert config_from_ir(ltmdsl.loads(spec.format(theta="none")).model)["model_type"] == "kimi_linear"


def test_deepseek_v3_mtp_module_counts_apart_from_the_total():
    """DeepSeek-V3 with its one MTP module (`mtp = mtp(depth = 1, mixer = attn, ffn = moe)`): the total stays
    transformers' 671,026,404,352; the module adds 3 norms of 7168, the [7168, 14336] projection and one MLA +
    MoE layer: 11,610,067,968 (docs/LANGUAGE.md)."""
    ir = ltmdsl.load(EXAMPLES / "deepseek-v3.ltm").model
    assert ir.mtp.depth == 1
    d = 7168
    assert ir.params_total == 671_026_404_352
    assert ir.params_mtp == 3 * d + 2 * d * d + ir.layers[-2].params + ir.layers[-1].params == 11_610_067_968
