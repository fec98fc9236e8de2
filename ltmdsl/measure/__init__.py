"""Predicted against traced: run a budget's step at full size on fake tensors and compare with the memory model.

    from ltmdsl.measure import measure
    m = measure(spec.model, budget)          # a Measurement
    m.predicted, m.measured, m.peak_bytes, m.to_json(), m.to_text()

The model is built on the meta device in the budget's dtypes, the modules of one rank (the memory model's
most loaded pipeline stage) get fake storage under `FakeTensorMode`, and the step runs for real on tensors that
have shapes but no data, while `MemTracker` follows every storage. Nothing is allocated, so a 405B model at its
budget's context traces on a laptop. Imports torch; `ltmdsl memory` without --measure never imports this.

Modules, one concept each:
    fakesafe   which kinds trace as they are, the MoE's static-shape balanced dispatch, refusal naming a kind
    stage      the modules one rank holds (pipeline stage) and the full-recompute units
    states     main gradients and AdamW states, sharded as the memory model says, and the AdamW step
    timeline   live bytes and named snapshots over a MemTracker; the peak and its phase
    train      the training step: forward (recompute policy), chunked loss, backward, optimizer
    infer      the inference step: cache of the budget's context, a prefill chunk, a decode step
    cost       how long a trace would take; refusal with a smaller context to try
    report     Measurement: per component predicted, traced, relative difference; the peak

What is approximated (also in each Measurement's notes): tensor, context and expert parallelism and ZeRO-3
are not traced (refused: the rank's shards of each layer are not built under fake tensors); sharded gradient
and optimizer buffers hold ceil(P/N) elements and the collectives are not simulated; MoE routing is balanced;
only the in-flight micro-batches of the 1F1B peak are run; non-learned buffers (Lightning's slopes) are live
but not weights. Every mixer kind of the runtime traces (fakesafe.TRACE_PATHS).
"""

from __future__ import annotations

import time
import warnings

from ltmdsl.measure.cost import TooLargeToTrace
from ltmdsl.measure.fakesafe import NotTraceable
from ltmdsl.measure.report import Measurement

__all__ = ["Measurement", "NotTraceable", "TooLargeToTrace", "measure"]


def _supported(ir, s) -> None:
    p = s.parallel
    why = {
        "tensor": "ltmdsl's tensor parallelism keeps the embedding, head and norms replicated where the memory "
                  "model divides them by t (vocab-parallel), so a traced rank's weights could not match",
        "context": "the all-gather of every rank's keys and values is not simulated",
        "expert": "the all-to-all dispatch sizes depend on the routing, which fake tensors do not have",
    }
    for name, value in (("tensor", p.tp), ("context", p.cp), ("expert", p.ep)):
        if value > 1:
            raise NotTraceable(f"{name} parallelism ({name[0]}p = {value}) is not traced: {why[name]}; measure "
                               "the budget without it")
    if p.zero >= 3:
        raise NotTraceable("ZeRO-3 gathers weights layer by layer, which the traced step does not simulate")
    from ltmdsl.runtime.build import TORCH_DTYPES

    for what, key, dt in (("KV cache", "kv_dtype", s.kv_dtype), ("recurrent state", "state_dtype", s.state_dtype)):
        if s.mode == "inference" and dt.name not in TORCH_DTYPES:
            raise NotTraceable(f"the runtime keeps no {dt.name} {what} (it allocates {', '.join(TORCH_DTYPES)}); "
                               f"measure the budget with another {key}")
    if s.weight_dtype.name != s.activation_dtype.name:
        raise NotTraceable(f"weights in {s.weight_dtype.name} with {s.activation_dtype.name} activations: the "
                           "runtime computes in its weights' dtype")


def measure(model, budget=None, *, user_gpus=None, **overrides) -> Measurement:
    """Trace the budget's step for one rank and compare it with `ltmdsl.memory.report` (module docstring).

    Raises NotTraceable (a kind without a fake-safe path, an untraced plan) or TooLargeToTrace.
    """
    from ltmdsl.memory import report
    from ltmdsl.measure import cost, fakesafe

    # one rank of a plan: without a budget the memory model would otherwise spread every byte evenly ("ideal")
    overrides.setdefault("sharding", "plan")
    r = report(model, budget, user_gpus=user_gpus, **overrides)
    s = r.settings
    notes = fakesafe.check(model)
    _supported(model, s)
    stage_index = r.most_loaded_stage
    if s.mode == "inference" and s.kv_dtype.name != s.activation_dtype.name and any(
            l.kind in ("attention", "mla") for l in model.layers):
        notes.append(f"the {s.kv_dtype.name} KV cache is read back whole in {s.activation_dtype.name} by the runtime's "
                     "prefill, which the memory model (a kernel converting tiles) does not count")
    cost.check(model, s, stage_index)
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from ltmdsl.measure import infer, stage as stage_mod, train
    from ltmdsl.measure.timeline import Timeline
    from ltmdsl.runtime.build import TORCH_DTYPES, construct
    from ltmdsl.runtime.kernels import REFERENCE_KERNELS, TORCH_KERNELS

    if s.weight_dtype.name not in TORCH_DTYPES:
        raise NotTraceable(f"the runtime cannot compute in {s.weight_dtype.name}")
    dtype = TORCH_DTYPES[s.weight_dtype.name]
    kernels = TORCH_KERNELS
    if not s.flash_attention:  # eager attention keeps its scores: the explicit-softmax kernel
        kernels = TORCH_KERNELS.override("eager", {"attention": REFERENCE_KERNELS.attention})
        if s.mode == "training" and s.recompute == "selective":
            from torch.utils.checkpoint import checkpoint

            eager = REFERENCE_KERNELS.attention

            def recomputed(*args, **kwargs):
                return checkpoint(eager, *args, use_reentrant=False, **kwargs)

            kernels = TORCH_KERNELS.override("eager-selective", {"attention": recomputed})
    t0 = time.perf_counter()
    net = construct(model, kernels, dtype)
    with warnings.catch_warnings(), FakeTensorMode(allow_non_fake_inputs=True):  # the meta parameters are the only non-fake inputs
        # MemTracker warns about the None gradients of parameters that have none yet
        warnings.filterwarnings("ignore", message="Expected a tensor or a traceable wrapper-subclass")
        st = stage_mod.materialise(net, model, s.pp, stage_index)
        if st.buffer_bytes():
            notes.append(f"the held modules' buffers ({st.buffer_bytes():,} B of computed constants) are live but "
                         "not counted as weights")
        if s.mode == "training":
            mt = MemTracker()
            mt.track_external(*st.held())
            with mt:
                tl = Timeline(mt)
                measured = train.run(st, model, s, tl, dtype)
                peak, phase, phases = tl.peak(), tl.peak_phase(), tl.marks
        else:
            measured, peaks, phases = infer.run(st, model, s, dtype)
            phase = max(peaks, key=peaks.get)
            peak = peaks[phase]
    predicted = dict(r.per_gpu_components)
    if s.mode == "inference":
        predicted = {c: predicted.get(c, 0) for c in ("weights", "kv_cache", "recurrent_state", "activations", "logits")}
    measured = {c: measured.get(c, 0) for c in predicted}
    return Measurement(model.name, s.budget, s.mode, predicted, measured, peak, phase, r.per_gpu_bytes,
                       stage_index, time.perf_counter() - t0, notes, phases)
