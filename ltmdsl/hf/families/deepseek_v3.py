"""DeepSeek-V3 (model_type deepseek_v3, transformers' DeepseekV3ForCausalLM): config reader, export writer, layout.

The layout of DeepSeek-V2 (deepseek_v2.py: MLA on every layer, dense SwiGLU MLPs on the first
`first_k_dense_replace`, the MoE with shared experts after) with DeepseekV3Config's defaults and DeepSeek-V3's
router: sigmoid scores, the selection bias `e_score_correction_bias`, groups scored by their two best experts
(ltmdsl/kinds/moe_hf.py).

`num_nextn_predict_layers` (alias `num_mtp_layers`) counts DeepSeek-V3's multi-token-prediction modules, which
transformers' DeepseekV3ForCausalLM does not build: published checkpoints store them as extra decoder layers
after the last one (`model.layers.61.*` for DeepSeek-V3), which transformers skips on load. Import does the
same and says so in a NOTE of the spec; the model's outputs are those of the main stack.
"""

from __future__ import annotations

from ltmdsl.hf.families import deepseek_v2
from ltmdsl.hf.reader import Reader

FAMILY = "deepseek_v3"
ARCH = "DeepseekV3ForCausalLM"


def read(r: Reader) -> dict:
    """DeepSeek-V3 with DeepseekV3Config's defaults."""
    mtp = r.int("num_nextn_predict_layers", 1, minimum=0, maximum=64)
    if r.present("num_mtp_layers") and r.int("num_mtp_layers", minimum=0) != mtp:
        raise r.fail(f"'num_mtp_layers' ({r.cfg['num_mtp_layers']}) disagrees with 'num_nextn_predict_layers' "
                     f"({mtp}); it is an alias")
    r.raw("num_mtp_layers", None)
    fields = deepseek_v2.read_stack(r, 129280, 7168, 61, 3)
    n = len(fields["tokens"])
    if mtp:
        last = n + mtp - 1
        where = f"model.layers.{n}.*" + (f" to model.layers.{last}.*" if mtp > 1 else "")
        r.notes.append(f"num_nextn_predict_layers = {mtp}: the multi-token-prediction module{'s' if mtp > 1 else ''} "
                       f"({where} in the checkpoint) {'are' if mtp > 1 else 'is'} not part of transformers' model "
                       "and not loaded")
    fields["hf"].update(unloaded=[f"model.layers.{i}." for i in range(n, n + mtp)])
    return fields


def claims(ir) -> bool:
    """Whether an MLA stack is DeepSeek-V3's rather than V2's: its experts route with sigmoid scores."""
    return any(layer.kind == "moe" and layer.mixer.score == "sigmoid" for layer in ir.layers)


def config(ir, base: dict, eps: float) -> dict:
    """DeepSeek-V3's config.json fields; no multi-token-prediction module (num_nextn_predict_layers 0)."""
    return {**deepseek_v2.config_stack(ir, base, eps, FAMILY), "num_nextn_predict_layers": 0}
