"""Tiny random Hugging Face models of every supported family, built and saved locally (nothing downloads).

Sizes are odd on purpose (d_model 36, vocab 61, d_ff 50, GQA 3:1 and 2:1, windows shorter than the prompt)
and weights have non-trivial scale: norms around 1 +- 0.3, biases +- 0.3, A_log ~ N(0, 0.5), matrices with
unit-variance outputs, so a wrong name, transpose or routing rule shows up in the logits.
"""

from __future__ import annotations

import torch

COMMON = dict(vocab_size=61, hidden_size=36, intermediate_size=50)
ATTN = dict(num_attention_heads=6, num_key_value_heads=2)

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 4.0, "low_freq_factor": 0.5,
               "high_freq_factor": 2.0, "original_max_position_embeddings": 16}

#: case id -> (model_type, config kwargs, save fused experts?)
CASES = {
    "llama": ("llama", {**COMMON, **ATTN, "num_hidden_layers": 3, "rope_theta": 500.0}, False),
    # Llama 3.1's rope scaling at toy size, in transformers 5's rope_parameters form: head_dim 10 and theta 500
    # give wavelengths 6.3, 21.8, 75, 262, 908 tokens; ctx 16 with factors 0.5 / 2 (thresholds 32 and 8) puts
    # them in the kept, interpolated and divided bands, and prompts of 40 tokens run past ctx.
    "llama3_rope": ("llama", {**COMMON, **ATTN, "num_hidden_layers": 2, "head_dim": 10, "max_position_embeddings": 64,
                              "rope_parameters": LLAMA3_ROPE}, False),
    "llama_bias": ("llama", {**COMMON, **ATTN, "num_hidden_layers": 2, "attention_bias": True, "mlp_bias": True,
                             "head_dim": 10}, False),
    "mistral": ("mistral", {**COMMON, **ATTN, "num_hidden_layers": 3, "sliding_window": 5, "head_dim": 10}, False),
    "mixtral": ("mixtral", {**COMMON, "num_attention_heads": 6, "num_key_value_heads": 3, "num_hidden_layers": 3,
                            "num_local_experts": 5, "num_experts_per_tok": 2}, False),
    "mixtral_fused": ("mixtral", {**COMMON, "num_attention_heads": 6, "num_key_value_heads": 3,
                                  "num_hidden_layers": 2, "num_local_experts": 4, "num_experts_per_tok": 3}, True),
    "qwen2": ("qwen2", {**COMMON, **ATTN, "num_hidden_layers": 4, "use_sliding_window": True, "sliding_window": 4,
                        "max_window_layers": 2}, False),
    "qwen3": ("qwen3", {**COMMON, "num_attention_heads": 6, "num_key_value_heads": 3, "num_hidden_layers": 3,
                        "head_dim": 10, "tie_word_embeddings": True}, False),
    "mamba": ("mamba", {"vocab_size": 61, "hidden_size": 36, "num_hidden_layers": 3, "state_size": 6,
                        "conv_kernel": 3, "time_step_rank": 5}, False),
    "mamba2": ("mamba2", {"vocab_size": 61, "hidden_size": 36, "num_hidden_layers": 3, "state_size": 6,
                          "conv_kernel": 3, "num_heads": 6, "head_dim": 12, "n_groups": 2, "chunk_size": 8}, False),
    "jamba": ("jamba", {**COMMON, **ATTN, "num_hidden_layers": 4, "num_experts": 5, "num_experts_per_tok": 2,
                        "attn_layer_period": 3, "attn_layer_offset": 1, "expert_layer_period": 2,
                        "expert_layer_offset": 0, "mamba_dt_rank": 7, "mamba_d_state": 6, "mamba_d_conv": 3}, False),
    "jamba_fused": ("jamba", {**COMMON, **ATTN, "num_hidden_layers": 2, "num_experts": 3, "num_experts_per_tok": 2,
                              "attn_layer_period": 2, "attn_layer_offset": 0, "expert_layer_period": 2,
                              "expert_layer_offset": 1, "mamba_dt_rank": 4, "mamba_d_state": 5}, True),
    "nemotron_h": ("nemotron_h", {**COMMON, **ATTN, "hybrid_override_pattern": "M*-M-*", "head_dim": 8,
                                  "mamba_num_heads": 6, "mamba_head_dim": 12, "n_groups": 2, "ssm_state_size": 6,
                                  "conv_kernel": 3, "chunk_size": 8}, False),
    # Nemotron-3 (Nemotron-H with MoE): Mamba-2 with an inner width (6 heads of 8 = 48) that is not 2 * 36, MoE of
    # 6 relu2 experts in 2 groups (top 1 group by its two best sigmoid scores plus the selection bias, then top 2,
    # renormalised, times 1.5) with a relu2 shared expert of 10, beside a dense relu2 MLP and attention.
    "nemotron_h_moe": ("nemotron_h", {**COMMON, **ATTN, "hybrid_override_pattern": "ME*-ME", "head_dim": 8,
                                      "mamba_num_heads": 6, "mamba_head_dim": 8, "n_groups": 2, "ssm_state_size": 6,
                                      "conv_kernel": 3, "chunk_size": 8, "n_routed_experts": 6,
                                      "num_experts_per_tok": 2, "moe_intermediate_size": 14,
                                      "moe_shared_expert_intermediate_size": 10, "n_group": 2, "topk_group": 1,
                                      "routed_scaling_factor": 1.5}, False),
    # Granite-4.0-H: Mamba-2 (2 groups) and attention without RoPE (GQA 3:1), each followed by 5 SwiGLU experts
    # (softmax over the top 2 logits) plus the shared MLP of 20; muP scales on the embeddings (3), every residual
    # branch (0.5), the attention scores (0.3, not head_dim^-1/2) and the logits (divided by 4); published layout
    # (block_sparse_moe.input_linear); granitemoehybrid_fused: transformers 5's layout (experts.gate_up_proj), RoPE,
    # biases, tied embeddings; granitemoehybrid_dense: no experts (the shared MLP alone), every layer attention.
    "granitemoehybrid": ("granitemoehybrid", {**COMMON, **ATTN, "num_hidden_layers": 4,
                                              "layer_types": ["mamba", "attention", "mamba", "mamba"],
                                              "num_local_experts": 5, "num_experts_per_tok": 2, "intermediate_size": 14,
                                              "shared_intermediate_size": 20, "mamba_n_heads": 6, "mamba_n_groups": 2,
                                              "mamba_d_state": 6, "mamba_d_conv": 3, "mamba_chunk_size": 8,
                                              "embedding_multiplier": 3.0, "residual_multiplier": 0.5,
                                              "logits_scaling": 4.0, "attention_multiplier": 0.3,
                                              "position_embedding_type": "nope"}, False),
    "granitemoehybrid_fused": ("granitemoehybrid", {**COMMON, "num_attention_heads": 3, "num_key_value_heads": 3,
                                                    "num_hidden_layers": 3,
                                                    "layer_types": ["attention", "mamba", "attention"],
                                                    "num_local_experts": 4, "num_experts_per_tok": 3,
                                                    "intermediate_size": 10, "shared_intermediate_size": 12,
                                                    "mamba_n_heads": 4, "mamba_d_state": 5, "mamba_chunk_size": 16,
                                                    "embedding_multiplier": 12.0, "residual_multiplier": 0.22,
                                                    "logits_scaling": 3.0, "attention_multiplier": 0.125,
                                                    "position_embedding_type": "rope", "attention_bias": True,
                                                    "tie_word_embeddings": True,
                                                    "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}},
                               True),
    "granitemoehybrid_dense": ("granitemoehybrid", {**COMMON, **ATTN, "num_hidden_layers": 2,
                                                    "layer_types": ["attention", "attention"], "num_local_experts": 0,
                                                    "shared_intermediate_size": 24, "residual_multiplier": 0.7,
                                                    "mamba_n_heads": 4,  # checked by the config class, unused
                                                    "attention_multiplier": 0.2}, False),
    # LFM2: short convolutions (3 taps) and attention with q/k RMSNorm at 0-based layers 1 and 3 of 5; d_ff 50 is
    # written as is (block_auto_adjust_ff_dim false); lfm2_adjusted sizes its MLP as Lfm2MLP does (2/3 of 90,
    # times 1.5, rounded up to a multiple of 16: 96) with conv biases, 4 taps, untied embeddings, head_dim 12.
    "lfm2": ("lfm2", {**COMMON, **ATTN, "num_hidden_layers": 5, "layer_types": ["conv", "full_attention", "conv",
                                                                                "full_attention", "conv"],
                      "block_auto_adjust_ff_dim": False, "rope_parameters": {"rope_type": "default",
                                                                              "rope_theta": 500.0}}, False),
    "lfm2_adjusted": ("lfm2", {"vocab_size": 61, "hidden_size": 36, "intermediate_size": 90, "num_hidden_layers": 3,
                               "num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": 12,
                               "full_attn_idxs": [2], "conv_L_cache": 4, "conv_bias": True,
                               "block_ffn_dim_multiplier": 1.5, "block_multiple_of": 16,
                               "tie_word_embeddings": False}, False),
    # RecurrentGemma: R R L R (block_types' default), d 48 so that the embedding scale sqrt(48) rounds in bf16
    # (6.9375), RoPE on 6 of 12 channels, a window of 5, a soft cap of 3 that random logits reach, zero-centred
    # norms; recurrent_gemma_exact: exact GELU, q/k/v biases, MHA, (recurrent, attention) blocks, untied.
    "recurrent_gemma": ("recurrent_gemma", {"vocab_size": 61, "hidden_size": 48, "intermediate_size": 100,
                                            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 1,
                                            "attention_window_size": 5, "conv1d_width": 3, "logits_soft_cap": 3.0},
                        False),
    "recurrent_gemma_exact": ("recurrent_gemma", {"vocab_size": 61, "hidden_size": 40, "intermediate_size": 60,
                                                  "num_hidden_layers": 3, "num_attention_heads": 2,
                                                  "lru_width": 24, "block_types": ["recurrent", "attention"],
                                                  "attention_window_size": 4, "attention_bias": True,
                                                  "hidden_activation": "gelu", "tie_word_embeddings": False,
                                                  "rope_parameters": {"rope_type": "default", "rope_theta": 300.0,
                                                                      "partial_rotary_factor": 0.5}}, False),
    # Bamba: attention at 0-based layers 1 and 3 of 5; head_dim 12 (not d / heads), so BambaConfig's forced
    # partial_rotary_factor 0.5 rotates 6 channels (3 frequency pairs); Mamba-2 with 2 groups, chunks of 8.
    "bamba": ("bamba", {**COMMON, **ATTN, "num_hidden_layers": 5, "attn_layer_indices": [1, 3], "head_dim": 12,
                        "mamba_n_heads": 6, "mamba_d_head": 12, "mamba_n_groups": 2, "mamba_d_state": 6,
                        "mamba_d_conv": 3, "mamba_chunk_size": 8}, False),
    # Bamba with its own factor in rope_parameters (0.25 of head_dim 16: 4 channels) and Llama 3.1's scaling
    # (prompts of 40 tokens run past the original context of 16), biases, tied embeddings, MHA.
    "bamba_rope": ("bamba", {**COMMON, "num_attention_heads": 3, "num_key_value_heads": 3, "num_hidden_layers": 3,
                             "attn_layer_indices": [0, 2], "head_dim": 16, "attention_bias": True, "mlp_bias": True,
                             "tie_word_embeddings": True, "mamba_n_heads": 4, "mamba_n_groups": 1,
                             "mamba_d_state": 5, "mamba_chunk_size": 16, "max_position_embeddings": 64,
                             "rope_parameters": {**LLAMA3_ROPE, "partial_rotary_factor": 0.25}}, False),
    # Qwen3-Next: Gated DeltaNet (2 key heads of 8, 4 value heads of 6, conv of 3) and gated attention with RoPE
    # on half of head_dim 12, in the order layer_types gives; MoE (5 experts, top 2, renormalised, gated shared
    # expert of 10) everywhere but mlp_only_layers [2], which has the dense MLP of 50; per-expert tensors.
    "qwen3_next": ("qwen3_next", {**COMMON, **ATTN, "num_hidden_layers": 4, "head_dim": 12,
                                  "layer_types": ["linear_attention", "full_attention", "linear_attention",
                                                  "full_attention"],
                                  "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8,
                                  "linear_value_head_dim": 6, "linear_conv_kernel_dim": 3, "num_experts": 5,
                                  "num_experts_per_tok": 2, "moe_intermediate_size": 14,
                                  "shared_expert_intermediate_size": 10, "mlp_only_layers": [2],
                                  "partial_rotary_factor": 0.5, "rope_theta": 500.0}, False),
    # Qwen3-Next from full_attention_interval 3 (attention on 0-based layer 2), top-k without renormalising,
    # Hv = Hk, RoPE on a quarter of head_dim 16 (the default factor), fused experts.
    "qwen3_next_fused": ("qwen3_next", {**COMMON, "num_attention_heads": 3, "num_key_value_heads": 1,
                                        "num_hidden_layers": 3, "head_dim": 16, "full_attention_interval": 3,
                                        "linear_num_key_heads": 3, "linear_num_value_heads": 3,
                                        "linear_key_head_dim": 6, "linear_value_head_dim": 10,
                                        "linear_conv_kernel_dim": 4, "num_experts": 4, "num_experts_per_tok": 3,
                                        "norm_topk_prob": False, "moe_intermediate_size": 12,
                                        "shared_expert_intermediate_size": 8, "rope_theta": 300.0}, True),
    # Qwen3-Next with attention biases (q_proj's bias interleaves queries and gates as its weight does), tied
    # embeddings, and the rotary factor inside transformers 5's rope_parameters (half of head_dim 16).
    "qwen3_next_bias": ("qwen3_next", {**COMMON, "num_attention_heads": 3, "num_key_value_heads": 1,
                                       "num_hidden_layers": 2, "head_dim": 16, "full_attention_interval": 2,
                                       "attention_bias": True, "tie_word_embeddings": True,
                                       "rope_parameters": {"rope_type": "default", "rope_theta": 300.0,
                                                           "partial_rotary_factor": 0.5},
                                       "linear_num_key_heads": 1, "linear_num_value_heads": 2,
                                       "linear_key_head_dim": 8, "linear_value_head_dim": 6, "num_experts": 3,
                                       "num_experts_per_tok": 1, "moe_intermediate_size": 10,
                                       "shared_expert_intermediate_size": 6}, False),
    # MiniMax: lightning (blocks of 8, shorter than the prompt) and GQA attention in the order layer_types gives,
    # each followed by Mixtral's MoE (5 experts, top 2); residuals after the norms, every factor off 1.
    "minimax": ("minimax", {**COMMON, **ATTN, "num_hidden_layers": 4, "block_size": 8, "num_local_experts": 5,
                            "num_experts_per_tok": 2, "rope_theta": 500.0,
                            "layer_types": ["linear_attention", "full_attention", "linear_attention",
                                            "linear_attention"],
                            "linear_attn_alpha_factor": 1.6, "linear_attn_beta_factor": 0.7,
                            "full_attn_alpha_factor": 1.3, "full_attn_beta_factor": 1.2, "mlp_alpha_factor": 1.4,
                            "mlp_beta_factor": 0.8}, False),
    # MiniMax with MiniMaxConfig's default alternation (full attention first), head_dim 12 (not d / heads), MQA,
    # a sliding window of 5 (shorter than the prompt), blocks of 4, the default factors (1), fused experts.
    "minimax_fused": ("minimax", {**COMMON, "num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": 12,
                                  "num_hidden_layers": 3, "block_size": 4, "num_local_experts": 4,
                                  "num_experts_per_tok": 3, "sliding_window": 5}, True),
}


def randomize(model, seed: int = 0) -> None:
    """Non-trivial weights (see the module docstring), deterministic for a seed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 1 and ("norm" in name or name.endswith(".D")):
                p.copy_(1 + 0.3 * noise)
            elif name.endswith("A_log"):
                p.copy_(0.5 * noise)
            elif p.dim() == 1:
                p.copy_(0.3 * noise)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # selection bias: a buffer, but a weight of the model
                b.copy_(0.3 * torch.randn(b.shape, generator=gen))


def hf_model(model_type: str, kwargs: dict, seed: int = 0):
    """A float32 transformers model of the family with random weights (eager experts: odd sizes)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **kwargs)
    extra = {"experts_implementation": "eager"} if model_type in ("mixtral", "jamba", "qwen3_next", "nemotron_h",
                                                                       "granitemoehybrid", "minimax") else {}
    model = AutoModelForCausalLM.from_config(cfg, **extra).float().eval()
    randomize(model, seed)
    return model


def save_case(case: str, folder, seed: int = 0, **save_kwargs):
    """Build, randomise and save one case; returns the in-memory transformers model."""
    model_type, kwargs, fused = CASES[case]
    model = hf_model(model_type, kwargs, seed)
    model.save_pretrained(folder, save_original_format=not fused, **save_kwargs)
    return model


def load_hf(folder):
    """A saved folder back through transformers (eager experts)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, experts_implementation="eager").float().eval()


def greedy_no_cache(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """The plainest greedy decoding: re-run the whole sequence for every token (no cache anywhere)."""
    seq = ids
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq
