"""Syntax tree to IR for `budget` and `gpu` blocks: structure, types and parallel-plan consistency.

This module only validates what a budget says; the memory model (`ltmdsl.memory`) evaluates whether
it holds.
"""

from __future__ import annotations

from typing import Any

from ltmdsl import ast
from ltmdsl.errors import Reporter
from ltmdsl.evaluate import EvalError, Scope, Word, as_int, describe, did_you_mean, evaluate
from ltmdsl.hardware import AMBIGUOUS, CATALOGUE, lookup as lookup_gpu
from ltmdsl.ir import CP_SPLITS, BudgetIR, GpuSpec, LimitIR, ModelIR, ParallelPlan
from ltmdsl.kinds import kind_of
from ltmdsl.memory.compute import FLOP_QUANTITIES as FLOP_QUANTITY_PARTS
from ltmdsl.units import DTYPES, dtype as lookup_dtype

#: Byte quantities a `require` line may limit: memory components of one replica, their `total`, and the most
#: loaded GPU (`per_gpu`).
COMPONENTS = ("weights", "kv_cache", "recurrent_state", "activations", "logits", "gradients", "optimizer",
              "total", "per_gpu")
#: FLOP quantities (ltmdsl.memory.compute, one sequence at the budget's context): every FLOP of a decoded
#: token, its sequence-mixing FLOPs only (attention + ssm: what grows with the context), and the FLOPs to
#: prefill the whole context.
FLOP_QUANTITIES = tuple(FLOP_QUANTITY_PARTS)
QUANTITIES = COMPONENTS + FLOP_QUANTITIES

_MODE_KEYS = {
    "context": "int", "batch": "int", "chunk": "int", "dtype": "dtype", "kv_dtype": "dtype", "state_dtype": "dtype",
    "grad_dtype": "dtype", "optimizer": ("adamw", "sgd", "none"), "optimizer_bytes": "int",
    "recompute": ("none", "selective", "full"), "flash_attention": "bool", "chunked_loss": "bool",
    "conv_taps": ("full", "minus_one"),
}
_PLAN_KEYS = {
    "tp": "int", "pp": "int", "cp": "int", "dp": "int", "ep": "int", "etp": "int", "zero": "int", "sp": "bool",
    "distributed_optimizer": "bool", "microbatches": "int", "interleave": "int", "cp_split": CP_SPLITS,
}
_GPU_KEYS = {"memory": "int", "bf16_tflops": "float", "bandwidth": "int"}


def _value(kw: ast.KwArg, value_type: Any, scope: Scope, owner: str) -> Any:
    v = evaluate(kw.value, scope)
    what = f"{owner} {kw.name}"
    if value_type == "int":
        return as_int(v, kw.value.pos, what, 0)
    if value_type == "float":
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise EvalError(kw.value.pos, f"{what} must be a positive number, got {describe(v)}")
        return float(v)
    if value_type == "bool":
        if not isinstance(v, bool):
            raise EvalError(kw.value.pos, f"{what} must be true or false, got {describe(v)}")
        return v
    if value_type == "dtype":
        d = lookup_dtype(v.name) if isinstance(v, Word) else None
        if d is None:
            got = v.name if isinstance(v, Word) else describe(v)
            raise EvalError(kw.value.pos, f"{what} must be a dtype ({', '.join(DTYPES)}, fp8); got '{got}'"
                            f"{did_you_mean(got, DTYPES)}")
        return d
    if isinstance(value_type, tuple):
        if v is None and "none" in value_type:  # the keyword `none` evaluates to None; here it is a choice
            return "none"
        if not isinstance(v, Word) or v.name not in value_type:
            got = v.name if isinstance(v, Word) else describe(v)
            raise EvalError(kw.value.pos, f"{what} must be one of {', '.join(value_type)}; got '{got}'{did_you_mean(got, value_type)}")
        return v.name
    raise AssertionError(value_type)  # pragma: no cover


def has_unit(node: ast.Expr, scope: Scope, seen: frozenset[str] = frozenset()) -> bool:
    """Whether an expression states a byte unit: a literal such as `80 GB`, or a constant defined with one."""
    if isinstance(node, ast.Num):
        return node.unit is not None
    if isinstance(node, ast.Name):
        s: Scope | None = scope
        while s is not None and node.id not in s.exprs:
            s = s.parent
        return s is not None and node.id not in seen and has_unit(s.exprs[node.id], s, seen | {node.id})
    if isinstance(node, ast.Neg):
        return has_unit(node.operand, scope, seen)
    if isinstance(node, ast.BinOp):
        return has_unit(node.left, scope, seen) or has_unit(node.right, scope, seen)
    if isinstance(node, ast.Call):
        return any(has_unit(a, scope, seen) for a in node.args)
    return False


def require_bytes(node: ast.Expr, value: int, scope: Scope, what: str) -> None:
    """Refuse a byte amount written without a unit: `require per_gpu <= 80` would silently mean 80 bytes."""
    if not has_unit(node, scope):
        units = "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"
        if value < 10**4:  # surely not meant as bytes
            raise EvalError(node.pos, f"{what} has no byte unit; did you mean {value} GB? (units: {units})")
        raise EvalError(node.pos, f"{what} has no byte unit; write {value} B, or use a larger unit ({units})")


def _kwargs(kwargs, table: dict[str, Any], scope: Scope, owner: str, rep: Reporter) -> dict[str, tuple[Any, Any]]:
    """name -> (value, pos) for known keys; unknown or repeated keys are reported."""
    out: dict[str, tuple[Any, Any]] = {}
    for kw in kwargs:
        if kw.name not in table:
            rep.at(kw.pos, f"unknown {owner} setting '{kw.name}'{did_you_mean(kw.name, table)}"
                   f" (settings: {', '.join(table)})")
            continue
        if kw.name in out:
            rep.at(kw.pos, f"'{kw.name}' given twice")
            continue
        try:
            out[kw.name] = (_value(kw, table[kw.name], scope, owner), kw.value.pos)
        except EvalError as e:
            rep.at(e.pos, e.message)
    return out


def resolve_gpu(node: ast.GpuDef, scope: Scope, rep: Reporter) -> GpuSpec | None:
    """`gpu NAME { memory = 96 GB, bf16_tflops = 1000, bandwidth = 4 TB }` (bandwidth per second)."""
    vals = _kwargs(node.kwargs, _GPU_KEYS, scope, "gpu", rep)
    if "memory" not in vals:
        rep.at(node.pos, f"gpu '{node.name}' needs 'memory = ...' (for example 96 GB)")
        return None
    mem = vals["memory"][0]
    mem_kw = next(kw for kw in node.kwargs if kw.name == "memory")
    try:
        require_bytes(mem_kw.value, mem, scope, f"memory of gpu '{node.name}'")
    except EvalError as e:
        rep.at(e.pos, e.message)
        return None
    bw = next((kw for kw in node.kwargs if kw.name == "bandwidth"), None)
    if bw is not None and "bandwidth" in vals:
        try:
            require_bytes(bw.value, vals["bandwidth"][0], scope, f"bandwidth of gpu '{node.name}' (bytes per second)")
        except EvalError as e:
            rep.at(e.pos, e.message)
            return None
    if mem <= 0:
        rep.at(vals["memory"][1], "gpu memory must be positive")
        return None
    return GpuSpec(node.name, mem, vals.get("bf16_tflops", (0.0, None))[0] * 1e12,
                   float(vals.get("bandwidth", (0, None))[0]), node.pos)


def resolve_budget(node: ast.BudgetDef, model: ModelIR | None, scope: Scope, gpus: dict[str, GpuSpec],
                   rep: Reporter) -> BudgetIR | None:
    """Validate one budget against its model; None (with diagnostics) when it is not usable."""
    modes = [s for s in node.body if isinstance(s, ast.ModeStmt)]
    ons = [s for s in node.body if isinstance(s, ast.OnStmt)]
    requires = [s for s in node.body if isinstance(s, ast.Require)]
    errors_before = sum(d.severity == "error" for d in rep.diagnostics)
    if not modes:
        rep.at(node.pos, f"budget '{node.name}' needs a mode line: 'inference context = ...' or 'training context = ...'")
        return None
    for extra in modes[1:]:
        rep.at(extra.pos, "a budget has one mode line (inference or training)")
    for extra in ons[1:]:
        rep.at(extra.pos, "a budget has one 'on' line")
    mode = modes[0]
    vals = _kwargs(mode.kwargs, _MODE_KEYS, scope, mode.mode, rep)
    if "context" not in vals:
        rep.at(mode.pos, f"the {mode.mode} line needs 'context = ...'")
        return None

    def get(key, default):
        return vals[key][0] if key in vals else default

    context = get("context", 0)
    batch = get("batch", 1)
    for key in ("context", "batch"):
        if key in vals and vals[key][0] < 1:
            rep.at(vals[key][1], f"{key} must be at least 1")
    chunk = get("chunk", min(context, 8192) if context else 1)
    if "chunk" in vals and not 1 <= chunk:
        rep.at(vals["chunk"][1], "chunk must be at least 1")

    gpu = lookup_gpu("H100")
    count, plan_vals = 1, {}
    if ons:
        on = ons[0]
        try:
            count = as_int(evaluate(on.count, scope), on.count.pos, "GPU count", 1)
        except EvalError as e:
            rep.at(e.pos, e.message)
        found = lookup_gpu(on.gpu, gpus)
        if found is None:
            names = list(gpus) + list(CATALOGUE)
            hint = f"; write {AMBIGUOUS[on.gpu]}" if on.gpu in AMBIGUOUS else did_you_mean(on.gpu, names)
            rep.at(on.gpu_pos, f"unknown GPU '{on.gpu}'{hint} (known: {', '.join(names)};"
                   " define others with gpu NAME { memory = ... })")
        else:
            gpu = found
        plan_vals = _kwargs(on.kwargs, _PLAN_KEYS, scope, "parallel", rep)

    def plan(key, default):
        return plan_vals[key][0] if key in plan_vals else default

    tp, pp, cp, ep = plan("tp", 1), plan("pp", 1), plan("cp", 1), plan("ep", 1)
    for key in ("tp", "pp", "cp", "ep", "etp", "microbatches", "interleave"):
        if key in plan_vals and plan_vals[key][0] < 1:
            rep.at(plan_vals[key][1], f"{key} must be at least 1")
            return None
    zero = plan("zero", 0)
    if "zero" in plan_vals and zero > 3:
        rep.at(plan_vals["zero"][1], f"zero is a ZeRO stage 0 to 3, got {zero}")
    model_par = tp * pp * cp
    where = ons[0].pos if ons else node.pos
    if "dp" in plan_vals:
        dp = plan_vals["dp"][0]
        if dp < 1 or model_par * dp != count:
            rep.at(plan_vals["dp"][1], f"tp*pp*cp*dp = {model_par}*{dp} = {model_par * dp} must equal the GPU count {count}")
    elif count % model_par:
        rep.at(where, f"the GPU count {count} is not divisible by tp*pp*cp = {model_par}")
        dp = 1
    else:
        dp = count // model_par
    parallel = ParallelPlan(tp=tp, pp=pp, cp=cp, dp=dp, ep=ep, zero=zero,
                            distributed_optimizer=plan("distributed_optimizer", False),
                            sequence_parallel=plan("sp", False), microbatches=plan("microbatches", 1),
                            interleave=plan("interleave", 1), cp_split=plan("cp_split", "balanced"),
                            etp=plan("etp", None))
    if model is not None:
        _check_plan(model, parallel, plan_vals, where, rep)
        for layer in model.layers:
            problem = kind_of(layer.mixer).context_check(layer.mixer, context)
            if problem is not None:
                rep.at(vals["context"][1], f"layer '{layer.definition}' {problem}")
                break

    limits = []
    for r in requires:
        limit_ir = resolve_require(r, scope, rep)
        if limit_ir is not None:
            limits.append(limit_ir)

    errors_after = sum(d.severity == "error" for d in rep.diagnostics)
    if errors_after > errors_before or model is None:
        return None
    weight_dtype = get("dtype", model.dtype)
    return BudgetIR(
        name=node.name, model=node.model, mode=mode.mode, context=context, batch=batch, chunk=chunk, gpu=gpu,
        gpus=count,
        parallel=parallel,
        weight_dtype=weight_dtype, kv_dtype=get("kv_dtype", weight_dtype), state_dtype=get("state_dtype", weight_dtype),
        grad_dtype=get("grad_dtype", lookup_dtype("fp32")),  # Megatron's mixed precision: fp32 gradients
        optimizer=get("optimizer", "adamw" if mode.mode == "training" else "none"),
        optimizer_bytes_per_param=get("optimizer_bytes", 12), recompute=get("recompute", "none"),
        flash_attention=get("flash_attention", True), chunked_loss=get("chunked_loss", False),
        conv_taps=get("conv_taps", "full"), limits=tuple(limits), pos=node.pos,
    )


def resolve_require(r: ast.Require, scope: Scope, rep: Reporter) -> LimitIR | None:
    """One `require` line: known names, one measure (a sum of bytes and FLOPs means nothing), at most one
    `per_gpu` (the most loaded GPU is not a part of one replica), no name twice, and a bound in the measure's
    terms: bytes with a unit, FLOPs as a plain count."""
    parts = r.parts or ((r.component, r.pos),)
    ok = True
    for name, pos in parts:
        if name not in QUANTITIES:
            rep.at(pos, f"unknown quantity '{name}'{did_you_mean(name, QUANTITIES)}"
                   f" (bytes: {', '.join(COMPONENTS)}; FLOPs: {', '.join(FLOP_QUANTITIES)})")
            ok = False
    if not ok:
        return None
    names = [n for n, _ in parts]
    measures = {"flops" if n in FLOP_QUANTITIES else "bytes" for n in names}
    if len(measures) > 1:
        rep.at(r.pos, f"'{r.component}' adds bytes to FLOPs; limit each in its own require line")
        return None
    twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if twice is not None:
        rep.at(parts[names.index(twice, names.index(twice) + 1)][1], f"'{twice}' is summed twice")
        return None
    if len(names) > 1 and ({"per_gpu", "total"} & set(names)):
        extra = next(n for n in names if n in ("per_gpu", "total"))
        what = ("the most loaded GPU is not a part of one replica" if extra == "per_gpu"
                else "total already sums every component")
        rep.at(parts[names.index(extra)][1], f"'{extra}' cannot be summed with other quantities ({what})")
        return None
    if len(names) > 1 and measures == {"flops"}:
        rep.at(r.pos, f"'{r.component}' sums FLOPs of different things (mixing_flops is part of decode_flops, "
               "prefill_flops counts a whole prefill); limit each in its own require line")
        return None
    measure = measures.pop()
    try:
        limit = as_int(evaluate(r.limit, scope), r.limit.pos, "limit", 1)
        if measure == "bytes":
            require_bytes(r.limit, limit, scope, f"the limit of {r.component}")
        elif has_unit(r.limit, scope):
            raise EvalError(r.limit.pos, f"the limit of {r.component} is a number of FLOPs, not bytes; "
                            "drop the byte unit")
    except EvalError as e:
        rep.at(e.pos, e.message)
        return None
    return LimitIR(r.component, limit - 1 if r.op == "<" else limit, r.pos, tuple(names), measure)


def _check_plan(model: ModelIR, plan: ParallelPlan, plan_vals, where, rep: Reporter) -> None:
    """Report each of `plan_problems` at the position of its plan key (else the `on` line)."""
    at = {k: v[1] for k, v in plan_vals.items()}
    for key, message in plan_problems(model, plan):
        rep.at(at.get(key, where), message)


def plan_problems(model: ModelIR, plan: ParallelPlan) -> list[tuple[str, str]]:
    """(plan key, message) for each way the degrees do not fit the model: tp must divide what each layer's
    `split` facet says it splits (attention heads), ep what expert parallelism shards (MoE experts), etp what
    expert tensor parallelism splits (the experts' width); pp cannot exceed the stack. One message per
    parallel setting. Also used by ltmdsl.distributed to refuse a plan before launching workers, with the
    same words.

    MoE parallel folding (Megatron-Core): the MoE layers lay the tp*cp*dp ranks of a pipeline stage out as
    etp x ep x edp, so etp*ep must divide tp*cp*dp. A plan whose ep needs more ranks than that (tp = 8, ep = 8
    on 8 GPUs: etp = tp = 8 would need 64) is refused, suggesting etp = 1 (whole experts on each rank) when it
    fits, rather than the experts' bytes being divided by ranks that do not exist."""
    tp, pp, ep, etp = plan.tp, plan.pp, plan.ep, plan.expert_tp
    problems = []
    splits = [(layer, kind_of(layer.mixer).split(layer.mixer, model.d_model)) for layer in model.layers]
    bad_tp = next(((layer, what, n) for layer, sp in splits for what, n in sp.tp if n % tp), None)
    if bad_tp is not None:
        layer, what, n = bad_tp
        problems.append(("tp", f"tp = {tp} does not divide the {n} {what} of layer '{layer.definition}'"))
    bad_group = next(((layer, what, n) for layer, sp in splits for what, n, _ in sp.grouped if n % tp and tp % n),
                     None)
    if bad_group is not None and bad_tp is None:
        layer, what, n = bad_group
        problems.append(("tp", f"tp = {tp} neither divides nor is a multiple of the {n} {what} of layer "
                               f"'{layer.definition}' (beyond them each rank holds one of them)"))
    sharded = sorted({(n, what) for _layer, sp in splits for what, n in sp.ep})
    if ep > 1 and not sharded:
        problems.append(("ep", "ep > 1 but the model has no MoE layers (no layer splits over expert parallelism)"))
    bad_ep = next(((n, what) for n, what in sharded if n % ep), None)
    if bad_ep is not None:
        problems.append(("ep", f"ep = {ep} does not divide {bad_ep[0]} {bad_ep[1]}"))
    given = {key for key, _ in problems}
    problems += [(key, m) for key, m in _etp_problems(plan, splits, bool(sharded)) if key not in given]
    if pp > len(model.layers):
        problems.append(("pp", f"pp = {pp} exceeds the {len(model.layers)} sub-layers"))
    return problems


def fold_problems(model: ModelIR, plan: ParallelPlan) -> list[tuple[str, str]]:
    """MoE parallel folding's rank rule alone (etp*ep must divide the stage's tp*cp*dp ranks), for a plan given
    as overrides (`report(model, None, tp=8, ep=8)`), which no budget check has seen: the memory model would
    divide the experts' bytes by ranks that do not exist. (Widths that tp or etp do not divide are counted as
    real numbers there, as heads are.)"""
    splits = [(layer, kind_of(layer.mixer).split(layer.mixer, model.d_model)) for layer in model.layers]
    return _etp_problems(plan, splits, any(sp.ep for _layer, sp in splits), widths=False)


def _etp_problems(plan: ParallelPlan, splits, has_experts: bool, widths: bool = True) -> list[tuple[str, str]]:
    """MoE parallel folding's rules (`plan_problems`): etp divides every expert width (unless not `widths`),
    and etp*ep divides the tp*cp*dp ranks of a pipeline stage. Reported at `etp` when the plan gives it, else
    at `ep` (or `tp`)."""
    tp, cp, dp, ep, etp = plan.tp, plan.cp, plan.dp, plan.ep, plan.expert_tp
    key = "etp" if plan.etp is not None else ("ep" if ep > 1 else "tp")
    named = f"etp = {etp}" if plan.etp is not None else f"etp = tp = {etp}"
    if not has_experts:
        if plan.etp is not None and plan.etp > 1:
            return [("etp", "etp > 1 but the model has no MoE layers (no experts to split)")]
        return []
    split = sorted({(n, what, layer.definition) for layer, sp in splits for what, n in sp.etp}) if widths else []
    bad = next(((n, what, name) for n, what, name in split if n % etp), None)
    if bad is not None:
        return [(key, f"{named} does not divide the {bad[0]} {bad[1]} of layer '{bad[2]}' (expert tensor "
                      "parallelism splits each expert's width)")]
    stage = tp * cp * dp
    if stage % (etp * ep) == 0:
        return []
    hint = (f"; etp = 1 fits (each rank holds {_experts_per_rank(splits, ep)})" if stage % ep == 0
            else f"; even etp = 1 needs ep to divide tp*cp*dp = {stage}")
    return [(key, f"{named}: etp*ep = {etp}*{ep} = {etp * ep} does not divide the tp*cp*dp = {tp}*{cp}*{dp} = "
                  f"{stage} ranks of a pipeline stage (MoE parallel folding: the experts' etp x ep x edp ranks "
                  f"are the stage's tp x cp x dp ranks){hint}")]


def _experts_per_rank(splits, ep: int) -> str:
    """'32/8 = 4 whole experts': the experts of the MoE layers over ep (the first layer's count when they differ)."""
    n = next(n for _layer, sp in splits for _what, n in sp.ep)
    return f"{n}/{ep} = {n // ep} whole expert{'s' if n // ep > 1 else ''}"
