"""`report()`: one model under one budget (or the defaults), evaluated, solved and formatted.

Definitions used in the report and its JSON:

    components       name -> bytes of one model replica on one device, no parallelism (the figure the
                     papers quote); total_bytes is their sum
    per_gpu          the most loaded GPU. Under a budget ("plan" sharding) every pipeline stage is
                     evaluated with the budget's tp/pp/cp/dp/ep/ZeRO and the fullest one is reported;
                     without one ("ideal" sharding) the total is spread evenly: ceil(total / gpus)
    gpus_needed      ceil(total_bytes / GPU capacity): the fewest GPUs that could hold the bytes at all
                     (Llama-3.1-405B's 100M-token KV cache: 646 H100s at 80e9 B each)
    gpus_needed_by_component  the same count for each component alone (the KV cache alone: 646)
    gpus_needed_plan under a plan: tp*pp*cp*dp for the smallest dp that fits (ZeRO and the batch split
                     shrink with dp; dp <= max(B/m, the plan's dp)); None if none does
    max_context      the largest T (exact integer) at which the most loaded GPU fits its capacity and
                     every `require` limit holds; None when it fits at any context (O(1) memory)
    max_batch        the same for B at the report's context
    growth           each component's order in T: O(1), O(T), O(T^2)
    limits           `require COMPONENT <= BYTES`: a component name or `total` compares one replica's
                     bytes (the components above), `per_gpu` the most loaded GPU
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any

import sympy

from ltmdsl.ir import BudgetIR, GpuSpec, ModelIR
from ltmdsl.memory import compute, solve
from ltmdsl.memory.assemble import StageExprs, assemble, components_for
from ltmdsl.memory.settings import Settings, resolve
from ltmdsl.memory.symbols import DP, compile_bytes, compile_exact, formula_text, growth_order
from ltmdsl.memory.training import chunked_loss_advice
from ltmdsl.units import format_bytes, format_flops


class Evaluator:
    """Compiled exact formulas of one model under one Settings, for evaluation and solving.

    The expressions are assembled in sympy's canonical forms: the facets and the assembly test some of them in
    Python (which of two counts is larger, whether a term is zero), and unevaluated forms changed those answers
    (a one-process MoE's activations +8.7% when the stages were assembled under `sympy.evaluate(False)`).
    """

    def __init__(self, model: ModelIR, s: Settings):
        self.model = model
        self.settings = s
        self.components = components_for(s.mode)
        self.single_stages = assemble(model, s.single)
        self.plan_stages = assemble(model, _symbolic_dp(s)) if s.sharding == "plan" else None
        self.single = solve.CompiledStages(self.single_stages, self.components)
        self.plan = None if self.plan_stages is None else solve.CompiledStages(self.plan_stages, self.components)
        self._flops: compute.FlopQuantities | None = None  # compiled on the first FLOP limit

    @property
    def shown_single(self) -> list[StageExprs]:
        """The single-device stages: what the formulas print."""
        return self.single_stages

    @property
    def shown_plan(self) -> list[StageExprs] | None:
        """The plan's stages (dp symbolic), for the per-GPU formulas; None without a plan."""
        return self.plan_stages

    def totals(self, T: int, B: int) -> dict[str, int]:
        return self.single.values(T, B, self.settings.chunk)[0]

    def per_gpu(self, T: int, B: int, dp: int | None = None) -> tuple[int, dict[str, int]]:
        """(index of the most loaded stage, its components). Ideal sharding: stage 0, total/gpus."""
        s = self.settings
        if self.plan is None:
            return 0, {k: -(-v // s.gpus) for k, v in self.totals(T, B).items()}
        stages = self.plan.values(T, B, s.chunk, s.dp if dp is None else dp)
        index = max(range(len(stages)), key=lambda i: sum(stages[i].values()))
        return index, stages[index]

    def per_gpu_bytes(self, T: int, B: int, dp: int | None = None) -> int:
        s = self.settings
        if self.plan is None:
            return -(-sum(self.totals(T, B).values()) // s.gpus)
        return self.plan.max_stage_total(T, B, s.chunk, s.dp if dp is None else dp)

    def value(self, name: str, T: int, B: int) -> int:
        """One measured quantity: a component, `total` or `per_gpu` (bytes), or a FLOP quantity of one
        sequence (compute.FLOP_QUANTITIES)."""
        if name in compute.FLOP_QUANTITIES:
            if self._flops is None:
                self._flops = compute.FlopQuantities(self.model)
            return self._flops.value(name, T)
        if name == "per_gpu":
            return self.per_gpu_bytes(T, B)
        totals = self.totals(T, B)
        return sum(totals.values()) if name == "total" else totals.get(name, 0)

    def limit_value(self, limit, T: int, B: int) -> int:
        """What a `require` line (a LimitIR) measures: the sum of its parts."""
        return sum(self.value(name, T, B) for name in limit.parts)

    def fits(self, T: int, B: int, limits=()) -> bool:
        if self.per_gpu_bytes(T, B) > self.settings.gpu.memory_bytes:
            return False
        return all(self.limit_value(lim, T, B) <= lim.bound for lim in limits)


@dataclass
class LimitCheck:
    """One `require` line (or the GPU's own capacity) evaluated at the report's context and batch."""

    component: str
    bound: int
    value: int
    pos: Any = None  # SourcePos of the require line; None for the implicit capacity check
    max_context: int | None = None  # the largest T at which this limit alone holds
    measure: str = "bytes"  # bytes | flops

    @property
    def ok(self) -> bool:
        return self.value <= self.bound

    def amount(self, n: int) -> str:
        """`n` in this limit's measure: decimal bytes, or FLOPs."""
        return format_bytes(n, binary=False) if self.measure == "bytes" else format_flops(n)

    def to_json(self) -> dict:
        return {"component": self.component, "measure": self.measure, f"max_{self.measure}": self.bound,
                "value": self.value, "ok": self.ok, "over_by": max(0, self.value - self.bound),
                "max_context": self.max_context, "pos": str(self.pos) if self.pos else None}


@dataclass
class MemoryReport:
    """Everything `ltmdsl memory` prints; `to_json()` is the --json output."""

    model: str
    settings: Settings
    components: dict[str, int]
    by_kind: dict[str, dict[str, int]]
    total_bytes: int
    per_gpu_components: dict[str, int]
    per_gpu_bytes: int
    most_loaded_stage: int
    gpus_needed: int
    gpus_needed_by_component: dict[str, int]
    gpus_needed_plan: int | None
    max_context: int | None
    max_batch: int | None
    dominant: str | None
    growth: dict[str, str]
    flops: dict
    limits: list[LimitCheck]
    notes: list[str] = field(default_factory=list)
    evaluator: Evaluator | None = field(default=None, repr=False)

    @property
    def fits(self) -> bool:
        return self.per_gpu_bytes <= self.settings.gpu.memory_bytes and all(x.ok for x in self.limits)

    @functools.cached_property
    def formulas(self) -> dict[str, str]:
        """Each component of one replica as a formula in T, B, C. Built and printed on first use: sympy's
        canonical forms and its printer took most of `ltmdsl check`'s budget evaluation, which shows none."""
        stage = self.evaluator.shown_single[0]
        return {c: formula_text(stage.combined[c]) for c in self.components}

    @functools.cached_property
    def formulas_per_gpu(self) -> dict[str, str]:
        """The same for the most loaded GPU under the budget's plan (the formulas above without a plan)."""
        plan = self.evaluator.shown_plan
        if plan is None:
            return self.formulas
        stage = plan[self.most_loaded_stage]
        return {c: formula_text(stage.combined[c].subs(DP, self.settings.dp)) for c in self.components}

    def sweep(self, contexts: list[int]) -> dict[str, list[int]]:
        """Component bytes (one replica) and per-GPU bytes at each context, batch fixed."""
        ev = self.evaluator
        out: dict[str, list[int]] = {c: [] for c in self.components}
        out["total"], out["per_gpu"] = [], []
        for t in contexts:
            totals = ev.totals(t, self.settings.batch)
            for c, v in totals.items():
                out[c].append(v)
            out["total"].append(sum(totals.values()))
            out["per_gpu"].append(ev.per_gpu_bytes(t, self.settings.batch))
        return out

    def to_json(self) -> dict:
        s = self.settings
        return {
            "model": self.model, "budget": s.budget, "mode": s.mode, "context": s.context,
            "batch": s.batch, "chunk": s.chunk,
            "gpu": {"name": s.gpu.name, "memory_bytes": s.gpu.memory_bytes}, "gpus": s.gpus,
            "settings": s.to_json(),
            "components": dict(self.components), "by_kind": self.by_kind,
            "total_bytes": self.total_bytes,
            "per_gpu_components": dict(self.per_gpu_components), "per_gpu_bytes": self.per_gpu_bytes,
            "most_loaded_stage": self.most_loaded_stage, "fits": self.fits,
            "gpus_needed": self.gpus_needed, "gpus_needed_by_component": self.gpus_needed_by_component,
            "gpus_needed_plan": self.gpus_needed_plan,
            "max_context": self.max_context, "max_batch": self.max_batch, "dominant": self.dominant,
            "growth": self.growth, "formulas": self.formulas, "formulas_per_gpu": self.formulas_per_gpu,
            "flops": self.flops, "limits": [x.to_json() for x in self.limits], "notes": self.notes,
        }

    def to_text(self) -> str:
        """The human table: binary (GiB) and decimal (GB) units, each labelled as what it is."""
        s = self.settings
        cap = s.gpu.memory_bytes
        head = (f"{self.model}: {s.mode}, context {s.context:,} tokens, batch {s.batch}"
                + (f", budget {s.budget}" if s.budget else "")
                + f"\n{s.gpus} x {s.gpu.name} ({format_bytes(cap, binary=False)} = {format_bytes(cap)} each), "
                + ("parallel " + _plan_text(s) if s.sharding == "plan" else "ideal sharding (no plan)"))
        rows = [("component", "one replica", "", "per GPU", "growth", "formula (one replica; T, B, C)")]
        for c in self.components:
            v = self.components[c]
            rows.append((c, format_bytes(v), format_bytes(v, binary=False),
                         format_bytes(self.per_gpu_components[c]), self.growth[c], self.formulas[c]))
        rows.append(("total", format_bytes(self.total_bytes), format_bytes(self.total_bytes, binary=False),
                     format_bytes(self.per_gpu_bytes), "", ""))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = [head, ""]
        for r in rows:
            cells = [r[i].ljust(widths[i]) if i == 0 else r[i].rjust(widths[i]) for i in range(5)]
            lines.append("  ".join(cells) + "  " + r[5])
        lines.append("")
        verdict = "fits" if self.fits else "does NOT fit"
        stage = f" (pipeline stage {self.most_loaded_stage})" if s.parallel.pp > 1 else ""
        lines.append(f"most loaded GPU{stage}: {format_bytes(self.per_gpu_bytes)} of {format_bytes(cap)}: {verdict}")
        lines.append(f"dominant component: {self.dominant}")
        lines.append(f"GPUs needed (total / capacity): {self.gpus_needed}" + self._plan_gpus_text())
        mc = "unbounded (memory is O(1) in T)" if self.max_context is None else f"{self.max_context:,} tokens"
        lines.append(f"largest context that fits: {mc}")
        mb = "unbounded" if self.max_batch is None else f"{self.max_batch:,}"
        lines.append(f"largest batch that fits at this context: {mb}")
        f = self.flops
        lines.append(f"FLOPs per decoded token at T: {f['per_token_total']:.4g} "
                     f"(attention {f['per_token']['attention']:.3g}, ssm {f['per_token']['ssm']:.3g}); "
                     f"prefill of T tokens: {f['prefill_total']:.4g}")
        if s.mode == "training":
            lines.append(f"FLOPs per training step and sequence (forward + backward, recompute {f['recompute']}): "
                         f"{f['training_step_total']:.4g}")
        for lim in self.limits:
            state = "ok" if lim.ok else f"FAILS by {lim.amount(lim.value - lim.bound)}"
            lines.append(f"require {lim.component} <= {lim.amount(lim.bound)}: {lim.amount(lim.value)} {state}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def _plan_gpus_text(self) -> str:
        """The GPU count the budget's plan needs, in words: tp*pp*cp times the smallest data-parallel size that
        fits (ZeRO and the batch split shrink with dp), or that no data-parallel size makes it fit."""
        s = self.settings
        if s.sharding != "plan":
            return ""
        p = s.parallel
        if self.gpus_needed_plan is None:
            return (f"; under this plan (tp={p.tp} pp={p.pp} cp={p.cp}): no number of GPUs fits, since no "
                    f"data-parallel size does")
        per_replica = p.tp * p.pp * p.cp
        return (f"; under this plan: {self.gpus_needed_plan:,} = tp*pp*cp {per_replica:,} x dp "
                f"{self.gpus_needed_plan // per_replica:,}, the smallest dp that fits")


def _plan_text(s: Settings) -> str:
    p = s.parallel
    parts = [f"tp={p.tp}", f"pp={p.pp}", f"cp={p.cp}", f"dp={p.dp}"]
    if p.ep > 1:
        parts.append(f"ep={p.ep}")
    if p.expert_tp != p.tp:
        parts.append(f"etp={p.expert_tp}")
    if s.mode == "training":
        parts += [f"zero={p.zero}", f"m={p.microbatches}", f"recompute={s.recompute}"]
        if p.sequence_parallel:
            parts.append("sp")
        if p.distributed_optimizer:
            parts.append("distributed optimizer")
    return " ".join(parts)


def report(model: ModelIR, budget: BudgetIR | None = None, *, user_gpus: dict[str, GpuSpec] | None = None,
           **overrides) -> MemoryReport:
    """Evaluate and solve the memory model of `model` under `budget` (or the defaults) + overrides.

    Overrides: any Settings field or ParallelPlan field (context=10**8, gpu="H200", tp=8, zero=3,
    dropout=True, ...). Without a budget and without `gpus`, the GPU count is derived: gpus_needed.
    """
    derive_gpus = budget is None and overrides.get("gpus") is None
    s = resolve(model, budget, user_gpus=user_gpus, **overrides)
    ev = Evaluator(model, s)
    T, B = s.context, s.batch
    components = ev.totals(T, B)
    total = sum(components.values())
    gpus_needed = max(1, -(-total // s.gpu.memory_bytes))
    if derive_gpus and s.sharding == "ideal":
        s = dataclasses.replace(s, gpus=gpus_needed)
        ev.settings = s
    stage, per_gpu = ev.per_gpu(T, B)
    per_gpu_total = sum(per_gpu.values())
    limits = [LimitCheck(lim.component, lim.bound, ev.limit_value(lim, T, B), lim.pos, measure=lim.measure)
              for lim in (budget.limits if budget is not None else ())]
    plan_limits = budget.limits if budget is not None else ()
    max_context = solve.largest_true(lambda t: ev.fits(t, B, plan_limits))
    max_batch = solve.largest_true(lambda b: ev.fits(T, b, plan_limits))
    gpus_plan = None
    if ev.plan is not None:
        p = s.parallel
        hi = max(1, B // p.microbatches, p.dp)
        dp = solve.smallest_true(lambda d: ev.per_gpu_bytes(T, B, d) <= s.gpu.memory_bytes, 1, hi)
        gpus_plan = None if dp is None else p.tp * p.pp * p.cp * dp
    by_kind = _by_kind(ev, T, B)
    flops = compute.flops(model, T, s.recompute)
    growth = {c: growth_order(compile_exact(ev.single_stages[0].combined[c]), B, s.chunk) for c in ev.components}
    r = MemoryReport(
        model=model.name, settings=s, components=components, by_kind=by_kind, total_bytes=total,
        per_gpu_components=per_gpu, per_gpu_bytes=per_gpu_total, most_loaded_stage=stage,
        gpus_needed=gpus_needed,
        gpus_needed_by_component={c: -(-v // s.gpu.memory_bytes) for c, v in components.items()},
        gpus_needed_plan=gpus_plan, max_context=max_context,
        max_batch=max_batch, dominant=solve.dominant(per_gpu), growth=growth,
        flops=flops, limits=limits, evaluator=ev)
    r.notes = _notes(r) + _runtime_notes(model, s)
    return r


def _symbolic_dp(s: Settings) -> Settings:
    """The settings with the data-parallel degree the symbol dp, to solve for the smallest GPU count."""
    return dataclasses.replace(s, parallel=dataclasses.replace(s.parallel, dp=DP))


def _by_kind(ev: Evaluator, T: int, B: int) -> dict[str, dict[str, int]]:
    """component -> kind -> bytes for one replica (see assemble.py for how activations combine)."""
    parts = [(c, k, e) for c, kinds in ev.single_stages[0].by_kind.items() for k, e in kinds.items()]
    values = compile_bytes([e for _, _, e in parts])(T, B, ev.settings.chunk) if parts else ()
    out: dict[str, dict[str, int]] = {c: {} for c in ev.components}
    for (c, k, _), v in zip(parts, values):
        out[c][k] = v
    return out


def _runtime_notes(model: ModelIR, s) -> list[str]:
    """A training plan the runtime would refuse, said where it is planned: the memory model answers for plans
    that ltmdsl.distributed does not run (its plan check, pure: no torch), and a user should learn that before
    `ltmdsl train --budget` refuses it."""
    p = s.parallel
    if s.mode != "training" or s.sharding != "plan" or p.world == 1:
        return []
    from ltmdsl.distributed.plan import plan_errors

    errors = plan_errors(model, p, p.world)
    if not errors:
        return []
    return ["ltmdsl.distributed does not run this plan, so `ltmdsl train --budget` would refuse it: " + "; ".join(errors)]


def _notes(r: MemoryReport) -> list[str]:
    s = r.settings
    notes = []
    if s.sharding == "ideal" and s.gpus > 1:
        notes.append(f"no parallel plan: per-GPU bytes spread the total evenly over {s.gpus} GPUs")
    if s.mode == "training":
        logits = r.per_gpu_components.get("logits", 0)
        if s.parallel.tp > 1:  # the vocab-parallel loss keeps no logits: its fp32 [s, V/t] ones are temporaries
            logits = r.per_gpu_components.get("temporaries", 0)
        if not s.chunked_loss:
            advice = chunked_loss_advice(logits, s.gpu.memory_bytes, r.per_gpu_bytes - logits)
            if advice:
                notes.append(advice)
        else:
            notes.append(f"chunked loss: fp32 logits for {min(s.chunk, s.context):,} tokens at a time")
    if s.sharding == "plan" and r.gpus_needed_plan is None:
        notes.append("no data-parallel degree up to max(B/m, dp) makes this plan fit: change tp/pp/cp, ZeRO or recompute")
    return notes
