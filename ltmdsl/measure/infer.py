"""The traced inference step of one rank: the cache of the budget's context, one prefill chunk and one decode
step, on fake tensors.

    cache      each held sub-layer's cache entry for b = ceil(B/dp) sequences of T tokens, allocated by its
               runtime kind (one tp rank's heads); traced bytes per component (kv_cache, recurrent_state)
    prefill    the last chunk of Cc = min(C, T) tokens, at positions T - Cc .. T - 1, against the cache (the
               attention reads every cached key); logits for the last position only. Under context
               parallelism (cp > 1) the traced rank's Cc/cp tokens, each attention layer's cache 1/cp of its
               slots, the sub-layers run by ltmdsl.distributed.cp_inference (the chunk's keys all-gathered,
               the cached shards read one rank's at a time, recurrent states passed)
    decode     one token at position T - 1
    logits     the fp32 logits of the last position, 4*b*V

Each phase has its own tracker (timeline.StepTracker; the weights and the cache given as external tensors), so
the traced activations are that phase's peak above the weights and cache; the component is the larger of the two.
"""

from __future__ import annotations

import math

import torch

from ltmdsl.measure.stage import Stage
from ltmdsl.measure.timeline import StepTracker, Timeline
from ltmdsl.memory.settings import Settings
from ltmdsl.runtime.build import KV_DTYPES, TORCH_DTYPES
from ltmdsl.runtime.cache import Cache, CacheRequest, COMPONENTS


def _mix(stage: Stage, block, normed: torch.Tensor, state, pos0: int, calls: int, decode: bool, use):
    """The sub-layer's mixer as the rank runs it: its own call, or under context parallelism (`net.cp_server`,
    ltmdsl.distributed.cp_inference) its cp form over a call of `calls` tokens, this rank holding 1/cp."""
    server = getattr(stage.net, "cp_server", None)
    if server is None:
        return block.mix(normed, state, pos0, decode, use)
    return server.mix(block, normed, state, pos0, calls, use)


def _stack(stage: Stage, x: torch.Tensor, cache: Cache, pos0: int, calls: int | None = None) -> torch.Tensor:
    """LTModel.forward for the held sub-layers: ids [b, t] or hidden [b, t, d] -> last position's logits [b, 1, V]
    (last stage) or the hidden states [b, t, d]."""
    net = stage.net
    decode = x.shape[1] == 1
    h = net.embed(x) if stage.first else x  # [b, t, d]
    if stage.first and net.ir.embed_scale != 1.0:
        h = h * net.ir.embed_scale
    embeds = h if getattr(net, "embeds_needed", False) else None  # [b, t, d], for input = concat_embed
    pending = inject = None
    for i in stage.layers:
        block = net.layers[i]
        normed, h = block.enter(h, pending, inject, embeds)  # [b, t, d or 2d], [b, t, d]
        pending = inject = None  # added into h, released before the mixer runs (as LTModel.forward)
        state = cache.layers[i - stage.layers.start]
        use = net.uses[str(i)] if str(i) in net.uses else None
        out = _mix(stage, block, normed, state, pos0, calls or x.shape[1], decode, use)  # [b, t, d]
        normed = None  # released before the branch and the next norm run (as LTModel.forward)
        out = block.branch(out, net.ir.residual_scale)  # [b, t, d]
        if net.ir.layers[i].residual.into == "next_input":
            inject = out
        else:
            pending = out
        out = None
    if not stage.last:
        return h + pending
    normed, _ = net.final_norm(pending, h)
    return net.head(normed[:, -1:])  # [b, 1, V]


def _phase(stage: Stage, cache: Cache, x: torch.Tensor, pos0: int, calls: int | None = None) -> tuple[int, int, torch.Tensor]:
    """(peak above the live start, live start, output) of one forward under its own tracker."""
    mt = StepTracker()
    mt.track_external(*stage.held(), *[t for e in cache.layers if e is not None for t in e.tensors()], x)
    with mt:
        tl = Timeline(mt)
        start = tl.mark("start")
        with torch.no_grad():
            y = _stack(stage, x, cache, pos0, calls)
        tl.mark("end")
        return tl.peak() - start, start, y


def run(stage: Stage, ir, s: Settings, dtype: torch.dtype) -> tuple[dict, dict, list[tuple[str, int]]]:
    """Traced components, the phase peaks {phase: total live bytes at its peak} and the phase marks."""
    b = math.ceil(s.batch / s.dp)
    T, Cc = s.context, min(s.chunk, s.context)
    cp = s.cp
    from ltmdsl.distributed.cp_inference import new_entry
    from ltmdsl.runtime.kinds import runtime_kind

    mt = StepTracker()
    mt.track_external(*stage.held())
    out = dict.fromkeys(("weights", *COMPONENTS, "activations", "logits"), 0)
    with mt:
        tl = Timeline(mt)
        out["weights"] = tl.mark("weights") - stage.buffer_bytes()  # parameters; buffers are not weights
        req = CacheRequest(b, T, KV_DTYPES[s.kv_dtype.name], TORCH_DTYPES[s.state_dtype.name], s.conv_taps, "cpu",
                           s.tp)  # under tp this rank's heads, as LTModel.new_cache allocates them on a split model
        entries = []
        for i in stage.layers:
            layer = ir.layers[i]
            new = runtime_kind(layer.kind).new_cache
            before = tl.live()
            if cp > 1:  # 1/cp of each attention layer's slots, the rest whole (ltmdsl.distributed.cp_inference)
                entry = new_entry(layer, req, cp)
            else:
                entry = None if new is None else new(layer.mixer, req)
            if entry is not None:  # traced bytes, shared out as the entry's components hold them
                parts, live = entry.by_component(), tl.live() - before
                for component, n in parts.items():
                    out[component] += live * n // max(sum(parts.values()), 1)
            entries.append(entry)
        tl.mark("cache")
    cache = Cache(entries, b, T)
    peaks = {}
    n = Cc // cp  # this rank's tokens of the chunk (cp = 1: all of them)
    if stage.first:
        ids = torch.zeros(b, n, dtype=torch.long)  # [b, Cc/cp]
    else:
        ids = torch.zeros(b, n, ir.d_model, dtype=dtype)  # [b, Cc/cp, d] received hidden states
    pre, start, y = _phase(stage, cache, ids, T - Cc, Cc)
    peaks["prefill"] = start + pre  # the last position's logits are part of the prefill's peak
    if stage.last:  # the fp32 logits sampling reads, the model-dtype ones released
        lt = StepTracker()
        lt.track_external(y)
        with lt:
            lg = y.float()  # [b, 1, V]
            del y
            out["logits"] = Timeline(lt).live()
            del lg
    else:
        del y
    del ids
    one = torch.zeros(b, 1, dtype=torch.long) if stage.first else torch.zeros(b, 1, ir.d_model, dtype=dtype)
    dec, start, y = _phase(stage, cache, one, T - 1)
    peaks["decode"] = start + dec
    out["activations"] = max(pre, dec)
    return out, peaks, tl.marks
