"""The three checks every Hugging Face family passes on a tiny random checkpoint, shared by the family tests.

`tiny` builds a float32 transformers model with hf_tiny's non-trivial random weights (eager attention and
eager experts, so that odd sizes run); `check_parity` saves it, loads it through `ltmdsl.from_hf` and asks for
logits within 1e-4 relative (fp32) and the same greedy tokens through our cache as transformers' decoding
without a cache and as transformers' own cached `generate`; `check_round_trip` exports that model back and asks
for the same tensors bit for bit and the
same logits from transformers.
"""

from __future__ import annotations

import torch
from hf_tiny import greedy_no_cache, randomize
from helpers import assert_close

import ltmdsl


def tiny(model_type: str, kwargs: dict, seed: int = 0):
    """A float32, eval-mode transformers model of `model_type` with random weights (see hf_tiny.randomize)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **kwargs)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", experts_implementation="eager")
    model = model.float().eval()
    randomize(model, seed)
    return model


def load_hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                experts_implementation="eager").float().eval()


def check_parity(hf, folder, what: str, *, length: int = 19, steps: int = 10, seed: int = 1, **save) -> object:
    """Save `hf` to `folder`, load it with from_hf: logits within 1e-4 relative, greedy tokens equal to
    transformers' decoding without a cache, and 12 greedy tokens after a 9-token prompt equal to transformers'
    own `generate` through its cache (windows, chunks and the temperature's positions cross inside).
    Returns our model."""
    hf.save_pretrained(folder, **save)
    ours = ltmdsl.from_hf(folder)
    vocab = hf.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(seed))  # [B, T]
    with torch.no_grad():
        want, got = hf(ids).logits, ours(ids)  # [B, T, V]
    assert_close(got, want, 1e-4, f"{what} logits")
    assert ours.generate(ids[:1], steps).tolist() == greedy_no_cache(hf, ids[:1], steps).tolist(), what
    prompt = ids[1:, :9]  # [1, 9]
    want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, min_new_tokens=12,
                       do_sample=False, eos_token_id=None, pad_token_id=0)  # the mask: token 0 is no padding
    assert ours.generate(prompt, 12).tolist() == want.tolist(), f"{what}: transformers' cached generate"
    return ours


def check_round_trip(src, out, what: str, centred: tuple[str, ...] = (), **export) -> None:
    """from_hf(src) exported to `out`: the same tensor names and values, and transformers' logits agree.
    Tensors whose names end with one of `centred` are zero-centred weights the runtime holds as 1 + w: exported
    as (1 + w) - 1, their scale 1 + w is bit-identical though w may differ in its last bit."""
    from safetensors.torch import load_file

    from ltmdsl.hf.export import export_hf

    export_hf(ltmdsl.from_hf(src), out, **export)
    before, after = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(before) == sorted(after), what
    for name, tensor in before.items():
        if name.endswith(centred):
            assert torch.equal(1 + tensor, 1 + after[name]), f"{what}: {name}"
            continue
        assert torch.equal(tensor, after[name]), f"{what}: {name}"
    hf, back = load_hf(src), load_hf(out)
    vocab = hf.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(3))  # [B, T]
    with torch.no_grad():
        assert_close(back(ids).logits, hf(ids).logits, 1e-6, f"exported {what} logits")
