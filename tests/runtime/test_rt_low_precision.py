"""bf16 and fp16 models against the fp32 model with the same weights.

The fp32 model is the oracle here; each lower precision must agree within bf16 <= 1e-2 and
fp16 <= 5e-3 relative (max-abs over max-abs), for a one-shot forward and for prefill + decode steps.
"""

import pytest
import torch

import ltmdsl
from helpers import assert_close
from paths import EXAMPLES

TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 5e-3}


@pytest.fixture(scope="module")
def spec():
    return ltmdsl.load(EXAMPLES / "tiny-hybrid.ltm")


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=["bf16", "fp16"])
def test_low_precision_matches_fp32(spec, dtype):
    ids = torch.randint(0, spec.model.vocab, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = ltmdsl.build(spec, dtype=torch.float32, seed=0)(ids)  # [B, T, V]
        model = ltmdsl.build(spec, dtype=dtype, seed=0)
        assert next(model.parameters()).dtype == dtype
        full = model(ids)
        cache = model.new_cache(batch_size=2, max_context=64)
        prefill = model(ids[:, :30], cache=cache)
        steps = [model(ids[:, i:i + 1], cache=cache) for i in range(30, 40)]
    assert full.dtype == dtype
    assert_close(full.float(), ref, TOLERANCE[dtype], f"{dtype} forward vs fp32")
    assert_close(torch.cat([prefill, *steps], dim=1).float(), ref, TOLERANCE[dtype], f"{dtype} decode vs fp32")
