"""Context-parallel inference: every cp rank holds 1/cp of each attention layer's KV cache, and the ranks
together run prefill, chunked prefill, decode and `generate` exactly as one process does.

The memory model's per-GPU convention (ltmdsl/kinds/attention.py `cache`): an attention layer keeps
tokens_held(T) / cp slots on each rank (T, or a window's min(T, W)); recurrent states, conv taps and
everything else are whole on every rank (replicated). This module follows it exactly: `new_cache` gives
each attention layer a `KVCache` of tokens_held / cp slots and every other kind its ordinary entry, so a
rank's cache bytes are `ltmdsl.memory.cache_bytes(..., cp=cp)`.

Where a position's keys live (cyclic ownership): position p on rank p mod cp, slot p // cp (a window's ring:
(p // cp) mod S, S = W / cp slots). Among any W consecutive positions each rank owns W / cp, so the ring of
every rank together holds exactly the last W positions, and a global cache's T / cp slots per rank hold
positions 0 .. T - 1. Every rank can say which position a slot holds (`slot_positions`) from the number of
tokens seen, so no position table is stored.

A prefill chunk of L tokens (cp must divide L) is cut contiguously: rank r runs tokens [r L/cp, (r+1) L/cp)
through the token-local work (norms, projections, MLP, MoE). Per mixer kind:

    attention   this rank's queries attend over (a) the chunk's keys and values, all-gathered in sequence
                order (what training's cp_forward does, `ContextShard.gather`), causal and windowed by
                position, and (b) the keys cached by earlier calls, one rank's shard at a time (broadcast by
                its owner, as a ring passes them): partial attentions merged by their log-sum-exp. The
                chunk's keys and values are then written to the ranks that own their positions.
    recurrent   (every kind whose cache is a state: Mamba-1/2, Gated DeltaNet, KDA, short conv, lightning,
                RG-LRU, mLSTM) the state is passed: rank 0 runs its tokens from the cached state with the
                kind's own stateful forward, its state (conv taps included) is broadcast to every rank, then
                rank 1 continues from it, and so on. Every rank ends with the state after the chunk
                (replicated), exactly as one process; the recurrences of a chunk run one rank after another.
    stateless   (MLP, MoE) token-local, unchanged.

Decode: every rank holds the same token. Recurrent and stateless kinds step on their replicated state as in
one process. Attention: the rank owning the position writes the new key and value; every rank attends over
its own shard, and the partial outputs are combined with their log-sum-exp (flash-decoding across ranks:
an all-reduce of the maximum, then of the weighted sums). The last position's logits (the last rank holds
it after a prefill) are broadcast, so every rank samples the same token.

Each kind says its form (`RuntimeKind.cp_inference`: "sharded" as attention, "passed" as the recurrent
kinds, "local" as the stateless ones). Refused, naming the kind: kinds with no form here (today MLA,
`parallel` and `transformer_block`, whose caches mix keys and states or hold a latent), and configs a kind
refuses (attention: non-causal, sinks, soft caps, chunked attention, as training's cp). Under tensor
parallelism (a model split by ltmdsl.distributed's tp, cp ranks of the same tp coordinate) each rank holds
its own heads' 1/cp, as the memory model's per-GPU cache at tp x cp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ltmdsl.distributed.context_parallel import ContextShard
from ltmdsl.runtime.cache import Cache, CacheRequest, LayerCache
from ltmdsl.runtime.kinds import CP_FORMS, ContextParallelInferenceUnsupported, runtime_kind
from ltmdsl.runtime.kinds.attention import Attention, KVCache
from ltmdsl.runtime.model import OUTPUTS, LTModel, decode_tokens

def form(layer) -> str:
    """The form a sub-layer takes here (its kind's `RuntimeKind.cp_inference`: "sharded", "passed" or "local");
    ContextParallelInferenceUnsupported naming the kind and layer when its kind has none or refuses its config."""
    of = runtime_kind(layer.kind).cp_inference
    if of is None:
        raise ContextParallelInferenceUnsupported(f"no form for kind {layer.kind!r} (layer '{layer.definition}')")
    try:
        found = of(layer.mixer)
    except ContextParallelInferenceUnsupported as e:
        raise ContextParallelInferenceUnsupported(f"layer '{layer.definition}' (kind {layer.kind!r}): {e}") from None
    if found not in CP_FORMS:
        raise ValueError(f"kind {layer.kind!r}: cp_inference gave {found!r}, not one of {CP_FORMS}")
    return found


def refusal(ir) -> str | None:
    """Why context-parallel inference cannot serve `ir`, naming the first offending layer (None: it can)."""
    for layer in ir.layers:
        try:
            form(layer)
        except ContextParallelInferenceUnsupported as e:
            return str(e)
    return None


def check_ir(ir) -> None:
    """Refuse, naming the first offending layer, what context-parallel inference does not run."""
    why = refusal(ir)
    if why is not None:
        raise ContextParallelInferenceUnsupported(f"context-parallel inference: {why}; serve it with cp = 1")


def check_model(model: LTModel) -> None:
    """check_ir of the model's IR."""
    check_ir(model.ir)


def sharded_tokens(ir, context: int) -> list[tuple[object, int]]:
    """(sub-layer, tokens its cache holds at `context`: the context, or its span when shorter) for each
    position-sharded layer of `ir`, whose tokens cp must divide; the IR's layers must pass check_ir."""
    return [(x, context if x.mixer.span is None else min(context, x.mixer.span)) for x in ir.layers
            if form(x) == "sharded"]


def kv_slots(tokens_held: int, cp: int, what: str) -> int:
    """tokens_held / cp, the slots of one rank; ValueError when cp does not divide it."""
    if tokens_held % cp:
        raise ValueError(f"cp = {cp} does not divide the {tokens_held} cached tokens of {what}")
    return tokens_held // cp


def new_cache(model: LTModel, cp: int, batch_size: int, max_context: int, dtype: torch.dtype | None = None,
              state_dtype: torch.dtype | None = None, conv_taps: str = "full") -> Cache:
    """One cp rank's cache (module docstring): tokens_held / cp slots of every attention layer, every other
    entry whole. Bytes: ltmdsl.memory.cache_bytes(..., cp=cp)."""
    from ltmdsl.runtime.tensor_parallel import tp_size

    kv = dtype or model.dtype
    req = CacheRequest(batch_size, max_context, kv, state_dtype or kv, conv_taps, model.device, tp_size(model))
    return Cache([new_entry(layer, req, cp) for layer in model.ir.layers], batch_size, max_context)


def new_entry(layer, req: CacheRequest, cp: int) -> LayerCache | None:
    """One sub-layer's entry on a cp rank: a sharded layer's KVCache of tokens_held / cp slots (its tp rank's
    KV heads), any other kind's own entry, whole."""
    new = runtime_kind(layer.kind).new_cache
    if form(layer) != "sharded":
        return None if new is None else new(layer.mixer, req)
    c, B = layer.mixer, req.batch_size
    held = req.max_context if c.span is None else min(req.max_context, c.span)
    S = kv_slots(held, cp, f"layer '{layer.definition}'")
    Hkv = req.kv_per_rank(c.kv_heads)  # a tp rank's KV heads
    k = torch.zeros(B, S, Hkv, c.head_dim, dtype=req.kv_dtype, device=req.device)  # [B, S, Hkv, D]
    v = torch.zeros(B, S, Hkv, c.v_head_dim, dtype=req.kv_dtype, device=req.device)  # [B, S, Hkv, Dv]
    return KVCache(k, v, c.span, c.chunk)


def slot_positions(rank: int, cp: int, slots: int, last: int, ring: bool, device=None) -> torch.Tensor:
    """The position each of rank `rank`'s slots holds once positions 0 .. last are written, [slots] (int64),
    -1 where a slot holds none yet. Global: slot s holds s*cp + rank. Ring of S slots: the rank's positions
    p = m*cp + rank with m in (m_last - S, m_last], m_last the index of its latest position <= last, at slot
    m mod S."""
    s = torch.arange(slots, device=device)  # [S]
    if not ring:
        pos = s * cp + rank  # [S]
        return torch.where(pos <= last, pos, torch.full_like(pos, -1))
    if last < rank:
        return torch.full_like(s, -1)
    m_last = (last - rank) // cp
    m = m_last - torch.remainder(m_last - s, slots)  # [S]
    return torch.where(m >= 0, m * cp + rank, torch.full_like(m, -1))


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float):
    """Attention of q [B, Lq, H, D] over the keys k [B, Lk, Hkv, D] (values v [B, Lk, Hkv, Dv]) that `allowed`
    [Lq, Lk] (bool) permits, normalised over those keys only -> (o [B, Lq, H, Dv], lse [B, Lq, H]) in fp32
    (fp64 for fp64 inputs). A query with no allowed key has o = 0 and lse = -inf, so merging ignores it."""
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, Lq, H, D = q.shape
    Hkv = k.shape[2]
    qg = q.to(work).view(B, Lq, Hkv, H // Hkv, D)  # [B, Lq, Hkv, G, D]
    s = torch.einsum("bqhgd,bkhd->bhgqk", qg, k.to(work)).mul_(scale)  # [B, Hkv, G, Lq, Lk]
    s.masked_fill_(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [B, Hkv, G, Lq]
    p = s.sub_(torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None]).exp_()  # in place: one score tensor
    o = torch.einsum("bhgqk,bkhd->bqhgd", p, v.to(work))  # [B, Lq, Hkv, G, Dv]
    return o.reshape(B, Lq, H, -1), lse.permute(0, 3, 1, 2).reshape(B, Lq, H)


def flash_partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool = False):
    """partial_attention without a mask, by a fused kernel where one returns the log-sum-exp (CPU's flash
    attention: no [Lq, Lk] scores held), else the explicit form. q [B, Lq, H, D] over every key k [B, Lk, Hkv, D]
    (causal: Lq = Lk, query i over keys <= i) -> (o [B, Lq, H, Dv], lse [B, Lq, H]). The query heads of a KV
    head are folded into the query length, so the keys are not repeated (causal: they are, Lk = Lq tokens)."""
    B, Lq, H, D = q.shape
    Lk, Hkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = H // Hkv
    if q.device.type != "cpu" or D != Dv or q.dtype not in (torch.float32, torch.float64, torch.bfloat16):
        allowed = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device)  # [Lq, Lk]
        return partial_attention(q, k, v, allowed.tril() if causal else allowed, scale)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if causal:
        k, v = k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)  # [B, Lq, H, D]
        o, lse = flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, True, scale=scale)
        return o.transpose(1, 2), lse.transpose(1, 2)  # [B, Lq, H, Dv], [B, Lq, H]
    qf = q.view(B, Lq, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * Lq, D)  # [B, Hkv, G*Lq, D]
    o, lse = flash(qf, k.transpose(1, 2), v.transpose(1, 2), 0.0, False, scale=scale)  # [B, Hkv, G*Lq, Dv]
    o = o.view(B, Hkv, G, Lq, Dv).permute(0, 3, 1, 2, 4).reshape(B, Lq, H, Dv)
    return o, lse.view(B, Hkv, G, Lq).permute(0, 3, 1, 2).reshape(B, Lq, H)


class Merged:
    """A running merge of partial attentions over disjoint key sets (`add(o, lse)`, o [B, L, H, Dv], lse
    [B, L, H]): o the attention over their union, in the log-sum-exp's dtype (fp32, fp64 for fp64)."""

    def __init__(self):
        self.o = self.lse = None

    def add(self, o: torch.Tensor, lse: torch.Tensor) -> None:
        """Merge one more part in place: the accumulator rescaled, the part added with its weight (no copy of
        the part in the accumulator's dtype)."""
        if self.o is None:
            self.o, self.lse = o.to(lse.dtype), lse
            return
        new = torch.logaddexp(self.lse, lse)  # [B, L, H]
        safe = torch.where(torch.isinf(new), torch.zeros_like(new), new)
        self.o.mul_(torch.exp(self.lse - safe)[..., None])  # [B, L, H, Dv]
        self.o.addcmul_(o, torch.exp(lse - safe)[..., None])
        self.lse = new


@dataclass(frozen=True)
class CPGroup:
    """This rank's place among the cp ranks (its 1-D mesh, rank and size) and the collectives over them."""

    mesh: object
    rank: int
    size: int

    @classmethod
    def of(cls, mesh) -> "CPGroup":
        return cls(mesh, mesh.get_local_rank(), mesh.size())

    def broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        """t as cp rank `src` holds it, on every rank: a new tensor (torch's functional collective, which also
        runs under a fake process group on fake tensors, as the memory trace runs it)."""
        from torch.distributed import _functional_collectives as funcol

        return funcol.broadcast(t.contiguous(), src=src, group=self.mesh)  # src: the rank in the cp group

    def all_reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        """t reduced over the cp ranks by `op` ("max" or "sum"): a new tensor."""
        from torch.distributed import _functional_collectives as funcol

        return funcol.all_reduce(t.contiguous(), op, group=self.mesh)


class ContextParallelServer:
    """One cp rank of a model served with context parallelism: `new_cache`, `forward` (prefill, chunked
    prefill, decode; every rank passes the same whole input ids) and `generate`, as LTModel's."""

    def __init__(self, model: LTModel, cp_mesh):
        check_model(model)
        self.model, self.group = model, CPGroup.of(cp_mesh)
        self.shard = ContextShard(cp_mesh, self.group.rank, self.group.size, "contiguous")

    def eval(self) -> "ContextParallelServer":
        self.model.eval()
        return self

    def parameters(self):
        """The served model's parameters (every cp rank holds them whole; a tp rank its shards)."""
        return self.model.parameters()

    def new_cache(self, batch_size: int, max_context: int, dtype: torch.dtype | None = None,
                  state_dtype: torch.dtype | None = None, conv_taps: str = "full") -> Cache:
        return new_cache(self.model, self.group.size, batch_size, max_context, dtype, state_dtype, conv_taps)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, cache: Cache, output: str = "logits") -> torch.Tensor:
        """input_ids [B, L], the same on every rank, continuing at cache.seen -> logits [B, L, V] ("logits"),
        [B, 1, V] ("last") or the final norm's output [B, L, d] ("hidden"), the same on every rank."""
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}")
        net, cp, r = self.model, self.group.size, self.group.rank
        B, L = input_ids.shape
        if B != cache.batch_size:
            raise ValueError(f"cache was allocated for batch {cache.batch_size}, got {B}")
        if cache.seen + L > cache.max_context:
            raise ValueError(f"cache holds {cache.max_context} tokens; this call would reach position "
                             f"{cache.seen + L}")
        decode = L == 1
        if not decode and L % cp:
            raise ValueError(f"cp = {cp} must divide a prefill chunk's {L} tokens (each rank runs L/cp of them)")
        pos0, n = cache.seen, (1 if decode else L // cp)
        ids = input_ids if decode else input_ids[:, r * n:(r + 1) * n]  # [B, n]
        h = net.embed(ids)  # [B, n, d]
        if net.ir.embed_scale != 1.0:
            h = h * net.ir.embed_scale
        embeds = h if net.embeds_needed else None
        pending = inject = None
        for i, block in enumerate(net.layers):
            normed, h = block.enter(h, pending, inject, embeds)  # [B, n, d]
            pending = inject = None
            use = net.uses[str(i)] if str(i) in net.uses else None
            out = self.mix(block, normed, cache.layers[i], pos0, L, use)  # [B, n, d]
            normed = None
            out = block.branch(out, net.ir.residual_scale)
            if net.ir.layers[i].residual.into == "next_input":
                inject = out
            else:
                pending = out
            out = None
        normed, _ = net.final_norm(h, None) if pending is None else net.final_norm(pending, h)  # [B, n, d]
        cache.seen += L
        if decode:
            every = normed
        elif output == "last":
            every = self.group.broadcast(normed[:, -1:], cp - 1)  # [B, 1, d]: the last rank's last token
        else:
            every = self.shard.gather(normed)  # [B, L, d] in sequence order
        if output == "hidden":
            return every
        return net.head(every[:, -1:] if output == "last" else every)

    __call__ = forward

    def mix(self, block, normed: torch.Tensor, state: LayerCache | None, pos0: int, L: int, use=None):
        """One sub-layer's mixer on this rank's tokens normed [B, n, d] of a call of L tokens from pos0 (a decode
        step: L = 1, the token on every rank) -> [B, n, d]: attention, a passed state, or the kind's own call."""
        decode = L == 1
        n = 1 if decode else L // self.group.size
        mine = pos0 + (0 if decode else self.group.rank * n)
        if isinstance(state, KVCache):
            return self._attention(block.mixer, normed, state, pos0, mine, L)
        if state is None or decode:  # token-local, or one step on a replicated state
            return block.mix(normed, state, mine, decode, use)
        return self._passed(block, normed, state, pos0, n, use)

    def _passed(self, block, normed: torch.Tensor, state: LayerCache, pos0: int, n: int, use) -> torch.Tensor:
        """A recurrent sub-layer over the chunk, its state passed from rank to rank (module docstring)."""
        out = None
        for j in range(self.group.size):
            if j == self.group.rank:
                out = block.mix(normed, state, pos0 + j * n, False, use)  # [B, n, d]
            for t in state.tensors():
                t.copy_(self.group.broadcast(t, j))  # the state after rank j's tokens, on every rank
        return out

    def _attention(self, mod: Attention, x: torch.Tensor, state: KVCache, pos0: int, mine: int, L: int):
        """x [B, n, d] at positions mine .. mine + n - 1 of a call of L tokens from pos0 -> [B, n, d]."""
        cfg, cp, r = mod.cfg, self.group.size, self.group.rank
        B, n, _ = x.shape
        q, k, v, gate = mod._qkv(x, mine)  # [B, n, H, D], [B, n, Hkv, D], [B, n, Hkv, Dv]
        W = cfg.window
        ring = state.window is not None
        S = state.slots
        qpos = torch.arange(mine, mine + n, device=x.device)  # [n]
        if L == 1:  # decode: the owner writes, every rank attends over its shard, merged across ranks
            if pos0 % cp == r:
                slot = (pos0 // cp) % S if ring else pos0 // cp
                state.k[:, slot] = k[:, 0].to(state.k.dtype)
                state.v[:, slot] = v[:, 0].to(state.v.dtype)
            kpos = slot_positions(r, cp, S, pos0, ring, x.device)  # [S]
            o, lse = partial_attention(q, state.k.to(q.dtype), state.v.to(v.dtype),
                                       _allowed(qpos, kpos, W), mod.scale)  # [B, 1, H, Dv], [B, 1, H]
            top = self.group.all_reduce(lse, "max")  # [B, 1, H]
            top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
            w = torch.exp(lse - top)  # [B, 1, H]
            num = self.group.all_reduce(w[..., None] * o, "sum")  # [B, 1, H, Dv]
            den = self.group.all_reduce(w, "sum")  # [B, 1, H]
            o = num / den[..., None]
        else:
            k_all = self.shard.gather(k)  # [B, L, Hkv, D]: the chunk's keys in sequence order
            v_all = self.shard.gather(v)  # [B, L, Hkv, Dv]
            chunk_pos = torch.arange(pos0, pos0 + L, device=x.device)  # [L]
            acc = Merged()
            if W is None:  # global: no mask; earlier ranks' keys, this rank's causal block, the cached shards
                if r:
                    acc.add(*flash_partial(q, k_all[:, :r * n], v_all[:, :r * n], mod.scale))
                acc.add(*flash_partial(q, k, v, mod.scale, causal=True))
                for j in range(cp if pos0 else 0):  # the keys cached by earlier calls: each rank's shard in turn
                    held = (pos0 - j + cp - 1) // cp  # rank j's positions j, j + cp, ... below pos0
                    kj = self.group.broadcast(state.k, j)  # [B, S, Hkv, D]: rank j's shard
                    vj = self.group.broadcast(state.v, j)  # [B, S, Hkv, Dv]
                    if held:
                        acc.add(*flash_partial(q, kj[:, :held].to(q.dtype), vj[:, :held].to(v.dtype), mod.scale))
                    kj = vj = None
            else:  # a window: explicit scores masked by position
                acc.add(*partial_attention(q, k_all, v_all, _allowed(qpos, chunk_pos, W), mod.scale))
                for j in range(cp if pos0 else 0):
                    kj = self.group.broadcast(state.k, j)  # [B, S, Hkv, D]
                    vj = self.group.broadcast(state.v, j)  # [B, S, Hkv, Dv]
                    kpos = slot_positions(j, cp, S, pos0 - 1, ring, x.device)  # [S]
                    acc.add(*partial_attention(q, kj.to(q.dtype), vj.to(v.dtype), _allowed(qpos, kpos, W),
                                               mod.scale))
                    kj = vj = None
            o = acc.o  # [B, n, H, Dv]
            own = torch.arange((r - pos0) % cp, L, cp, device=x.device)  # [L/cp] chunk indices this rank stores
            if ring:  # only each rank's newest S positions survive
                own = own[-S:]
            slots = (chunk_pos[own] // cp) % S if ring else chunk_pos[own] // cp
            state.k[:, slots] = k_all[:, own].to(state.k.dtype)
            state.v[:, slots] = v_all[:, own].to(state.v.dtype)
        o = o.to(q.dtype).reshape(B, n, -1)  # [B, n, H*Dv]
        return mod._out(o, gate)  # [B, n, d]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, seed: int | None = None, cache: Cache | None = None) -> torch.Tensor:
        """LTModel.generate across the cp ranks: the prompt [B, T] (cp divides T) prefilled split, then
        `max_new_tokens` decode steps; every rank returns the same [B, T + max_new_tokens] (sampling draws from
        the same seeded generator on every rank, on the same logits)."""
        B, T = input_ids.shape
        if cache is None:
            total = T + max_new_tokens
            cache = self.new_cache(B, math.ceil(total / self.group.size) * self.group.size)
        return decode_tokens(self, input_ids, cache, max_new_tokens, temperature, top_k, seed)


def _allowed(qpos: torch.Tensor, kpos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[Lq, Lk] bool: key position held (>= 0), at or before the query, and inside its window when one."""
    ok = (kpos[None, :] >= 0) & (kpos[None, :] <= qpos[:, None])
    if window is not None:
        ok &= kpos[None, :] > qpos[:, None] - window
    return ok


def serve(model: LTModel, cp_mesh) -> ContextParallelServer:
    """`model` (whole, replicated weights on every rank) served over the cp ranks of `cp_mesh`."""
    return ContextParallelServer(model, cp_mesh)
