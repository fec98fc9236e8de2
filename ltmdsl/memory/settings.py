"""Resolved settings of one memory evaluation: a budget (or the defaults) plus keyword overrides.

`resolve(model, budget, **overrides)` is the single place where defaults live, so the CLI, `report()`
and `check_budgets()` agree. Defaults without a budget (issue 3):

    mode inference, T = 128Ki, B = 1, chunk 4096, every dtype the model's dtype except fp32 gradients,
    AdamW with 12 optimizer bytes per parameter, selective recompute, flash attention, no chunked loss,
    K conv taps ("full", as state-spaces/mamba allocates), one H100, no parallelism.

Conventions that are not BudgetIR fields are overrides: `dropout` (1-byte masks, Korthikanti's "paper"
convention; default False), `activation_dtype` (default: the model dtype), `saved_by` and `sharding`:

    saved_by "eager"  training activations are what PyTorch autograd keeps when ltmdsl's runtime runs eagerly
                      (the default; checked against traced steps by `ltmdsl memory --measure`): a norm keeps an
                      fp32 copy of its input for its statistics, a gated FFN keeps act(gate) besides gate and up;
             "fused"  what fused kernels keep (Korthikanti et al. 2022, Megatron): a norm keeps its input and
                      output only, a gated FFN gate, up and the product (ltmdsl/memory/activations.py);

    "plan"  the budget's ParallelPlan decides what each GPU holds (the most loaded GPU is reported);
    "ideal" no plan was given: every byte is spread evenly over the GPUs (the Magic.dev style count).

Without a budget and without parallel overrides the sharding is "ideal"; with a budget it is "plan".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ltmdsl import hardware, units
from ltmdsl.evaluate import did_you_mean
from ltmdsl.ir import BudgetIR, Dtype, GpuSpec, ModelIR, ParallelPlan

DEFAULT_CONTEXT = 128 * 1024
DEFAULT_CHUNK = 4096
MODES = ("inference", "training")
RECOMPUTE = ("none", "selective", "full")
CONV_TAPS = ("full", "minus_one")
SAVED_BY = ("eager", "fused")
_PLAN_FIELDS = {f.name for f in dataclasses.fields(ParallelPlan)}


@dataclass(frozen=True)
class Settings:
    """Everything the formulas need besides the model: one budget, resolved."""

    mode: str
    context: int
    batch: int
    chunk: int
    gpu: GpuSpec
    gpus: int
    parallel: ParallelPlan
    weight_dtype: Dtype
    kv_dtype: Dtype
    state_dtype: Dtype
    grad_dtype: Dtype
    activation_dtype: Dtype
    optimizer: str
    optimizer_bytes_per_param: int
    recompute: str
    flash_attention: bool
    chunked_loss: bool
    conv_taps: str
    dropout: bool
    sharding: str  # "plan" | "ideal"
    budget: str | None = None
    saved_by: str = "eager"  # "eager" | "fused": what training activations keep (module docstring)

    @property
    def single(self) -> "Settings":
        """The same settings on one device with no parallelism: what `total_bytes` measures."""
        return dataclasses.replace(self, parallel=ParallelPlan(), gpus=1)

    @property
    def tp(self) -> int:
        return self.parallel.tp

    @property
    def pp(self) -> int:
        return self.parallel.pp

    @property
    def cp(self) -> int:
        return self.parallel.cp

    @property
    def dp(self) -> int:
        return self.parallel.dp

    @property
    def ep(self) -> int:
        return self.parallel.ep

    @property
    def etp(self) -> int:
        """The expert tensor parallel degree (tp unless the plan gives etp)."""
        return self.parallel.expert_tp

    def to_json(self) -> dict:
        p = self.parallel
        return {
            "mode": self.mode, "context": self.context, "batch": self.batch, "chunk": self.chunk,
            "gpu": {"name": self.gpu.name, "memory_bytes": self.gpu.memory_bytes}, "gpus": self.gpus,
            "parallel": dataclasses.asdict(p), "sharding": self.sharding,
            "dtypes": {"weights": self.weight_dtype.name, "kv": self.kv_dtype.name,
                       "state": self.state_dtype.name, "grad": self.grad_dtype.name,
                       "activations": self.activation_dtype.name},
            "optimizer": self.optimizer, "optimizer_bytes_per_param": self.optimizer_bytes_per_param,
            "recompute": self.recompute, "flash_attention": self.flash_attention,
            "chunked_loss": self.chunked_loss, "conv_taps": self.conv_taps, "dropout": self.dropout,
            "saved_by": self.saved_by,
        }


def as_dtype(value: Dtype | str) -> Dtype:
    """A Dtype from a Dtype or a spec name (`bf16`, `fp8`, ...); ValueError for unknown names."""
    if isinstance(value, Dtype):
        return value
    d = units.dtype(str(value))
    if d is None:
        raise ValueError(f"unknown dtype {value!r} (known: {', '.join(units.DTYPES)})")
    return d


def as_gpu(value: GpuSpec | str, user_defined: dict[str, GpuSpec] | None = None) -> GpuSpec:
    """A GpuSpec from a GpuSpec or a name (user-defined GPUs first, then the catalogue)."""
    if isinstance(value, GpuSpec):
        return value
    g = hardware.lookup(str(value), user_defined)
    if g is None:
        known = list(user_defined or {}) + hardware.names()
        hint = f"; write {hardware.AMBIGUOUS[value]}" if value in hardware.AMBIGUOUS else did_you_mean(str(value), known)
        raise ValueError(f"unknown GPU {value!r}{hint} (known: {', '.join(known)})")
    return g


def _derive_dp(plan: ParallelPlan, gpus: int) -> ParallelPlan:
    """dp = gpus / (tp*pp*cp) when the plan's world does not already account for every GPU."""
    if plan.world != gpus and plan.dp == 1:
        rest = plan.tp * plan.pp * plan.cp
        if gpus % rest == 0 and gpus // rest > 1:
            return dataclasses.replace(plan, dp=gpus // rest)
    return plan


def defaults(model: ModelIR) -> dict:
    """The settings used when a model has no budget (see the module docstring)."""
    return dict(
        mode="inference", context=DEFAULT_CONTEXT, batch=1, chunk=DEFAULT_CHUNK,
        gpu=hardware.CATALOGUE[hardware.DEFAULT_GPU], gpus=1, parallel=ParallelPlan(),
        weight_dtype=model.dtype, kv_dtype=model.dtype, state_dtype=model.dtype,
        grad_dtype=units.DTYPES["fp32"], activation_dtype=model.dtype, optimizer="adamw",
        optimizer_bytes_per_param=12, recompute="selective", flash_attention=True,
        chunked_loss=False, conv_taps="full", dropout=False, sharding="ideal", budget=None,
        saved_by="eager",
    )


def resolve(model: ModelIR, budget: BudgetIR | None = None, *,
            user_gpus: dict[str, GpuSpec] | None = None, **overrides) -> Settings:
    """Settings from a budget (or the defaults) with overrides applied and validated.

    Overrides take any Settings field, any ParallelPlan field (`tp=8`, `zero=3`, ...), dtype names as
    strings and GPU names. `gpus` without a budget keeps ideal sharding; parallel fields switch to "plan".
    Raises ValueError on an unknown override or value.
    """
    values = defaults(model)
    if budget is not None:
        for name in ("mode", "context", "batch", "chunk", "gpu", "gpus", "parallel", "weight_dtype",
                     "kv_dtype", "state_dtype", "grad_dtype", "optimizer", "optimizer_bytes_per_param",
                     "recompute", "flash_attention", "chunked_loss", "conv_taps"):
            values[name] = getattr(budget, name)
        values["sharding"] = "plan"
        values["budget"] = budget.name
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if budget is not None and overrides.get("mode", budget.mode) != budget.mode:
        # A serving budget evaluated for training (or back): the mode's own defaults, not the budget's.
        base = defaults(model)
        for name in ("optimizer", "recompute", "grad_dtype"):
            values[name] = base[name]
    plan_changes = {k: overrides.pop(k) for k in list(overrides) if k in _PLAN_FIELDS}
    unknown = set(overrides) - {f.name for f in dataclasses.fields(Settings)}
    if unknown:
        raise ValueError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    values.update(overrides)
    if plan_changes:
        values["parallel"] = dataclasses.replace(values["parallel"], **plan_changes)
        if "sharding" not in overrides:
            values["sharding"] = "plan"
    for name in ("weight_dtype", "kv_dtype", "state_dtype", "grad_dtype", "activation_dtype"):
        values[name] = as_dtype(values[name])
    values["gpu"] = as_gpu(values["gpu"], user_gpus)
    if values["sharding"] == "plan":
        values["parallel"] = _derive_dp(values["parallel"], values["gpus"])
    s = Settings(**values)
    _validate(s)
    if plan_changes and s.sharding == "plan":
        from ltmdsl.budgets import fold_problems  # (budgets imports the memory model)

        problems = fold_problems(model, s.parallel)
        if problems:  # the experts' bytes would be divided by ranks that do not exist
            raise ValueError("; ".join(message for _key, message in problems))
    return s


def _validate(s: Settings) -> None:
    if s.mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {s.mode!r}")
    if s.recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {', '.join(RECOMPUTE)}, not {s.recompute!r}")
    if s.conv_taps not in CONV_TAPS:
        raise ValueError(f"conv_taps must be one of {', '.join(CONV_TAPS)}, not {s.conv_taps!r}")
    if s.saved_by not in SAVED_BY:
        raise ValueError(f"saved_by must be one of {', '.join(SAVED_BY)}, not {s.saved_by!r}")
    if s.sharding not in ("plan", "ideal"):
        raise ValueError(f"sharding must be 'plan' or 'ideal', not {s.sharding!r}")
    for name in ("context", "batch", "chunk", "gpus"):
        if int(getattr(s, name)) < 1:
            raise ValueError(f"{name} must be a positive integer, not {getattr(s, name)!r}")
    p = s.parallel
    for name in ("tp", "pp", "cp", "dp", "ep", "microbatches", "interleave"):
        if getattr(p, name) < 1:
            raise ValueError(f"parallel degree {name} must be >= 1, not {getattr(p, name)}")
    if p.etp is not None and p.etp < 1:
        raise ValueError(f"parallel degree etp must be >= 1, not {p.etp}")
    if p.zero not in (0, 1, 2, 3):
        raise ValueError(f"zero stage must be 0..3, not {p.zero}")
