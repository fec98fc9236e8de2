"""`check_budgets(spec_ir)`: evaluate every declared budget for `ltmdsl check` (exit 3 on a failure).

A budget fails when one of its `require QUANTITY <= BOUND` lines does not hold at the budget's context
and batch (a byte quantity, a sum of them such as `kv_cache + recurrent_state`, or a FLOP quantity), or when its most loaded GPU exceeds the GPU's capacity (an implicit `require per_gpu <=
capacity`, reported at the budget's position). Each failure names the component, the excess, and the
largest context at which that limit alone would hold; the message also gives the largest context at
which the whole budget holds. Failing messages are one `file:line:col: error: ...` line per failure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ltmdsl.errors import Diagnostic
from ltmdsl.ir import BudgetIR, SourcePos, SpecIR
from ltmdsl.memory import solve
from ltmdsl.memory.report import MemoryReport, report
from ltmdsl.units import format_bytes, format_flops


@dataclass(frozen=True)
class LimitFailure:
    """One limit over its bound: which, by how much, and where the `require` line is."""

    component: str
    value: int
    bound: int
    pos: SourcePos
    max_context: int | None  # the largest T at which this limit holds (None: at every T)
    measure: str = "bytes"  # bytes | flops

    @property
    def over_by(self) -> int:
        return self.value - self.bound

    def describe(self) -> str:
        fit = ("it holds at no context" if self.max_context == 0 else
               "it holds at any context" if self.max_context is None else
               f"the largest context that fits is {self.max_context:,} tokens")
        amount = _both if self.measure == "bytes" else format_flops
        return (f"{self.component} is {amount(self.value)}, over the limit of {amount(self.bound)} "
                f"by {amount(self.over_by)}; {fit}")


@dataclass
class BudgetResult:
    """The verdict on one budget: `ok`, the failures and a one-paragraph `message`."""

    budget: str
    model: str
    ok: bool
    failures: list[LimitFailure] = field(default_factory=list)
    message: str = ""
    pos: SourcePos | None = None
    report: MemoryReport | None = field(default=None, repr=False)
    #: one error per failure, at its `require` line (or the budget, for the GPU's capacity), to render with
    #: the source line and a caret; `message` is the same text as plain `file:line:col: error:` lines
    diagnostics: tuple[Diagnostic, ...] = ()

    def to_json(self) -> dict:
        return {
            "budget": self.budget, "model": self.model, "ok": self.ok, "message": self.message,
            "pos": str(self.pos) if self.pos else None,
            "failures": [{"component": f.component, "measure": f.measure, f"max_{f.measure}": f.bound,
                          "value": f.value, "over_by": f.over_by, "max_context": f.max_context, "pos": str(f.pos)}
                         for f in self.failures],
            "per_gpu_bytes": self.report.per_gpu_bytes if self.report else None,
            "total_bytes": self.report.total_bytes if self.report else None,
            "max_context": self.report.max_context if self.report else None,
        }


def _both(n: int) -> str:
    """Bytes in decimal and binary units, each labelled as what it is."""
    return f"{format_bytes(n, binary=False)} ({format_bytes(n)})"


def check_budget(spec_ir: SpecIR, budget: BudgetIR) -> BudgetResult:
    """Evaluate one budget of a spec."""
    model = spec_ir.model(budget.model)
    r = report(model, budget, user_gpus={g.name: g for g in spec_ir.gpus})
    ev = r.evaluator
    T, B = r.settings.context, r.settings.batch
    failures = []
    for lim in budget.limits:
        value = ev.limit_value(lim, T, B)
        if value > lim.bound:
            mc = solve.largest_true(lambda t, lim=lim: ev.limit_value(lim, t, B) <= lim.bound)
            failures.append(LimitFailure(lim.component, value, lim.bound, lim.pos, mc, lim.measure))
    cap = r.settings.gpu.memory_bytes
    # an explicit `require per_gpu <= X` with X <= capacity already says everything the capacity check would
    stricter = any(lim.parts == ("per_gpu",) and lim.bound <= cap for lim in budget.limits)
    if r.per_gpu_bytes > cap and not stricter:
        mc = solve.largest_true(lambda t: ev.per_gpu_bytes(t, B) <= cap)
        failures.append(LimitFailure(f"per_gpu ({r.settings.gpu.name} capacity)", r.per_gpu_bytes, cap,
                                     budget.pos, mc))
    if not failures:
        msg = (f"budget {budget.name}: ok, {_both(r.per_gpu_bytes)} on the most loaded of "
               f"{r.settings.gpus} x {r.settings.gpu.name}")
    else:
        overall = ("no context fits" if r.max_context == 0 else
                   f"the largest context that fits every limit is {r.max_context:,} tokens"
                   if r.max_context is not None else "")
        texts = [f"budget {budget.name} (context {T:,}): {f.describe()}" for f in failures]
        if overall and (len(failures) > 1 or failures[0].max_context != r.max_context):
            texts[-1] += f"; {overall}"
        diagnostics = tuple(Diagnostic(f.pos.file, f.pos.line, f.pos.col, text) for f, text in zip(failures, texts))
        msg = "\n".join(f"{f.pos}: error: {text}" for f, text in zip(failures, texts))
        return BudgetResult(budget.name, model.name, False, failures, msg, budget.pos, r, diagnostics)
    return BudgetResult(budget.name, model.name, True, failures, msg, budget.pos, r)


def check_budgets(spec_ir: SpecIR) -> list[BudgetResult]:
    """Every budget of the spec, in declaration order."""
    return [check_budget(spec_ir, b) for b in spec_ir.budgets]
