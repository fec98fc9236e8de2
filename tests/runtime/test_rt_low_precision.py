"""bf16 and fp16 models against the fp32 model with the same weights.

The fp32 model is the oracle here; each lower precision must agree within bf16 <= 1e-2 and
fp16 <= 5e-3 relative (max-abs over max-abs), for a one-shot forward and for prefill + decode steps, one
kind at a time: every mixer kind of tiny-hybrid alone with an MLP, decoding with fp32 caches (a budget's
`state_dtype = fp32`). The whole tiny-hybrid (24 sub-layers of random weights) decodes with caches in the
model's dtype and compounds rounding through its depth: measured 1.28e-2 in bf16, it is held to twice the
per-kind bounds. A lightning layer keeps its state in fp32 whatever cache dtype is asked for (a bf16 state
reached 1.001e-2 after 10 decode steps here: a decay near 1 makes each token's update smaller than the
state's bf16 rounding; tests/runtime/test_rt_lightning.py shows it), so its decode error with bf16 caches is
its forward's, 8.7e-3.
"""

import pytest
import torch

import ltmdsl
from helpers import assert_close
from paths import EXAMPLES

TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 5e-3}
TINY = ltmdsl.load(EXAMPLES / "tiny-hybrid.ltm")
MIXERS = sorted({layer.definition for layer in TINY.model.layers if not layer.is_ffn})


def one_kind(definition: str):
    """tiny-hybrid's stack reduced to one mixer (and the MLP after it)."""
    text = EXAMPLES.joinpath("tiny-hybrid.ltm").read_text()
    head, _, rest = text.partition("    stack {")
    _, _, tail = rest.partition("    }\n}")
    return ltmdsl.loads(f"{head}    stack {{\n        {definition} ffn\n    }}\n}}{tail}")


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=["bf16", "fp16"])
@pytest.mark.parametrize("definition", MIXERS)
def test_low_precision_matches_fp32_per_kind(definition, dtype):
    check(one_kind(definition), dtype, TOLERANCE[dtype], cache_dtype=torch.float32)


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=["bf16", "fp16"])
def test_lightning_decodes_within_the_bound_with_caches_in_the_model_dtype(dtype):
    check(one_kind("lit"), dtype, TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=["bf16", "fp16"])
def test_low_precision_matches_fp32_whole_stack(dtype):
    check(TINY, dtype, 2 * TOLERANCE[dtype])


def check(spec, dtype, tolerance, cache_dtype=None):
    ids = torch.randint(0, spec.model.vocab, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = ltmdsl.build(spec, dtype=torch.float32, seed=0)(ids)  # [B, T, V]
        model = ltmdsl.build(spec, dtype=dtype, seed=0)
        assert next(model.parameters()).dtype == dtype
        full = model(ids)
        cache = model.new_cache(batch_size=2, max_context=64, dtype=cache_dtype, state_dtype=cache_dtype)
        prefill = model(ids[:, :30], cache=cache)
        steps = [model(ids[:, i:i + 1], cache=cache) for i in range(30, 40)]
    assert full.dtype == dtype
    assert_close(full.float(), ref, tolerance, f"{dtype} forward vs fp32")
    assert_close(torch.cat([prefill, *steps], dim=1).float(), ref, tolerance, f"{dtype} decode vs fp32")
