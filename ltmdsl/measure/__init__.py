"""Predicted against traced: run a budget's step at full size on fake tensors and compare with the memory model.

    from ltmdsl.measure import measure
    m = measure(spec.model, budget)          # a Measurement
    m.predicted, m.measured, m.peak_bytes, m.to_json(), m.to_text()

The model is built on the meta device in the budget's dtypes; a plan with tensor, context or expert
parallelism (the experts folded apart from the dense layers too: tp 1 x etp 2) or ZeRO-3 is split into one
rank's share by ltmdsl.distributed itself under a fake process group
(`ranks`), with pipeline parallelism too (the rank of the memory model's most loaded stage, split inside its
stage; under ZeRO-3 FSDP2 shards that stage alone, as a pipeline rank does); the modules of that rank get fake
storage under
`FakeTensorMode`, and the step runs for real on tensors that have shapes but no data, while `MemTracker`
follows every storage. Nothing is allocated, so a 405B model at its
budget's context traces on a laptop. Imports torch; `ltmdsl memory` without --measure never imports this.

Modules, one concept each:
    fakesafe   which kinds trace as they are, the MoE's static-shape balanced dispatch (expert parallel too),
               refusal naming a kind
    ranks      one rank of a parallel plan: the fake process group, its mesh, the traced rank
    stage      the modules one rank holds (pipeline stage) and the full-recompute units
    states     main gradients and AdamW states, sharded as the memory model says, and the AdamW step
    timeline   live bytes and named snapshots over a MemTracker (StepTracker: storages only, no per-module
               statistics, so a shared block's repeated modules trace); the peak and its phase
    train      the training step: forward (recompute policy), chunked loss, backward, optimizer
    infer      the inference step: cache of the budget's context, a prefill chunk, a decode step
    cost       how long a trace would take; refusal with a smaller context to try
    progress   a counter of the step's dispatched ops, their rate and the time so far (a terminal only)
    report     Measurement: per component predicted, traced, relative difference; the peak

What is approximated (also in each Measurement's notes): collectives allocate their outputs but communicate
nothing; ZeRO 1/2 are Megatron's flat sharded buffers of ceil(P/N) elements (ZeRO-3 is FSDP2, as
ltmdsl.distributed runs it); MoE routing is balanced; only the in-flight micro-batches of the 1F1B peak are run;
non-learned buffers (Lightning's slopes) are live but not weights. Tensor parallelism in inference traces one
rank's cache as the runtime allocates it on a split model (each kind's own heads, runtime.cache). Refused,
saying why: a plan ltmdsl.distributed does not run (its plan check), and context parallelism in inference
(the runtime runs it in training only). Every mixer kind of the runtime traces
(fakesafe.TRACE_PATHS). Training adds `temporaries`: the traced peak beyond everything the step holds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
import warnings

from ltmdsl.measure import ranks
from ltmdsl.measure.cost import TooLargeToTrace
from ltmdsl.measure.fakesafe import NotTraceable
from ltmdsl.measure.report import Measurement

__all__ = ["Measurement", "NotTraceable", "TooLargeToTrace", "measure"]


def _supported(ir, s) -> None:
    """Refuse (NotTraceable, saying why) a budget the traced step cannot run as ltmdsl would run it."""
    p = s.parallel
    if (s.mode == "training" and ranks.needs_group(p)) or p.tp > 1:  # a rank that ltmdsl.distributed builds
        from ltmdsl.distributed.plan import plan_errors

        errors = plan_errors(ir, p, p.world)
        if errors:
            raise NotTraceable("ltmdsl.distributed does not run this plan, so one of its ranks cannot be traced: "
                               + "; ".join(errors))
    if s.mode == "inference" and p.cp > 1:
        _cp_inference_supported(ir, s)
    wide = next((x for x in ir.layers if x.residual.width != 1 or x.residual.into != "residual"), None)
    if wide is not None and s.mode == "training" and s.recompute == "full":
        raise NotTraceable(f"layer {wide.index} '{wide.definition}' reads the embeddings or sends its output into the "
                           "next input, which full recompute's checkpoint units do not carry yet; measure it with "
                           "recompute = none or selective")
    from ltmdsl.runtime.build import KV_DTYPES, TORCH_DTYPES

    for what, key, dt, held in (("KV cache", "kv_dtype", s.kv_dtype, KV_DTYPES),
                                ("recurrent state", "state_dtype", s.state_dtype, TORCH_DTYPES)):
        if s.mode == "inference" and dt.name not in held:
            raise NotTraceable(f"the runtime keeps no {dt.name} {what} (it allocates {', '.join(held)}); "
                               f"measure the budget with another {key}")
    if s.weight_dtype.name != s.activation_dtype.name:
        raise NotTraceable(f"weights in {s.weight_dtype.name} with {s.activation_dtype.name} activations: the "
                           "runtime computes in its weights' dtype")


def _cp_inference_supported(ir, s) -> None:
    """Refuse what context-parallel inference (ltmdsl.distributed.cp_inference) does not run: a kind without its
    form, a chunk or a cache cp does not divide."""
    from ltmdsl.distributed.cp_inference import refusal, sharded_tokens

    cp = s.parallel.cp
    why = refusal(ir)
    if why is not None:
        raise NotTraceable(f"context parallelism (cp = {cp}) in inference: {why}; measure the budget without it")
    if min(s.chunk, s.context) % cp:
        raise NotTraceable(f"cp = {cp} does not divide the prefill chunk of {min(s.chunk, s.context)} tokens")
    for x, held in sharded_tokens(ir, s.context):
        if held % cp:
            raise NotTraceable(f"cp = {cp} does not divide the {held} cached tokens of layer '{x.definition}'")


def measure(model, budget=None, *, user_gpus=None, device: str | None = None, progress: bool = False,
            **overrides) -> Measurement:
    """Trace the budget's step for one rank and compare it with `ltmdsl.memory.report` (module docstring).

    `device="cuda"` runs the same step for real on that GPU instead of on fake tensors (one-GPU plans only,
    weights left uninitialised: only bytes are read) and also reports the CUDA caching allocator's own peak,
    `torch.cuda.max_memory_allocated`, beside the tracked one. `progress` counts the step's
    dispatched ops on stderr when it is a terminal (`ltmdsl memory --measure` does).
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
    if device is not None and ranks.needs_group(s.parallel):
        raise NotTraceable(f"a real run on {device} measures one GPU's plan; this budget's plan "
                           f"({s.parallel.world} GPUs) needs its process group: trace it on fake tensors")
    if device is None:
        cost.check(model, s, stage_index)
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
    with contextlib.ExitStack() as group, warnings.catch_warnings():
        # MemTracker warns about the None gradients of parameters that have none yet
        warnings.filterwarnings("ignore", message="Expected a tensor or a traceable wrapper-subclass")
        warnings.filterwarnings("ignore", category=FutureWarning)  # torch's deprecated collective names
        sizes, root = None, None
        if ranks.needs_group(s.parallel):
            sizes, root = _split(net, model, s, stage_index, group, notes)
        bar = None
        if progress and sys.stderr.isatty():
            from ltmdsl.measure.progress import OpProgress

            bar = OpProgress(f"tracing {model.name} ({s.mode}, {s.context:,} tokens)")
        measured, peak, phase, phases, allocated = _trace(net, model, s, stage_index, sizes, dtype, notes, root,
                                                          device, bar)
    predicted = dict(r.per_gpu_components)
    if s.mode == "inference":
        predicted = {c: predicted.get(c, 0) for c in ("weights", "kv_cache", "recurrent_state", "activations", "logits")}
    measured = {c: measured.get(c, 0) for c in predicted}
    if "temporaries" in predicted:  # the traced peak beyond everything the step holds: the backward's transients
        measured["temporaries"] = max(0, peak - sum(v for c, v in measured.items() if c != "temporaries"))
    return Measurement(model.name, s.budget, s.mode, predicted, measured, peak, phase, r.per_gpu_bytes,
                       stage_index, time.perf_counter() - t0, notes, phases, device or "fake", allocated)


def _split(net, model, s, stage_index: int, group: contextlib.ExitStack, notes: list[str]):
    """Enter the plan's fake process group (closed with `group`) and split the meta model into the traced
    rank's share as ltmdsl.distributed does; returns (the parameters' sizes on this rank before ZeRO-3, FSDP2's
    root under ZeRO-3: the model, or under pp the traced stage cut as the pipeline cuts it; else None)."""
    from ltmdsl.distributed.context_parallel import ContextParallelUnsupported
    from ltmdsl.distributed.data_parallel import apply_fsdp
    from ltmdsl.distributed.mesh import replica_mesh
    from ltmdsl.distributed.rank_model import split
    from ltmdsl.measure import stage as stage_mod
    from ltmdsl.runtime.kinds import TensorParallelUnsupported

    p = s.parallel
    mesh = group.enter_context(ranks.fake_group(p, stage_index))
    # inference under cp: the mixers keep their own forward (ltmdsl.distributed.cp_inference runs them), not
    # training's cp_forward
    split_plan = dataclasses.replace(p, cp=1) if s.mode == "inference" else p
    try:
        split(net, split_plan, mesh, fsdp_stages=())
    except (TensorParallelUnsupported, ContextParallelUnsupported, ValueError) as e:
        raise NotTraceable(f"this rank cannot be built: {e}") from None
    sizes = stage_mod.local_sizes(net)
    root = None
    if p.zero >= 3:  # FSDP2 on the model, or under pp on this rank's pipeline stage only, as parallelize does
        root = net if p.pp == 1 else stage_mod.pipeline_root(net, model, p.pp, stage_index)
        apply_fsdp(root, replica_mesh(mesh, p), 3)
    notes.append(f"rank {ranks.traced_rank(p, stage_index)} of {p.world} built as ltmdsl.distributed builds it, under "
                 "a fake process group (collectives allocate their outputs; nothing is communicated)"
                 + ("; ZeRO-3 by FSDP2, weights gathered mixer by mixer" if p.zero >= 3 else ""))
    if s.mode == "training" and p.cp > 1:
        from ltmdsl.distributed.context_parallel import chunk_ids

        chunks = chunk_ids(p.cp - 1, p.cp, p.cp_split)
        notes.append(f"context parallelism, the {p.cp_split} split: cp rank {p.cp - 1} of {p.cp} (the last, whose "
                     f"queries see every key) holds sequence chunk{'s' if len(chunks) > 1 else ''} "
                     f"{' and '.join(map(str, chunks))} of {2 * p.cp if p.cp_split == 'balanced' else p.cp}")
    if s.mode == "inference" and p.cp > 1:
        from ltmdsl.distributed.cp_inference import ContextParallelInferenceUnsupported, serve

        try:
            net.cp_server = serve(net, mesh["cp"])  # infer.run's sub-layers go through it
        except ContextParallelInferenceUnsupported as e:
            raise NotTraceable(str(e)) from None
        notes.append(f"context-parallel inference: rank {p.cp - 1} of cp = {p.cp} (the last: its queries see every "
                     "key of the chunk), its tokens of the prefill chunk and 1/cp of each attention cache")
    return sizes, root


def _trace(net, model, s, stage_index: int, sizes, dtype, notes: list[str], root=None, device: str | None = None,
           bar=None):
    """The traced step on fake tensors, or for real on `device`: (measured components, peak bytes, its phase,
    the phase marks, the CUDA allocator's peak over the step or None). `bar`, a progress.OpProgress, counts
    the step's ops."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ltmdsl.measure import infer, stage as stage_mod, train
    from ltmdsl.measure.timeline import StepTracker, Timeline

    if device is None:  # the meta parameters are the only non-fake inputs
        where = contextlib.ExitStack()
        where.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
    else:  # a real run: the step's factory calls (inputs, states) allocate on the device
        where = contextlib.ExitStack()
        where.enter_context(torch.device(device))
        cuda = torch.device(device).type == "cuda"
        name = torch.cuda.get_device_name(device) if cuda else device
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        notes.append(f"run for real on {name} (weights uninitialised: bytes only"
                     + ("; the allocator's peak is max_memory_allocated over the step, less what was allocated "
                        "before)" if cuda else ")"))
    allocated = None
    if bar is not None:  # inside the fake mode: it sees the ops as they are dispatched, before MemTracker's
        where.enter_context(bar)
    with where:
        st = stage_mod.materialise(net, model, s.pp, stage_index, sizes, root, device=device or "cpu")
        if st.buffer_bytes():
            notes.append(f"the held modules' buffers ({st.buffer_bytes():,} B of computed constants) are live but "
                         "not counted as weights")
        if s.mode == "training":
            mt = StepTracker()
            mt.track_external(*st.held())
            with mt:
                tl = Timeline(mt)
                measured = train.run(st, model, s, tl, dtype)
                peak, phase, phases = tl.peak(), tl.peak_phase(), tl.marks
        else:
            measured, peaks, phases = infer.run(st, model, s, dtype)
            phase = max(peaks, key=peaks.get)
            peak = peaks[phase]
        if device is not None and torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
            allocated = torch.cuda.max_memory_allocated(device) - before
    return measured, peak, phase, phases, allocated
