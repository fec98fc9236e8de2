"""DeepSeek-V3 (model_type deepseek_v3, transformers' DeepseekV3ForCausalLM): config reader, export writer, layout.

The layout of DeepSeek-V2 (deepseek_v2.py: MLA on every layer, dense SwiGLU MLPs on the first
`first_k_dense_replace`, the MoE with shared experts after) with DeepseekV3Config's defaults and DeepSeek-V3's
router: sigmoid scores, the selection bias `e_score_correction_bias`, groups scored by their two best experts
(ltmdsl/kinds/moe_hf.py).

`num_nextn_predict_layers` (alias `num_mtp_layers`) counts DeepSeek-V3's multi-token-prediction modules
(DeepSeek-V3 technical report, section 2.2), which transformers' DeepseekV3ForCausalLM neither builds nor loads:
published checkpoints store module k as the extra decoder layer `model.layers.{num_hidden_layers + k}` (61 for
DeepSeek-V3), holding `enorm`, `hnorm`, `eh_proj`, the usual layer (`input_layernorm`, `self_attn`,
`post_attention_layernorm`, `mlp`), `shared_head.norm` and copies of the embedding and the head
(`embed_tokens`, `shared_head.head`). Import writes them as the language's `mtp = mtp(depth, mixer = attn,
ffn = ...)` (counted apart from the total, which stays transformers'), from_hf loads them where the checkpoint
has them (and builds no module where it has none, as transformers' own saves), and export-hf writes them under
the same names (`MTP_NAMES`; num_nextn_predict_layers = depth).

The halves of eh_proj's input: `eh_proj` is applied to [enorm(embedding) ; hnorm(h)], the embedding first, as
DeepSeek's own MTP inference code in vLLM and SGLang (`deepseek_mtp.py`) and Megatron-LM's MTP layer concatenate
them, which the published weights follow; the paper's equation 21 writes [h ; embedding]. The runtime keeps the
paper's order (`mtp.{k}.proj` over [norm_h(h) ; norm_e(e)]), so its columns are the two halves of eh_proj's
swapped (op `swap_halves`). The h that module 1 takes is the main model's last hidden state after its final norm,
as those implementations pass it.
"""

from __future__ import annotations

from ltmdsl.hf.families import deepseek_v2
from ltmdsl.hf.reader import Reader

FAMILY = "deepseek_v3"
ARCH = "DeepseekV3ForCausalLM"


#: runtime name inside `mtp.{k}.` -> DeepSeek-V3's name inside decoder layer num_hidden_layers + k (the block's
#: norms and sub-layers are named as in any decoder layer)
MTP_NAMES = {"norm_h": "hnorm", "norm_e": "enorm", "proj": "eh_proj", "norm_o": "shared_head.norm"}
#: the copies each MTP layer holds of model-level tensors ltmdsl's modules share: HF name -> runtime name
MTP_COPIES = {"embed_tokens.weight": "embed.weight", "shared_head.head.weight": "lm_head.weight"}


def read(r: Reader) -> dict:
    """DeepSeek-V3 with DeepseekV3Config's defaults."""
    mtp = r.int("num_nextn_predict_layers", 1, minimum=0, maximum=64)
    if r.present("num_mtp_layers") and r.int("num_mtp_layers", minimum=0) != mtp:
        raise r.fail(f"'num_mtp_layers' ({r.cfg['num_mtp_layers']}) disagrees with 'num_nextn_predict_layers' "
                     f"({mtp}); it is an alias")
    r.raw("num_mtp_layers", None)
    return deepseek_v2.read_stack(r, 129280, 7168, 61, 3, mtp=mtp)


def claims(ir) -> bool:
    """Whether an MLA stack is DeepSeek-V3's rather than V2's: its experts route with sigmoid scores."""
    return any(layer.kind == "moe" and layer.mixer.score == "sigmoid" for layer in ir.layers)


def config(ir, base: dict, eps: float) -> dict:
    """DeepSeek-V3's config.json fields of the main model (num_nextn_predict_layers 0: export adds the depth of
    the model's mtp, whose block hf_plan's round trip checks)."""
    return {**deepseek_v2.config_stack(ir, base, eps, FAMILY), "num_nextn_predict_layers": 0}
