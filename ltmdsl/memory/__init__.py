"""The symbolic memory and compute model of a spec (issue 3): no torch, no triton.

    from ltmdsl.memory import report, cache_bytes, weights_bytes, check_budgets
    r = report(spec.model, spec.budgets[0] if spec.budgets else None, context=10**8)
    r.components["kv_cache"], r.per_gpu_bytes, r.max_context, r.to_json()

Modules, one concept each:
    symbols     the symbols T, B, C (and dp) and exact integer evaluation of sympy expressions
    settings    a budget (or the defaults) plus overrides, resolved into Settings
    inference   residual workspace and logits; cache_bytes / weights_bytes (each kind's cache facet)
    activations the per-micro-batch quantities and `stored`, dispatching to each kind's facet
                (the per-kind formulas live in ltmdsl/kinds/<kind>.py)
    training    weights, gradients, optimizer under ZeRO / distributed optimizer; loss logits; 1F1B
    assemble    per-kind, per-stage sums built once per distinct layer configuration
    compute     FLOPs per decoded token and per prefill
    solve       largest context / batch, smallest GPU count, dominant component
    report      MemoryReport and its table / JSON
    budgets     check_budgets for `ltmdsl check`
    plot        bytes against context, log-log (matplotlib imported lazily)
"""

from __future__ import annotations

from ltmdsl.memory.assemble import INFERENCE_COMPONENTS, TRAINING_COMPONENTS
from ltmdsl.memory.budgets import BudgetResult, LimitFailure, check_budget, check_budgets
from ltmdsl.memory.compute import FLOP_QUANTITIES, flops
from ltmdsl.memory.inference import cache_bytes, weights_bytes
from ltmdsl.memory.report import MemoryReport, report
from ltmdsl.memory.settings import Settings, resolve

#: Every name a `require` line may use.
LIMIT_NAMES = tuple(dict.fromkeys(INFERENCE_COMPONENTS + TRAINING_COMPONENTS + ("total", "per_gpu")
                                  + tuple(FLOP_QUANTITIES)))

__all__ = [
    "BudgetResult", "INFERENCE_COMPONENTS", "LIMIT_NAMES", "LimitFailure", "MemoryReport", "Settings",
    "TRAINING_COMPONENTS", "cache_bytes", "check_budget", "check_budgets", "flops", "report", "resolve",
    "weights_bytes",
]
