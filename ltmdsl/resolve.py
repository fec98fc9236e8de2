"""Syntax tree to IR for models: scopes, layer definitions, stack expansion, overrides and shared blocks.

All problems are collected in a `Reporter` so that one run shows every error. A definition that fails
is reported once, at its definition, not at each of its uses.
"""

from __future__ import annotations

import contextlib

from dataclasses import dataclass
from typing import Any

from ltmdsl import ast
from ltmdsl.errors import Reporter
from ltmdsl.evaluate import (
    ROPE_SCALINGS, EvalError, MTPValue, NormValue, Scope, Word, as_int, describe, did_you_mean, evaluate,
    rope_scaling_usage,
)
from ltmdsl.ir import Dtype, ModelIR, MTPConfig, NormConfig, Residual, RopeScaling, SourcePos, SubLayer
from ltmdsl.kinds import (
    NORM_PARAM, POST_NORM_PARAM, REGISTRY, RESIDUAL_PARAMS, CheckError, Kind, ModelContext, Param,
)
from ltmdsl.units import DTYPE_ALIASES, DTYPES, dtype as lookup_dtype

MAX_SUBLAYERS = 100_000
MODEL_SETTINGS = ("vocab", "d_model", "dtype", "norm", "head", "embed_scale", "residual_scale", "logit_scale",
                  "logit_cap", "mtp")
#: Model-level scalars (ModelIR): name -> default; a number > 0 each (logit_cap: none = no cap).
MODEL_SCALARS = {"embed_scale": 1.0, "residual_scale": 1.0, "logit_scale": 1.0, "logit_cap": None}
DEFAULT_NORM = NormConfig("rmsnorm", 1e-5)
#: The parameters every layer takes besides its kind's own: its norms and its residual connection.
SUBLAYER_PARAMS = {p.name: p for p in (NORM_PARAM, POST_NORM_PARAM, *RESIDUAL_PARAMS)}
ROPE_SCALING_USAGE = "llama3(...), linear(...), dynamic(...), yarn(...) or longrope(...)"


@dataclass
class Globals:
    """Top-level definitions visible to every model of a load: from this file and the files it uses."""

    scope: Scope
    layers: dict[str, ast.LayerDef]
    blocks: dict[str, ast.BlockDef]
    local_files: set[str]  # files whose unused definitions deserve a warning


class _Unresolved(Exception):
    """A layer definition already reported as broken; its uses are skipped silently."""


def coerce(value: Any, p: Param, pos: SourcePos, scope: Scope, owner: str) -> Any:
    """Check and convert one parameter value against its declared type; raises EvalError."""
    what = f"{p.name} of {owner}"
    if value is None:
        if p.nullable:
            return None
        raise EvalError(pos, f"{what} cannot be none")
    if p.type == "rope_scaling" and isinstance(value, Word) and value.name in ROPE_SCALINGS:
        raise EvalError(value.pos, f"{what}: {value.name} needs its parameters: {rope_scaling_usage(value.name)}")
    if isinstance(value, Word) and p.type != "enum":
        raise EvalError(value.pos, f"unknown name '{value.name}'{did_you_mean(value.name, scope.names())}")
    if p.type == "int":
        return as_int(value, pos, what, int(p.min) if p.min is not None else None)
    if p.type == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EvalError(pos, f"{what} must be a number, got {describe(value)}")
        if p.min is not None and value < p.min:
            raise EvalError(pos, f"{what} must be positive, got {value}")
        return float(value)
    if p.type == "bool":
        if not isinstance(value, bool):
            raise EvalError(pos, f"{what} must be true or false, got {describe(value)}")
        return value
    if p.type == "enum":
        if not isinstance(value, Word) or value.name not in p.choices:
            got = value.name if isinstance(value, Word) else describe(value)
            raise EvalError(pos, f"{what} must be one of {', '.join(p.choices)}; got '{got}'"
                            f"{did_you_mean(got, p.choices)}")
        return value.name
    if p.type == "norm":
        if isinstance(value, Word) and value.name in ("rmsnorm", "layernorm"):
            return NormConfig(value.name, 1e-5)
        if not isinstance(value, NormValue):
            raise EvalError(pos, f"{what} must be rmsnorm(eps = ...) or layernorm(eps = ...), got {describe(value)}")
        return NormConfig(value.kind, value.eps, value.zero_centred)
    if p.type == "rope_scaling":  # the call was already checked when it was evaluated (evaluate._rope_scaling)
        if not isinstance(value, RopeScaling):
            raise EvalError(pos, f"{what} must be {ROPE_SCALING_USAGE} or none, got {describe(value)}")
        return value
    raise AssertionError(p.type)  # pragma: no cover


class ModelResolver:
    """Resolves one `model` block into a ModelIR, reporting problems to `rep`."""

    def __init__(self, node: ast.ModelDef, g: Globals, rep: Reporter, source_hash: str, source_text: str):
        self.node, self.g, self.rep = node, g, rep
        self.source_hash, self.source_text = source_hash, source_text
        assigns: dict[str, ast.Expr] = {}
        self.layer_defs: dict[str, ast.LayerDef] = {}
        self.block_defs: dict[str, ast.BlockDef] = {}
        self.legend: dict[str, tuple[str, SourcePos]] = {}
        self.bad_symbols: set[str] = set()  # legend symbols already reported as broken
        self.stacks: list[ast.Stack] = []
        self.overrides: list[ast.Override] = []
        self.assign_pos: dict[str, SourcePos] = {}
        for stmt in node.body:
            self._collect(stmt, assigns)
        self.scope = Scope(assigns, parent=g.scope)
        self._built: dict[tuple, tuple[Any, NormConfig, int]] = {}
        self._broken: set[str] = set()
        self.used_defs: set[str] = set()

    # ---- collection ---------------------------------------------------------------------------

    def _dup(self, kind: str, name: str, pos: SourcePos, seen: dict) -> bool:
        if name in seen:
            first = seen[name].pos if hasattr(seen[name], "pos") else seen[name]
            self.rep.at(pos, f"duplicate {kind} '{name}' (first defined at line {first.line})")
            return True
        return False

    def _collect(self, stmt: Any, assigns: dict[str, ast.Expr]) -> None:
        if isinstance(stmt, ast.Assign):
            if not self._dup("setting", stmt.name, stmt.pos, self.assign_pos):
                assigns[stmt.name] = stmt.value
                self.assign_pos[stmt.name] = stmt.pos
        elif isinstance(stmt, ast.LayerDef):
            if not self._dup("layer", stmt.name, stmt.pos, {**self.layer_defs, **self.block_defs}):
                self.layer_defs[stmt.name] = stmt
        elif isinstance(stmt, ast.BlockDef):
            if not self._dup("block", stmt.name, stmt.pos, {**self.layer_defs, **self.block_defs}):
                self.block_defs[stmt.name] = stmt
        elif isinstance(stmt, ast.Legend):
            for e in stmt.entries:
                if len(e.symbol) != 1 or e.symbol.isspace():
                    shown = e.symbol if len(e.symbol) <= 20 else e.symbol[:20] + "..."
                    self.rep.at(e.pos, f"legend symbols are single characters, got '{shown}' ({len(e.symbol)} characters)")
                    self.bad_symbols.add(e.symbol)
                elif e.symbol in self.legend:
                    self.rep.at(e.pos, f"duplicate legend symbol '{e.symbol}'")
                else:
                    self.legend[e.symbol] = (e.target, e.pos)
        elif isinstance(stmt, ast.Stack):
            self.stacks.append(stmt)
        elif isinstance(stmt, ast.Override):
            self.overrides.append(stmt)

    # ---- settings -----------------------------------------------------------------------------

    def _setting(self, name: str, default: Any = None, required: bool = False) -> tuple[Any, SourcePos]:
        pos = self.assign_pos.get(name, self.node.pos)
        if name not in self.assign_pos:
            if required:
                self.rep.at(self.node.pos, f"model '{self.node.name}' needs '{name} = ...'")
            return default, pos
        try:
            return self.scope.lookup(name, pos), pos
        except EvalError as e:
            self.rep.at(e.pos, e.message)
            return None, pos

    def _settings(self) -> tuple[int | None, int | None, Dtype | None, NormConfig, bool, bool]:
        """(vocab, d_model, dtype, norm, tied, ok); problems are reported and leave ok False."""
        ok = True
        vocab, vpos = self._setting("vocab", required=True)
        d_model, dpos = self._setting("d_model", required=True)
        try:
            vocab = as_int(vocab, vpos, "vocab", 1) if vocab is not None else None
        except EvalError as e:
            self.rep.at(e.pos, e.message)
            vocab = None
        try:
            d_model = as_int(d_model, dpos, "d_model", 1) if d_model is not None else None
        except EvalError as e:
            self.rep.at(e.pos, e.message)
            d_model = None
        dt, tpos = self._setting("dtype", Word("bf16", self.node.pos))
        dtype = lookup_dtype(dt.name) if isinstance(dt, Word) else None
        if dtype is None and dt is not None:
            got = dt.name if isinstance(dt, Word) else describe(dt)
            self.rep.at(tpos, f"dtype must be one of {', '.join(list(DTYPES) + ['fp8'])}; got '{got}'"
                        f"{did_you_mean(got, list(DTYPES) + list(DTYPE_ALIASES))}")
            ok = False
        nv, npos = self._setting("norm", NormValue("rmsnorm", 1e-5))
        try:
            norm = coerce(nv, NORM_PARAM, npos, self.scope, "model") if nv is not None else DEFAULT_NORM
        except EvalError as e:
            self.rep.at(e.pos, e.message)
            norm, ok = DEFAULT_NORM, False
        hv, hpos = self._setting("head", Word("untied", self.node.pos))
        if not (isinstance(hv, Word) and hv.name in ("tied", "untied")):
            got = hv.name if isinstance(hv, Word) else describe(hv)
            self.rep.at(hpos, f"head must be tied or untied; got '{got}'{did_you_mean(got, ['tied', 'untied'])}")
            ok = False
        ok = ok and vocab is not None and d_model is not None
        return vocab, d_model, dtype, norm, isinstance(hv, Word) and hv.name == "tied", ok

    def _scalars(self) -> tuple[dict[str, float | None], bool]:
        """The model-level scalars (MODEL_SCALARS), each a positive number; (values, ok)."""
        out, ok = {}, True
        for name, default in MODEL_SCALARS.items():
            value, pos = self._setting(name, default)
            if value is None and name == "logit_cap":
                out[name] = None
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
                    or value == float("inf"):
                self.rep.at(pos, f"{name} must be a positive number{' or none' if name == 'logit_cap' else ''}, "
                            f"got {describe(value)}")
                ok = False
                continue
            out[name] = float(value)
        return out, ok

    def _mtp(self, ctx: ModelContext) -> tuple[MTPConfig | None, bool]:
        """The `mtp = mtp(depth, mixer, ffn)` setting: its block built from the named layer definitions (the
        mixer a sequence mixer, the ffn a feed-forward kind); (config or None, ok)."""
        value, pos = self._setting("mtp", None)
        if value is None:
            return None, True
        if not isinstance(value, MTPValue):
            self.rep.at(pos, f"mtp must be mtp(depth = ..., mixer = ..., ffn = ...) or none, got {describe(value)}")
            return None, False
        block = []
        for j, (role, word) in enumerate((("mixer", value.mixer), ("ffn", value.ffn))):
            if self._find_layer(word.name) is None:
                cands = list(self.layer_defs) + list(self.g.layers)
                self.rep.at(word.pos, f"mtp() {role} names unknown layer '{word.name}'{did_you_mean(word.name, cands)}")
                return None, False
            self.used_defs.add(word.name)
            try:
                config, lnorm, post, residual, params = self._build(word.name, (), ctx, word.pos)
            except _Unresolved:
                return None, False
            sub = SubLayer(j, word.name, lnorm, config, params, word.pos, post_norm=post, residual=residual)
            if sub.is_ffn != (role == "ffn"):
                want = "feed-forward" if role == "ffn" else "sequence-mixer"
                self.rep.at(word.pos, f"mtp() {role} must name a {want} layer; '{word.name}' is {config.kind}")
                return None, False
            block.append(sub)
        return MTPConfig(value.depth, tuple(block), ctx.norm, value.pos), True

    # ---- layer definitions --------------------------------------------------------------------

    def _find_layer(self, name: str) -> ast.LayerDef | None:
        return self.layer_defs.get(name) or self.g.layers.get(name)

    def _find_block(self, name: str) -> ast.BlockDef | None:
        return self.block_defs.get(name) or self.g.blocks.get(name)

    def _values(self, kind: Kind, kwargs, owner: str, ctx: ModelContext,
                report_missing: bool) -> dict[str, Any]:
        """Evaluate and type-check keyword arguments; missing required ones are reported."""
        values: dict[str, Any] = {}
        for kw in kwargs:
            p = SUBLAYER_PARAMS.get(kw.name) or kind.param_index.get(kw.name)
            if p is None:
                names = list(kind.param_index) + list(SUBLAYER_PARAMS)
                raise EvalError(kw.pos, f"unknown parameter '{kw.name}' of {kind.name}{did_you_mean(kw.name, names)}"
                                f" (parameters: {', '.join(names)})")
            if kw.name in values:
                raise EvalError(kw.pos, f"parameter '{kw.name}' given twice")
            if p.type == "layer":
                values[kw.name] = self._branch(kw, owner, ctx)
                continue
            values[kw.name] = coerce(evaluate(kw.value, self.scope), p, kw.value.pos, self.scope, owner)
        return values

    def _branch(self, kw: ast.KwArg, owner: str, ctx: ModelContext):
        """The config of the layer definition a `layer` parameter names (a parallel layer's branch): a plain
        name of another definition that sets no norm of its own (the parallel sub-layer's norm applies)."""
        what = f"{kw.name} of {owner}"
        if not isinstance(kw.value, ast.Name):
            raise EvalError(kw.value.pos, f"{what} must name a layer definition")
        name = kw.value.id
        d = self._find_layer(name)
        if d is None:
            cands = list(self.layer_defs) + list(self.g.layers)
            raise EvalError(kw.value.pos, f"{what}: unknown layer '{name}'{did_you_mean(name, cands)}")
        if f"layer '{name}'" == owner or REGISTRY.get(d.kind) is None or REGISTRY[d.kind].params[0].type == "layer":
            raise EvalError(kw.value.pos, f"{what}: '{name}' is a parallel layer (or itself); a branch is one mixer")
        own = [k.name for k in d.kwargs if k.name in ("norm", "post_norm")]
        if own:
            raise EvalError(kw.value.pos, f"{what}: '{name}' sets its own {own[0]}; a branch uses the parallel "
                            "sub-layer's norm")
        self.used_defs.add(name)
        if name in self.g.layers and name not in self.layer_defs:
            self.g.scope.used.add(f"layer:{name}")
        try:
            return self._build(name, (), ctx, kw.value.pos)[0]
        except _Unresolved:
            raise EvalError(kw.value.pos, f"{what}: layer '{name}' is invalid (reported at its definition)") from None

    def _build(self, name: str, overrides: tuple[ast.KwArg, ...], ctx: ModelContext, pos: SourcePos):
        """(config, norm, post_norm, residual, params) of layer `name` with per-position overrides; memoised."""
        key = (name, tuple((k.name, k.value) for k in overrides))
        if key in self._built:
            return self._built[key]
        if name in self._broken:
            raise _Unresolved()
        d = self._find_layer(name)
        kind = REGISTRY[d.kind]
        try:
            base = self._values(kind, d.kwargs, f"layer '{name}'", ctx, True)
        except EvalError as e:
            self._broken.add(name)
            self.rep.at(e.pos, e.message)
            raise _Unresolved() from None
        missing = [p.name for p in kind.params if p.required and p.name not in base]
        if missing:
            self._broken.add(name)
            self.rep.at(d.kind_pos, f"{kind.name} layer '{name}' is missing required parameter"
                        f"{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
            raise _Unresolved()
        try:
            extra = self._values(kind, overrides, f"layer '{name}'", ctx, False)
        except EvalError as e:
            self.rep.at(e.pos, e.message)
            raise _Unresolved() from None
        values = {**base, **extra}
        full = {p.name: values.get(p.name, p.default) for p in kind.params}
        residual = Residual(**{p.name: values.get(p.name, p.default) for p in RESIDUAL_PARAMS})
        if residual.width != 1:  # the mixer reads cat[x, embeddings]: only a kind with a `d_in` takes it
            ctx = ModelContext(ctx.d_model, ctx.norm, residual.width * ctx.d_model)
            if "d_in" not in kind.config.__dataclass_fields__:
                where = next((k.pos for k in (*overrides, *d.kwargs) if k.name == "input"), d.kind_pos)
                self._broken.add(name)
                self.rep.at(where, f"layer '{name}': input = {residual.input} gives the mixer 2 * d_model channels; "
                            f"a {kind.name} layer reads d_model (transformer_block takes a wider input)")
                raise _Unresolved()
        try:
            config = kind.build(full, ctx)
        except CheckError as e:
            where = next((k.pos for k in (*overrides, *d.kwargs) if k.name == e.param), d.kind_pos)
            if not overrides:
                self._broken.add(name)
            self.rep.at(where, f"layer '{name}': {e}")
            raise _Unresolved() from None
        norm = values.get("norm", ctx.norm)
        post = values.get("post_norm")
        params = kind.count(config, ctx.d_model) + norm.params_per_channel * ctx.width_in
        params += post.params_per_channel * ctx.d_model if post is not None else 0
        if residual.into == "next_input" and (residual.skip != "input" or residual.skip_scale != 1.0):
            where = next((k.pos for k in (*overrides, *d.kwargs) if k.name in ("skip", "skip_scale")), d.kind_pos)
            self._broken.add(name)
            self.rep.at(where, f"layer '{name}': into = next_input leaves the residual stream as it is; "
                        "skip and skip_scale do not apply")
            raise _Unresolved()
        self._built[key] = (config, norm, post, residual, params)
        return self._built[key]

    # ---- stack expansion ----------------------------------------------------------------------

    def _expand(self, items, out: list, tie: tuple[str, list[int]] | None, blocks_active: list[str]) -> None:
        """Append (name, overrides, pos, tie_group, tie_slot) for each sub-layer of `items`."""
        for item in items:
            if len(out) > MAX_SUBLAYERS:
                return
            if isinstance(item, ast.Repeat):
                try:
                    n = as_int(evaluate(item.count, self.scope), item.count.pos, "repeat count", 0)
                except EvalError as e:
                    self.rep.at(e.pos, e.message)
                    continue
                if n > MAX_SUBLAYERS:
                    self.rep.at(item.count.pos, f"repeat count {n} exceeds {MAX_SUBLAYERS}")
                    continue
                start = len(out)
                self._expand(item.items, out, tie, blocks_active)
                body = out[start:]
                del out[start:]
                if tie is not None:
                    tie[1][0] -= len(body)
                for _ in range(n):
                    if len(out) + len(body) > MAX_SUBLAYERS + 1:
                        out.extend(body[: MAX_SUBLAYERS + 1 - len(out)])
                        break
                    for name, ov, pos, group, _slot in body:
                        slot = None
                        if tie is not None:  # inside a shared block every copy gets its own weights slot
                            slot = tie[1][0]
                            tie[1][0] += 1
                        out.append((name, ov, pos, group, slot))
            elif isinstance(item, ast.Pattern):
                self._pattern(item, out, tie, blocks_active)
            else:
                self._use(item.name, item.kwargs, item.pos, out, tie, blocks_active)

    def _pattern(self, item: ast.Pattern, out: list, tie, blocks_active: list[str]) -> None:
        """Each symbol of a pattern string through the legend; linear in the pattern, bounded output.

        An unknown symbol is reported once per pattern (at its first use, with how often it occurs), and a
        symbol whose legend entry is already reported as broken is skipped silently, so one typo gives one
        error. Expansion stops past MAX_SUBLAYERS, which the caller reports.
        """
        unknown: dict[str, list[int]] = {}  # symbol -> [first offset, occurrences]
        start_col = item.pos.col + len('pattern "')
        stopped = False
        for off, ch in enumerate(item.text):
            if ch in self.bad_symbols:
                continue
            if ch in self.legend:
                if len(out) > MAX_SUBLAYERS:
                    stopped = True
                    break
                pos = SourcePos(item.pos.file, item.pos.line, start_col + off)
                self._use(self.legend[ch][0], None, pos, out, tie, blocks_active)
            elif ch in unknown:
                unknown[ch][1] += 1
            elif not ch.isspace():
                unknown[ch] = [off, 1]
        known = "".join(sorted(self.legend)) or "none defined"
        for ch, (off, n) in unknown.items():
            times = f" ({'at least ' if stopped else ''}{n} times in this pattern)" if n > 1 else ""
            self.rep.at(SourcePos(item.pos.file, item.pos.line, start_col + off),
                        f"pattern symbol '{ch}' is not in the legend{times} (symbols: {known})")

    def _use(self, name: str, kwargs, pos: SourcePos, out: list, tie, blocks_active: list[str]) -> None:
        self.used_defs.add(name)
        if self._find_layer(name) is not None:
            if name in self.g.layers and name not in self.layer_defs:
                self.g.scope.used.add(f"layer:{name}")
            slot = None
            group = None
            if tie is not None:
                group, counter = tie
                slot = counter[0]
                counter[0] += 1
            out.append((name, tuple(kwargs or ()), pos, group, slot))
            return
        block = self._find_block(name)
        if block is None:
            candidates = list(self.layer_defs) + list(self.block_defs) + list(self.g.layers) + list(self.g.blocks)
            self.rep.at(pos, f"unknown layer or block '{name}'{did_you_mean(name, candidates)}")
            return
        if name not in self.block_defs:
            self.g.scope.used.add(f"block:{name}")
        if kwargs:
            self.rep.at(pos, f"'{name}' is a block; parameters can only be overridden on layers")
            return
        if name in blocks_active:
            self.rep.at(pos, f"block '{name}' uses itself ({' -> '.join(blocks_active + [name])})")
            return
        inner_tie = tie
        if block.shared and tie is None:
            inner_tie = (name, [0])
        self._expand(block.items, out, inner_tie, blocks_active + [name])

    # ---- the whole model ----------------------------------------------------------------------

    def resolve(self) -> ModelIR | None:
        settings = self._settings()
        for name, d in self.layer_defs.items():
            if d.kind not in REGISTRY:
                self.rep.at(d.kind_pos, f"unknown layer kind '{d.kind}'{did_you_mean(d.kind, REGISTRY)}"
                            f" (kinds: {', '.join(REGISTRY)})")
                self._broken.add(name)
        for name, d in self.g.layers.items():
            if d.kind not in REGISTRY:
                self._broken.add(name)  # reported once by the loader
        for sym, (target, pos) in self.legend.items():
            if self._find_layer(target) is None and self._find_block(target) is None:
                cands = list(self.layer_defs) + list(self.block_defs) + list(self.g.layers) + list(self.g.blocks)
                self.rep.at(pos, f"legend symbol '{sym}' names unknown layer '{target}'{did_you_mean(target, cands)}")
                self.bad_symbols.add(sym)  # reported here once; its uses in patterns are skipped
        if not self.stacks:
            self.rep.at(self.node.pos, f"model '{self.node.name}' has no stack {{ ... }}")
            return None
        for extra in self.stacks[1:]:
            self.rep.at(extra.pos, "a model has one stack; merge the items into the first")
        entries: list = []
        self._expand(self.stacks[0].items, entries, None, [])
        if len(entries) > MAX_SUBLAYERS:
            self.rep.at(self.stacks[0].pos, f"the stack expands to more than {MAX_SUBLAYERS} sub-layers")
            return None
        if not entries and not self.rep.has_errors:
            self.rep.at(self.stacks[0].pos, "the stack is empty")
        overrides: dict[int, ast.Override] = {}
        for ov in self.overrides:
            try:
                i = as_int(evaluate(ov.index, self.scope), ov.index.pos, "override index", 0)
            except EvalError as e:
                self.rep.at(e.pos, e.message)
                continue
            if i >= len(entries):
                self.rep.at(ov.index.pos, f"override index {i} is past the last sub-layer ({len(entries) - 1})")
            elif entries[i][3] is not None:
                self.rep.at(ov.pos, f"sub-layer {i} belongs to shared block '{entries[i][3]}'; its weights are tied,"
                            " so it cannot be overridden alone")
            elif i in overrides:
                self.rep.at(ov.pos, f"sub-layer {i} is overridden twice")
            else:
                overrides[i] = ov
        vocab, d_model, dtype, norm, tied, settings_ok = settings
        scalars, scalars_ok = self._scalars()
        settings_ok = settings_ok and scalars_ok
        if d_model is None:  # without a width no layer can be checked
            self._warn_unused()
            return None
        ctx = ModelContext(d_model, norm)
        layers = []
        tied_configs: dict[tuple[str, int], tuple] = {}
        for i, (name, kw, pos, group, slot) in enumerate(entries):
            if i in overrides:
                kw = kw + overrides[i].kwargs
            try:
                config, lnorm, post, residual, params = self._build(name, kw, ctx, pos)
            except _Unresolved:
                continue
            if group is not None:
                first = tied_configs.setdefault((group, slot), (config, lnorm, post, residual, name))
                if first[:4] != (config, lnorm, post, residual):
                    self.rep.at(pos, f"shared block '{group}': slot {slot} differs between uses")
            use = REGISTRY[config.kind].per_use(config, d_model)
            layers.append(SubLayer(i, name, lnorm, config, params, pos, group, slot, post, residual, use))
        if layers and layers[-1].residual.into == "next_input" and len(layers) == len(entries):
            self.rep.at(layers[-1].pos, f"sub-layer {layers[-1].index} '{layers[-1].definition}' sends its output "
                        "into the next sub-layer's input (into = next_input), but it is the last one")
        mtp, mtp_ok = self._mtp(ctx)
        settings_ok = settings_ok and mtp_ok
        for name, d in self.layer_defs.items():  # unused definitions are still checked
            if name not in self.used_defs and REGISTRY.get(d.kind) is not None:
                with contextlib.suppress(_Unresolved):  # already reported
                    self._build(name, (), ctx, d.pos)
        self._warn_unused()
        if self.rep.has_errors or not settings_ok:
            return None
        return ModelIR(self.node.name, vocab, d_model, dtype, norm, tied, tuple(layers), self.node.pos,
                       self.source_hash, self.source_text, **scalars, mtp=mtp)

    def _warn_unused(self) -> None:
        for name, d in {**self.layer_defs, **self.block_defs}.items():
            if name not in self.used_defs:
                self.rep.at(d.pos, f"'{name}' is defined but never used in the stack", "warning")
        for name, pos in self.assign_pos.items():
            if name not in MODEL_SETTINGS and name not in self.scope.used:
                self.rep.at(pos, f"constant '{name}' is never used", "warning")
