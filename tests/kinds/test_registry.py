"""Registry coverage: every kind has every pure facet, each facet works on random small configs, and a
config the registry does not describe is refused loudly (never counted as zero) by memory, compute and show.
Every kind also has a Hugging Face facet or declares explicitly that it has no counterpart."""

import dataclasses
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import sympy

from ltmdsl.commands import show
from ltmdsl.hf import HFError
from ltmdsl.hf.configs import SUPPORTED_FAMILIES
from ltmdsl.hf.export import config_from_ir
from ltmdsl.hf.facet import HFFacet, HFNotMappedYet, NoHFCounterpart, Site, Source
from ltmdsl.ir import LayerConfig, ModelIR, NormConfig, RopeScaling, SourcePos, SubLayer
from ltmdsl.kinds import REGISTRY, CheckError, Kind, KindError, ModelContext, kind_of
from ltmdsl.kinds.base import FACETS, CacheTerm, Flops, Split
from ltmdsl.kinds.hf import HF_REGISTRY, hf_facet
from ltmdsl.memory import cache_bytes, flops, report, resolve
from ltmdsl.memory.activations import MicroBatch
from ltmdsl.memory.compute import FLOP_COMPONENTS
from ltmdsl.memory.symbols import B, C, T
from ltmdsl.units import DTYPES

LANGUAGE_DOC = Path(__file__).resolve().parents[2] / "docs" / "LANGUAGE.md"
POS = SourcePos("test.ltm", 1, 1)
RMS = NormConfig("rmsnorm", 1e-5)
D_MODEL = 64
SEEDS = range(8)
DRAWS = 3000


def random_values(kind: Kind, rng: random.Random) -> dict:
    """Random small values for every parameter of a kind (none for half of the nullable ones)."""
    values = {}
    for p in kind.params:
        if p.nullable and rng.random() < 0.5:
            values[p.name] = None
        elif p.type == "int":
            values[p.name] = rng.randint(int(p.min or 1), 8)
        elif p.type == "float":
            values[p.name] = float(rng.choice([1e4, 5e5]))
        elif p.type == "bool":
            values[p.name] = rng.random() < 0.5
        elif p.type == "enum":
            values[p.name] = rng.choice(p.choices)
        elif p.type == "rope_scaling":
            values[p.name] = RopeScaling("llama3", 8.0, 1.0, 4.0, 1024)
        elif p.type == "norm":  # a norm setting of the kind itself (transformer_block's mid_norm)
            values[p.name] = rng.choice([RMS, NormConfig("layernorm", 1e-5)])
        elif p.type == "layer":  # a parallel layer's branch: a random config of a plain mixer or MLP
            values[p.name] = random_config(REGISTRY[rng.choice(["attention", "mamba2", "short_conv", "mlp"])],
                                           rng.randint(0, 99))
        else:
            raise AssertionError(f"no random value for parameter type {p.type} ({kind.name}.{p.name})")
    return values


def random_config(kind: Kind, seed: int):
    """A config of `kind` built (and checked) from random values; retried until the checks pass (a kind with
    many interlocking checks, moe's grouped routing, passes about one draw in a hundred)."""
    rng = random.Random(seed)
    for _ in range(DRAWS):
        try:
            return kind.build(random_values(kind, rng), ModelContext(D_MODEL, RMS))
        except CheckError:
            continue
    raise AssertionError(f"no valid random {kind.name} config in {DRAWS} draws")


def model_of(*mixers) -> ModelIR:
    layers = tuple(SubLayer(i, f"l{i}", RMS, m, 1000, POS) for i, m in enumerate(mixers))
    return ModelIR("m", 100, D_MODEL, DTYPES["bf16"], RMS, False, layers, POS, "")


def at(expr, t=4096, b=2, c=512) -> sympy.Expr:
    return sympy.sympify(expr).subs({T: t, B: b, C: c})


@pytest.mark.parametrize("name", list(REGISTRY))
def test_kind_declares_every_facet(name):
    kind = REGISTRY[name]
    assert kind.name == name and kind.doc and kind.params
    assert kind.config.__dataclass_params__.frozen
    for facet in FACETS:
        assert callable(getattr(kind, facet)), f"{name} lacks facet {facet}"


@pytest.mark.parametrize("facet", FACETS)
def test_a_kind_cannot_be_registered_without_a_facet(facet):
    attention = REGISTRY["attention"]
    with pytest.raises(TypeError, match=facet):
        dataclasses.replace(attention, **{facet: None})
    fields = {f.name: getattr(attention, f.name) for f in dataclasses.fields(Kind) if f.init}
    del fields[facet]
    with pytest.raises(TypeError, match=facet):
        Kind(**fields)


def test_registry_order_and_kind_names():
    """The registry lists the kinds in documentation order (their `**kind**` paragraphs in docs/LANGUAGE.md),
    the sequence mixers before the feed-forward networks; a new kind adds its paragraph, not a test edit."""
    documented = re.findall(r"^\*\*([a-z0-9_]+)\*\*", LANGUAGE_DOC.read_text(), flags=re.MULTILINE)
    assert [k for k in documented if k in REGISTRY] == list(REGISTRY)
    ffn = [REGISTRY[k].is_ffn for k in REGISTRY]
    assert ffn == sorted(ffn), "sequence mixers come before feed-forward networks"
    for name, kind in REGISTRY.items():
        assert kind.config.__module__ == f"ltmdsl.kinds.{name}"


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}")
@pytest.mark.parametrize("name", list(REGISTRY))
def test_facets_work_on_random_small_configs(name, seed):
    kind = REGISTRY[name]
    c = random_config(kind, seed)
    assert kind_of(c) is kind
    model = model_of(c)
    d = D_MODEL
    params = kind.count(c, d)
    assert isinstance(params, int) and params > 0
    inactive = kind.inactive(c, d)
    assert isinstance(inactive, int) and 0 <= inactive < params
    split = kind.split(c, d)
    assert isinstance(split, Split) and 0 <= split.expert_params <= params
    assert all(n >= 1 for _what, n in split.tp + split.ep)
    check = kind.context_check(c, 10**6)
    assert check is None or isinstance(check, str)
    assert isinstance(kind.dims(c), str) and kind.dims(c)
    for s in (resolve(model, None), resolve(model, None, tp=2, cp=2, gpus=8, flash_attention=False)):
        terms = kind.cache(c, s)
        assert isinstance(terms, tuple)
        for term in terms:
            assert isinstance(term, CacheTerm)
            assert term.component in ("kv_cache", "recurrent_state")
            # the budget's dtypes, or a wider state a kind needs for accuracy (lightning keeps fp32)
            assert term.dtype in (s.kv_dtype, s.state_dtype) or term.dtype.bytes > s.state_dtype.bytes
            assert at(term.bytes) > 0
        assert at(kind.workspace(c, d, s)) > 0
        x = MicroBatch(model, s)
        full, selective = at(kind.stored(c, x, False)), at(kind.stored(c, x, True))
        assert full >= selective > 0
        assert at(kind.backward(c, x)) > 0  # every sub-layer's backward holds its inputs' gradients at least
    for component, f in kind.flops(c).items():
        assert component in FLOP_COMPONENTS and isinstance(f, Flops)
        assert at(f.per_token) > 0 and at(f.prefill) > 0
    # The whole memory model and show run on it, and the cache facet is what cache_bytes reports.
    r = report(model, None, context=4096)
    assert r.per_gpu_bytes > 0
    cached = cache_bytes(model, batch=2, context=4096, kv_dtype="bf16", state_dtype="fp32")
    s = resolve(model, None, batch=2, context=4096, kv_dtype="bf16", state_dtype="fp32")
    for comp in ("kv_cache", "recurrent_state"):
        expect = sum((at(t.bytes) for t in kind.cache(c, s) if t.component == comp), sympy.Integer(0))
        assert cached[comp] == expect
    assert name in show.table(model)


def test_a_cache_term_outside_the_memory_components_is_refused():
    with pytest.raises(ValueError, match="kv_cache, recurrent_state"):
        CacheTerm("state_cache", None, DTYPES["bf16"], sympy.Integer(1))


@dataclass(frozen=True)
class UnregisteredConfig(LayerConfig):
    """A kind nobody registered (as a new mixer would be before its registry line)."""

    width: int
    kind: str = field(default="gated_delta", init=False)


@dataclass(frozen=True)
class ImpostorConfig(LayerConfig):
    """A config claiming a registered kind's name without being that kind's config class."""

    heads: int
    kind: str = field(default="attention", init=False)


@pytest.mark.parametrize("config", [UnregisteredConfig(8), ImpostorConfig(2)], ids=["unknown-kind", "impostor"])
@pytest.mark.parametrize("use", ["report", "training-report", "cache_bytes", "flops", "show", "params_active",
                                 "is_ffn"])
def test_unregistered_config_is_refused_loudly(config, use):
    model = model_of(config)
    calls = {
        "report": lambda: report(model, None, context=1024),
        "training-report": lambda: report(model, None, context=1024, mode="training"),
        "cache_bytes": lambda: cache_bytes(model, batch=1, context=1024, kv_dtype="bf16", state_dtype="bf16"),
        "flops": lambda: flops(model, 1024),
        "show": lambda: show.table(model),
        "params_active": lambda: model.params_active,
        "is_ffn": lambda: model.layers[0].is_ffn,
    }
    with pytest.raises(KindError, match=type(config).__name__):
        calls[use]()


# ---- the Hugging Face facet: every kind has one, or says explicitly that it has no counterpart --------------


def hf_coverage_problem(name: str) -> str | None:
    """Why kind `name` is not covered by the HF registry (None when it is)."""
    facet = HF_REGISTRY.get(name)
    if isinstance(facet, NoHFCounterpart):
        return None if facet.name == name and facet.reason.strip() else f"{name}: a no-counterpart entry needs a reason"
    if isinstance(facet, HFNotMappedYet):
        return None if facet.name == name and facet.model_types else f"{name}: a not-mapped entry names its model types"
    if not isinstance(facet, HFFacet):
        return f"{name} has no HF facet: add ltmdsl/kinds/{name}_hf.py (or NoHFCounterpart) to ltmdsl/kinds/hf.py"
    if facet.name != name:
        return f"{name}: its HF facet is registered as {facet.name!r}"
    unknown = [f for f in facet.families if f not in SUPPORTED_FAMILIES]
    return f"{name}: unknown families {unknown}" if unknown or not facet.families else None


@pytest.mark.parametrize("name", list(REGISTRY))
def test_kind_has_an_hf_facet_or_says_it_has_no_counterpart(name):
    assert hf_coverage_problem(name) is None, hf_coverage_problem(name)


def test_hf_registry_names_only_registered_kinds():
    assert set(HF_REGISTRY) <= set(REGISTRY)


def test_a_kind_without_an_hf_facet_fails_coverage_and_export(monkeypatch):
    """The coverage check above names a kind with no HF entry; export-hf names the layer and the missing facet,
    and a kind that declares no counterpart gives its reason."""
    monkeypatch.delitem(HF_REGISTRY, "mamba")
    assert "mamba has no HF facet" in hf_coverage_problem("mamba")
    model = model_of(random_config(REGISTRY["mamba"], 0))
    with pytest.raises(HFError, match=r"layer 0 'l0': layer kind 'mamba' has no HF facet .*ltmdsl/kinds/mamba_hf.py"):
        config_from_ir(model)
    monkeypatch.setitem(HF_REGISTRY, "mamba", NoHFCounterpart("mamba", "no family has it (for this test)"))
    assert hf_coverage_problem("mamba") is None
    with pytest.raises(HFError, match=r"layer 0 'l0': layer kind 'mamba' has no Hugging Face counterpart: no family"):
        config_from_ir(model)
    monkeypatch.setitem(HF_REGISTRY, "mamba", HFNotMappedYet("mamba", ("mamba",)))
    assert hf_coverage_problem("mamba") is None
    with pytest.raises(HFError, match=r"layer 0 'l0': layer kind 'mamba' has Hugging Face counterparts \(model "
                                      r"types mamba\), but ltmdsl does not map them yet"):
        config_from_ir(model)


def test_an_hf_facet_cannot_be_registered_without_a_function():
    facet = HF_REGISTRY["mlp"]
    with pytest.raises(TypeError, match="lacks write"):
        dataclasses.replace(facet, write=None)
    with pytest.raises(TypeError, match="names no tensor module for llama, .*nemotron_h"):
        dataclasses.replace(facet, modules={})


@pytest.mark.parametrize("seed", SEEDS[:4], ids=lambda s: f"seed{s}")
@pytest.mark.parametrize("name", [k for k, f in HF_REGISTRY.items() if isinstance(f, HFFacet)])
def test_hf_facet_works_on_random_small_configs(name, seed):
    """Every family the facet names: a misfit reason or None, written fields or an HFError (never another
    exception), string traits, and a checkpoint source for each runtime parameter it owns."""
    facet = hf_facet(name)
    c = random_config(REGISTRY[name], seed)
    assert all(isinstance(t, str) for t in facet.traits(c))
    for family in facet.families:
        why = facet.misfit(c, family)
        assert why is None or (isinstance(why, str) and why)
        try:
            fields = facet.write(c, family, D_MODEL)
        except HFError as e:
            assert e.message
        else:
            assert fields and all(isinstance(k, str) for k in fields)
        src = facet.source("router.weight" if name == "moe" else "out_proj.weight",
                           Site(family, "model.layers.3.", None, 4, None))
        assert isinstance(src, Source) and all(n.startswith("model.layers.3.") for n in src.names)
