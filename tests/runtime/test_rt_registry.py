"""The runtime registry covers every layer kind, and each kind's runtime facets agree with the pure side.

For every kind of the pure registry: a runtime entry exists (else the model cannot be built); on random
small configs of that kind, the cache the runtime allocates equals `ltmdsl.memory.cache_bytes(...)` to the
byte, component by component (random batch, context, KV and state dtypes, conv-tap layout); and the
parameter names its module owns are exactly the ones it declares (`RuntimeKind.state_names`). Also: a kind
with no runtime entry is refused at build by name, and stateless kinds allocate no cache entry.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import ltmdsl
from ltmdsl.memory import cache_bytes
from ltmdsl.runtime.build import build
from ltmdsl.runtime.cache import Cache, LayerCache, allocate
from ltmdsl.runtime.kernels import TORCH_KERNELS
from ltmdsl.runtime.kinds import (CP_FORMS, RUNTIME_REGISTRY, ContextParallelInferenceUnsupported, NoRuntimeModule,
                                  RuntimeKind, layer_places, runtime_kind)
from ltmdsl.runtime.kinds.attention import KVCache
from ltmdsl.units import DTYPES

SEEDS = range(6)
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pure_registry() -> dict:
    """The pure (no torch) registry of layer kinds, kind name -> facets."""
    from ltmdsl.kinds import REGISTRY

    return REGISTRY


def load_text(text: str):
    """A loaded spec from spec text (the one place that knows how text is loaded)."""
    return ltmdsl.loads(text)


# -- random small configs, one generator per kind ------------------------------------------------------

def _attention(rng: random.Random, d: int) -> str:
    kv = rng.choice([1, 2, 4])
    args = [f"heads = {kv * rng.choice([1, 2])}", f"kv_heads = {kv}", f"head_dim = {rng.choice([4, 8, 12])}",
            f"v_head_dim = {rng.choice([4, 6, 8])}", f"qkv_bias = {rng.choice(['true', 'false'])}",
            f"out_bias = {rng.choice(['true', 'false'])}", f"qk_norm = {rng.choice(['true', 'false'])}"]
    if rng.random() < 0.5:
        args.append(f"{rng.choice(['window', 'chunk'])} = {rng.randint(1, 40)}")
    if "qk_norm = false" in args and rng.random() < 0.5:
        args.append("qk_l2_norm = true")
    if args[2].split()[-1] == args[3].split()[-1] and rng.random() < 0.5:  # head_dim = v_head_dim
        args.append("gate = true")
    args.append(f"sinks = {rng.choice(['true', 'false'])}")
    if rng.random() < 0.5:
        args.append(f"softcap = {rng.randint(1, 30)}")
    return f"attention({', '.join(args)})"


def _mla(rng: random.Random, d: int) -> str:
    q_lora = rng.choice(["none", "6", "12"])
    return (f"mla(heads = {rng.choice([1, 2, 4])}, q_lora_rank = {q_lora}, kv_lora_rank = {rng.randint(1, 12)}, "
            f"qk_nope_head_dim = {rng.randint(1, 8)}, qk_rope_head_dim = {rng.choice([2, 4, 6])}, "
            f"v_head_dim = {rng.randint(1, 8)}, bias = {rng.choice(['true', 'false'])}, "
            f"rope_theta = {rng.choice(['none', '100'])})")


def _mamba(rng: random.Random, d: int) -> str:
    return (f"mamba(d_state = {rng.randint(1, 9)}, d_conv = {rng.randint(1, 5)}, expand = {rng.randint(1, 3)}, "
            f"dt_rank = {rng.randint(1, 5)}, conv_bias = {rng.choice(['true', 'false'])}, "
            f"proj_bias = {rng.choice(['true', 'false'])}, inner_norms = {rng.choice(['true', 'false'])})")


def _mamba2(rng: random.Random, d: int) -> str:
    head_dim = rng.choice([4, 8, 16])
    return (f"mamba2(d_state = {rng.randint(1, 9)}, head_dim = {head_dim}, n_groups = {rng.choice([1, 2])}, "
            f"expand = 2, d_conv = {rng.randint(1, 5)}, chunk = {rng.choice([4, 8])}, "
            f"conv_bias = {rng.choice(['true', 'false'])}, proj_bias = {rng.choice(['true', 'false'])})")


def _gated_deltanet(rng: random.Random, d: int) -> str:
    key_heads = rng.choice([1, 2])
    return (f"gated_deltanet(key_heads = {key_heads}, value_heads = {key_heads * rng.choice([1, 2, 3])}, "
            f"head_dim = {rng.choice([4, 8])}, v_head_dim = {rng.choice([4, 6, 8])}, d_conv = {rng.randint(1, 5)}, "
            f"conv_bias = {rng.choice(['true', 'false'])}, chunk = {rng.choice([4, 8])})")


def _kda(rng: random.Random, d: int) -> str:
    return (f"kda(heads = {rng.choice([1, 2, 3])}, head_dim = {rng.choice([4, 8])}, d_conv = {rng.randint(1, 5)}, "
            f"conv_bias = {rng.choice(['true', 'false'])}, chunk = {rng.choice([4, 8])})")


def _mlp(rng: random.Random, d: int) -> str:
    act = rng.choice(["swiglu", "geglu", "gelu", "relu2", "relu"])
    return f"mlp(d_ff = {rng.randint(1, 48)}, act = {act}, bias = {rng.choice(['true', 'false'])})"


def _moe(rng: random.Random, d: int) -> str:
    experts = rng.randint(1, 5)
    act = rng.choice(["swiglu", "geglu", "gelu", "relu2", "relu"])
    return f"moe(experts = {experts}, top_k = {rng.randint(1, experts)}, d_ff = {rng.randint(1, 24)}, act = {act})"


def _short_conv(rng: random.Random, d: int) -> str:
    return f"short_conv(kernel = {rng.randint(1, 5)}, bias = {rng.choice(['true', 'false'])})"


def _lightning(rng: random.Random, d: int) -> str:
    return (f"lightning(heads = {rng.choice([1, 2, 4])}, head_dim = {rng.choice([4, 8])}, chunk = {rng.choice([4, 16])}, "
            f"gate = {rng.choice(['true', 'false'])}, depth_decay = {rng.choice(['true', 'false'])})")


def _rg_lru(rng: random.Random, d: int) -> str:
    heads = rng.choice([1, 2, 4])
    return (f"rg_lru(heads = {heads}, width = {heads * rng.choice([2, 4, 8])}, d_conv = {rng.randint(1, 5)}, "
            f"chunk = {rng.choice([4, 64])})")


def _mlstm(rng: random.Random, d: int) -> str:
    heads = rng.choice([1, 2, 4])
    return (f"mlstm(heads = {heads}, qk_dim = {heads * rng.choice([2, 4])}, v_dim = {heads * rng.choice([2, 8])}, "
            f"bias = {rng.choice(['true', 'false'])}, chunk = {rng.choice([4, 64])})")


def _parallel(rng: random.Random, d: int) -> str:
    """Branches `pa` and `pb`, which `random_spec` defines for this kind (random attention / Mamba-2 / MLP)."""
    scales = ", ".join(f"{n} = {rng.choice([1.0, 0.5, 2.0])}" for n in ("a_in", "b_in", "a_out", "b_out"))
    return f"parallel(a = pa, b = pb, {scales})"


def _transformer_block(rng: random.Random, d: int) -> str:
    """Its attention `ta` and MLP `tm`, which `random_spec` defines; half of them read cat[x, embeddings]."""
    rank = rng.choice([0, 2, 4])
    wide = ", input = concat_embed" if rng.random() < 0.5 else ""
    return (f"transformer_block(attn = ta, ffn = tm, adapter_rank = {rank}, out_proj = {rng.choice(['true', 'false'])}"
            f"{wide})")


#: extra definitions a kind's random configs refer to (a parallel layer's branches, a transformer block's parts)
RANDOM_DEFINITIONS = {"parallel": lambda rng, d: f"layer pa = {_attention(rng, d)}\n    layer pb = "
                                                 f"{rng.choice([_mamba2, _mlp, _short_conv])(rng, d)}",
                      "transformer_block": lambda rng, d: f"layer ta = {_attention(rng, d)}\n    layer tm = {_mlp(rng, d)}"}


RANDOM_CONFIGS = {"attention": _attention, "mla": _mla, "mamba": _mamba, "mamba2": _mamba2, "gated_deltanet": _gated_deltanet,
                  "kda": _kda, "short_conv": _short_conv, "lightning": _lightning, "rg_lru": _rg_lru, "mlstm": _mlstm,
                  "mlp": _mlp, "moe": _moe, "parallel": _parallel, "transformer_block": _transformer_block}


def random_spec(kind: str, seed: int) -> str:
    """A small model whose stack has two sub-layers of `kind` (different random configs) around an MLP."""
    if kind not in RANDOM_CONFIGS:
        pytest.fail(f"kind {kind!r} has no random small config in tests/runtime/test_rt_registry.py")
    rng = random.Random(f"{kind}-{seed}")
    d = 32
    gen = RANDOM_CONFIGS[kind]
    extra = RANDOM_DEFINITIONS[kind](rng, d) if kind in RANDOM_DEFINITIONS else ""
    return f"""
model random_{kind} {{
    vocab = 16
    d_model = {d}
    dtype = fp32
    {extra}
    layer a = {gen(rng, d)}
    layer b = {gen(rng, d)}
    layer f = mlp(d_ff = 8)
    stack {{ a f b a }}
}}
"""


KINDS = list(pure_registry())


# -- coverage -------------------------------------------------------------------------------------------

def test_every_kind_has_a_runtime_entry():
    missing = [k for k in pure_registry() if k not in RUNTIME_REGISTRY]
    assert not missing, f"kinds without a runtime entry (runtime/kinds/<kind>.py): {missing}"
    assert list(RUNTIME_REGISTRY) == list(pure_registry()), "runtime registry keys/order differ from the pure one"
    for name, entry in RUNTIME_REGISTRY.items():
        assert isinstance(entry, RuntimeKind) and entry.name == name
        assert entry.module.__module__ == f"ltmdsl.runtime.kinds.{name}", "a kind's module lives in its own file"


def test_every_random_config_generator_is_a_registered_kind():
    assert set(RANDOM_CONFIGS) == set(pure_registry())


def test_torch_kernels_hold_every_declared_op():
    for entry in RUNTIME_REGISTRY.values():
        for op, fn in entry.ops.items():
            assert TORCH_KERNELS[op] is fn, f"{entry.name}: op {op!r} is not its declared reference"


# -- cache bytes against the memory model ---------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}")
@pytest.mark.parametrize("kind", KINDS)
def test_random_config_cache_bytes_equal_memory_model(kind, seed):
    ir = load_text(random_spec(kind, seed)).model
    assert kind in {layer.kind for layer in ir.layers}
    rng = random.Random(f"cache-{kind}-{seed}")
    batch, context = rng.randint(1, 3), rng.choice([1, 5, 17, 64])
    kv_name, state_name = rng.choice(list(TORCH_DTYPES)), rng.choice(list(TORCH_DTYPES))
    taps = rng.choice(["full", "minus_one"])
    model = build(ir, init=False)
    cache = model.new_cache(batch, context, dtype=TORCH_DTYPES[kv_name], conv_taps=taps,
                            state_dtype=TORCH_DTYPES[state_name])
    predicted = cache_bytes(ir, batch=batch, context=context, kv_dtype=DTYPES[kv_name],
                            state_dtype=DTYPES[state_name], conv_taps=taps)
    assert cache.breakdown() == predicted
    assert cache.nbytes() == sum(predicted.values())
    assert len(cache.layers) == len(ir.layers)
    for layer, entry in zip(ir.layers, cache.layers):
        stateless = runtime_kind(layer.kind).new_cache is None
        assert (entry is None) == stateless, f"{layer.kind}: cache entry {entry!r}"


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}")
@pytest.mark.parametrize("kind", KINDS)
def test_context_parallel_inference_form_agrees_with_the_cache(kind, seed):
    """ltmdsl.distributed.cp_inference trusts the form: "local" keeps no cache, "passed" a state it can
    broadcast, "sharded" a KVCache it splits by position."""
    ir = load_text(random_spec(kind, seed)).model
    cache = build(ir, init=False).new_cache(1, 8)
    for layer, entry in zip(ir.layers, cache.layers):
        of = runtime_kind(layer.kind).cp_inference
        if of is None:
            continue
        try:
            form = of(layer.mixer)
        except ContextParallelInferenceUnsupported:
            continue
        assert form in CP_FORMS, f"{layer.kind}: {form!r}"
        expected = {"local": lambda e: e is None, "passed": lambda e: e is not None and not isinstance(e, KVCache),
                    "sharded": lambda e: isinstance(e, KVCache)}[form]
        assert expected(entry), f"{layer.kind}: form {form!r} with cache entry {type(entry).__name__}"


# -- parameter names -----------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}")
@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_keys_equal_declared_names(kind, seed):
    ir = load_text(random_spec(kind, seed)).model
    model = build(ir, init=False)
    keys = set(model.state_dict())
    for i, layer in enumerate(ir.layers):
        prefix = f"layers.{i}.mixer."
        got = sorted(k[len(prefix):] for k in keys if k.startswith(prefix))
        declared = runtime_kind(layer.kind).state_names(layer.mixer)
        assert len(set(declared)) == len(declared), f"{layer.kind}: duplicate declared names"
        assert got == sorted(declared), f"{layer.kind} sub-layer {i}"


@pytest.mark.parametrize("kind", KINDS)
def test_module_alone_owns_exactly_its_declared_names(kind):
    entry = runtime_kind(kind)
    for seed in SEEDS:
        ir = load_text(random_spec(kind, seed)).model
        for layer, place in zip(ir.layers, layer_places(ir.layers)):
            if layer.kind == kind:
                extra = {"place": place} if entry.placed else {}
                module = entry.build(layer.mixer, ir.d_model, layer.norm.eps, TORCH_KERNELS, **extra)
                assert isinstance(module, entry.module)
                assert sorted(module.state_dict()) == sorted(entry.state_names(layer.mixer))


# -- refusals -------------------------------------------------------------------------------------------

def test_kind_without_runtime_entry_is_refused_by_name(monkeypatch):
    from ltmdsl.runtime import kinds

    ir = load_text(random_spec("mamba", 0)).model
    monkeypatch.setattr(kinds, "RUNTIME_REGISTRY", {k: v for k, v in RUNTIME_REGISTRY.items() if k != "mamba"})
    with pytest.raises(NoRuntimeModule, match="'mamba' has no runtime module"):
        build(ir)
    with pytest.raises(NoRuntimeModule, match="'mamba' has no runtime module"):
        allocate(ir, batch_size=1, max_context=4, kv_dtype=torch.float32, state_dtype=torch.float32)


def test_cache_refuses_an_entry_with_an_unknown_component():
    @dataclass
    class Odd(LayerCache):
        component: ClassVar[str] = "scratch"
        t: torch.Tensor

        def tensors(self):
            return (self.t,)

    with pytest.raises(ValueError, match="component must be one of"):
        Cache([Odd(torch.zeros(2))], 1, 1)
