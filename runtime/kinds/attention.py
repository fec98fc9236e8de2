"""Softmax attention sub-layer: MHA / GQA / MQA, RoPE, causal or not, optional sliding window and qk-norm.

    q = q_proj(x) [B,T,H,D]   k = k_proj(x) [B,T,Hkv,D]   v = v_proj(x) [B,T,Hkv,Dv]
    (Qwen3 qk-norm: RMSNorm over D per head, before RoPE) -> RoPE(q, k) at positions pos0 + t
    (frequencies rescaled by `rope_scaling`, e.g. Llama 3.1's llama3 scaling; with `rope_dim` R only the
    first R channels of each head are rotated, at frequencies over R, as Bamba's partial_rotary_factor does)
    o = attention(q, k, v) [B,T,H,Dv] -> o_proj -> [B,T,d]

Variants: `gate` (Qwen3NextAttention) splits q_proj's [B,T,H,2D] into q and a gate, o * sigmoid(gate);
`qk_l2_norm` (Llama4TextL2Norm) scales q and k by rsqrt(mean(x^2) + eps) per head; `sinks` (GptOssAttention),
`softcap` (Gemma2Attention) and `chunk` (Llama-4's chunked attention) run `attention_variant` /
`attention_variant_decode` instead of the SDPA kernels. A chunked layer's cache is a ring of min(max_context, C)
slots whose first p mod C + 1 slots hold the current chunk at position p. `temperature_floor` (Llama-4's NoPE
layers) multiplies the query at position p by 1 + temperature_scale * log1p(floor((p + 1) / temperature_floor)),
computed in fp32 (fp64 for fp64 models) as Llama4TextAttention computes it, after RoPE and the qk norm.

With a cache, keys and values are written where their positions say: slot p for global attention, slot
p % S of a ring buffer for a window (S = min(max_context, W)). Chunked prefill reads the cached keys back
in time order and attends over [cached ; new]; the one-token `step` uses `attention_decode` over the slots.
Mirrors transformers' LlamaAttention (and Qwen3Attention for qk-norm, MistralAttention for the window).

The runtime entry `KIND` (runtime/kinds/__init__.py): the module, its `KVCache` allocation, the kernel ops
it calls (attention, attention_decode; the oracle is the explicit-softmax reference), its parameter names
and its tensor-parallel plan (heads split over ranks; the module reads its local head count off the
projections' output, so the same code runs whole or as one rank's heads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from ltmdsl.kinds.attention import AttentionConfig, mask_rows, window_rows
from ltmdsl.runtime import initializers as init
from ltmdsl.runtime import ops_attention
from ltmdsl.runtime.cache import CacheRequest, LayerCache
from ltmdsl.runtime.kinds import ContextParallelInferenceUnsupported, RuntimeKind, TensorParallelUnsupported
from ltmdsl.runtime.norm import RMSNorm
from ltmdsl.runtime.ops_attention import apply_rope, rope_cos_sin
from ltmdsl.runtime.ops_norm import rmsnorm
from ltmdsl.runtime.tensor_parallel import head_replicas, local, mark_tp, shard_parameters, shared_weight

if TYPE_CHECKING:
    from ltmdsl.runtime.kernels import Kernels


@dataclass
class KVCache(LayerCache):
    """Keys and values of one attention sub-layer: k [B, S, Hkv, D], v [B, S, Hkv, Dv].

    `window` None: slot = position (global attention, S = max_context). Otherwise a ring of
    S = min(max_context, W) slots: position p lives in slot p % S, so memory stays flat however many
    tokens stream through.
    """

    component: ClassVar[str] = "kv_cache"
    k: torch.Tensor
    v: torch.Tensor
    window: int | None  # the ring's span: the window W, or the chunk C (then `chunk` is set too)
    chunk: int | None = None

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.k, self.v)


def new_cache(cfg: AttentionConfig, req: CacheRequest) -> KVCache:
    """Zeroed keys and values in the KV dtype: max_context slots, or a ring of min(max_context, W); Hkv / t KV
    heads on a tensor-parallel rank (its tp_plan splits them)."""
    S = req.max_context if cfg.span is None else min(req.max_context, cfg.span)
    B, Hkv = req.batch_size, req.kv_per_rank(cfg.kv_heads)
    k = torch.zeros(B, S, Hkv, cfg.head_dim, dtype=req.kv_dtype, device=req.device)  # [B, S, Hkv, D]
    v = torch.zeros(B, S, Hkv, cfg.v_head_dim, dtype=req.kv_dtype, device=req.device)  # [B, S, Hkv, Dv]
    return KVCache(k, v, cfg.span, cfg.chunk)


def outputs(cfg: AttentionConfig) -> dict[str, bool]:
    """Output projections for the init (runtime.initializers): o_proj reads the attention output, no norm."""
    return {"o_proj.weight": False}


def state_names(cfg: AttentionConfig) -> tuple[str, ...]:
    """The parameters an `Attention` owns (docs/CONTRACTS.md names), biases and qk-norms as configured."""
    names = [f"{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    if cfg.qkv_bias:
        names += [f"{p}.bias" for p in ("q_proj", "k_proj", "v_proj")]
    if cfg.out_bias:
        names.append("o_proj.bias")
    if cfg.qk_norm:
        names += ["q_norm.weight", "k_norm.weight"]
    if cfg.sinks:
        names.append("sinks")
    return tuple(names)


class Attention(nn.Module):
    """forward(x [B,T,d], state: KVCache | None, pos0) -> [B,T,d]; step(x [B,d], state, pos0) -> [B,d]."""

    def __init__(self, cfg: AttentionConfig, d: int, eps: float, kernels: "Kernels", d_in: int | None = None):
        """`d_in`: the width q, k and v read (default d; 2d in Zamba's shared block, transformer_block)."""
        super().__init__()
        d_in = d if d_in is None else d_in
        self.cfg, self.kernels = cfg, kernels
        H, Hkv, D, Dv = cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.v_head_dim
        R = cfg.rotary_dim
        if cfg.rope_theta is not None and (R % 2 or not 2 <= R <= D):  # IRs built by hand skip the front end
            raise ValueError(f"rope_dim must be even and in [2, head_dim = {D}], got {R}")
        self.scale = cfg.score_scale  # `scale`, query_pre_attn_scalar^-1/2 or D^-1/2
        if cfg.gate and Dv != D:
            raise ValueError(f"gate needs v_head_dim = head_dim, got {Dv} and {D}")
        self.q_proj = nn.Linear(d_in, H * D * (2 if cfg.gate else 1), bias=cfg.qkv_bias)  # [q_h ; gate_h] per head
        self.k_proj = nn.Linear(d_in, Hkv * D, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d_in, Hkv * Dv, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(H * Dv, d, bias=cfg.out_bias)
        self.q_norm = RMSNorm(D, eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(D, eps) if cfg.qk_norm else None
        self.eps = eps
        self.sinks = nn.Parameter(torch.zeros(H)) if cfg.sinks else None  # [H] sink logits

    def init_weights(self, gen: torch.Generator) -> None:
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            init.linear_(lin, gen)
        for n in (self.q_norm, self.k_norm):
            if n is not None:
                n.init_weights(gen)
        if self.sinks is not None:
            init.normal_(self.sinks, gen)

    def _qkv(self, x: torch.Tensor, pos0: int, delta=None):
        """x [B,T,d] -> q [B,T,H,D], k [B,T,Hkv,D], v [B,T,Hkv,Dv] with qk-norm, RoPE and the query temperature
        applied, and the output gate [B,T,H*D] (None without `gate`). `delta(x)`, when given, returns what to add
        to the three projections' outputs (a use's LoRA adapters, transformer_block), each [B,T,rows] or None."""
        cfg = self.cfg
        B, T, _ = x.shape
        gate = None
        qp, kp, vp = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [B, T, rows] each
        if delta is not None:
            qp, kp, vp = (p if dp is None else p + dp for p, dp in zip((qp, kp, vp), delta(x)))
        if cfg.gate:
            q, gate = qp.view(B, T, -1, 2 * cfg.head_dim).chunk(2, dim=-1)  # [B, T, H, D] each
            gate = gate.reshape(B, T, -1)  # [B, T, H*D] (H/t heads per tp rank)
        else:
            q = qp.view(B, T, -1, cfg.head_dim)  # [B, T, H, D] (H/t on a tp rank)
        k = kp.view(B, T, -1, cfg.head_dim)  # [B, T, Hkv, D]
        v = vp.view(B, T, -1, cfg.v_head_dim)  # [B, T, Hkv, Dv]
        if self.q_norm is not None:  # one weight [D] for every head (under tp, heads on every rank)
            q = rmsnorm(q, shared_weight(self.q_norm), self.q_norm.eps)  # [B, T, H, D]
            k = rmsnorm(k, shared_weight(self.k_norm), self.k_norm.eps)  # [B, T, Hkv, D]
        if cfg.qk_l2_norm:  # rotations keep the mean square, so before or after RoPE is the same
            q, k = self._l2(q), self._l2(k)
        if cfg.rope_theta is not None:
            positions = torch.arange(pos0, pos0 + T, device=x.device)  # [T]
            cos, sin = rope_cos_sin(positions, cfg.rotary_dim, cfg.rope_theta, q.dtype, cfg.rope_scaling,
                                    seq_len=pos0 + T)  # [T, R]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cfg.temperature_floor is not None:  # Llama-4's temperature tuning: a growing query scale per position
            work = torch.float64 if q.dtype == torch.float64 else torch.float32
            p = torch.arange(pos0, pos0 + T, device=x.device, dtype=work)  # [T]
            s = 1 + cfg.temperature_scale * torch.log1p(torch.floor((p + 1) / cfg.temperature_floor))  # [T]
            q = (q * s[None, :, None, None]).to(q.dtype)  # [B, T, H, D]
        return q, k, v, gate

    def _sinks(self) -> torch.Tensor | None:
        """The sink logits [H] of the heads this module runs (this tp rank's H/t), or None."""
        return None if self.sinks is None else local(self.sinks)

    def _l2(self, x: torch.Tensor) -> torch.Tensor:
        """Llama-4's weightless qk norm: x [..., D] * rsqrt(mean(x^2) + eps), computed in fp32 (or fp64)."""
        work = x.float() if x.dtype != torch.float64 else x
        return (work * torch.rsqrt(work.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def _out(self, o: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        """o [..., H*Dv] -> o_proj(o * sigmoid(gate)) [..., d] (no gate: o_proj(o))."""
        return self.o_proj(o if gate is None else o * torch.sigmoid(gate))

    def forward(self, x: torch.Tensor, state: KVCache | None = None, pos0: int = 0, delta=None) -> torch.Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        q, k, v, gate = self._qkv(x, pos0, delta)
        if state is not None:
            k, v = self._write_and_read(state, k, v, pos0)  # [B, Tk, Hkv, D] with Tk >= T
        if cfg.plain_softmax and cfg.chunk is None:
            o = self.kernels.attention(q, k, v, causal=cfg.causal, window=cfg.window, scale=self.scale)
        else:
            o = self.kernels.attention_variant(q, k, v, causal=cfg.causal, window=cfg.window, chunk=cfg.chunk,
                                               scale=self.scale, softcap=cfg.softcap, sinks=self._sinks())
        return self._out(o.reshape(B, T, -1), gate)  # [B, T, d] (o: [B, T, H*Dv], or H/t heads per tp rank)

    def _write_and_read(self, state: KVCache, k: torch.Tensor, v: torch.Tensor, pos0: int):
        """Store the new keys/values; return [earlier keys in time order ; new keys] (and values)."""
        T, S = k.shape[1], state.slots
        kc, vc = state.k, state.v
        if state.window is None:  # global: slot = position
            end = pos0 + T
            if end > S:
                raise ValueError(f"cache holds {S} tokens; this call would reach position {end}")
            kc[:, pos0:end] = k
            vc[:, pos0:end] = v
            return kc[:, :end].to(k.dtype), vc[:, :end].to(v.dtype)
        # Ring buffer: the last min(pos0, S) positions are still held, at slots p % S; with chunks only those of
        # the current chunk, pos0 mod C of them.
        kept = min(pos0, S) if state.chunk is None else pos0 % state.chunk
        slots = torch.arange(pos0 - kept, pos0, device=k.device) % S  # [kept], time order
        k_all = torch.cat([kc[:, slots].to(k.dtype), k], dim=1)  # [B, kept + T, Hkv, D]
        v_all = torch.cat([vc[:, slots].to(v.dtype), v], dim=1)
        m = min(T, S)  # only the newest S tokens survive the write
        new_slots = torch.arange(pos0 + T - m, pos0 + T, device=k.device) % S  # [m]
        kc[:, new_slots] = k[:, T - m :].to(kc.dtype)
        vc[:, new_slots] = v[:, T - m :].to(vc.dtype)
        return k_all, v_all

    def step(self, x: torch.Tensor, state: KVCache, pos0: int, delta=None) -> torch.Tensor:
        """One token per sequence at position pos0: x [B,d] -> [B,d]; writes its key/value into the cache."""
        cfg = self.cfg
        B = x.shape[0]
        q, k, v, gate = self._qkv(x[:, None], pos0, delta)  # [B, 1, H|Hkv, D]
        S = state.slots
        if state.window is None and pos0 >= S:
            raise ValueError(f"cache holds {S} tokens; this step is at position {pos0}")
        slot = pos0 % S
        state.k[:, slot] = k[:, 0].to(state.k.dtype)
        state.v[:, slot] = v[:, 0].to(state.v.dtype)
        n_valid = min(pos0 + 1, S) if cfg.chunk is None else pos0 % cfg.chunk + 1  # the chunk: slots 0..p mod C
        if cfg.plain_softmax:
            o = self.kernels.attention_decode(
                q[:, 0], state.k.to(q.dtype), state.v.to(v.dtype), n_valid=n_valid, scale=self.scale
            )  # [B, H, Dv]
        else:
            o = self.kernels.attention_variant_decode(q[:, 0], state.k.to(q.dtype), state.v.to(v.dtype),
                                                      n_valid=n_valid, scale=self.scale, softcap=cfg.softcap,
                                                      sinks=self._sinks())  # [B, H, Dv]
        return self._out(o.reshape(B, -1), None if gate is None else gate[:, 0])  # [B, H*Dv] (H/t heads per tp rank)


def tp_plan(cfg: AttentionConfig, tp: int) -> dict:
    """Megatron-LM's attention split: q/k/v column-wise (H/t query heads per rank, biases with them), o_proj
    row-wise (one all-reduce). KV heads: Hkv/t per rank while tp divides them; with fewer KV heads than ranks
    (MQA, GQA at t > Hkv; t a multiple of Hkv) each rank holds the one KV head its query heads use
    (`head_replicas`: replicated, the copies' gradients summed). gpt-oss's sink logits split with their
    heads; the qk-norm weights, one head_dim each shared by every head, are replicated with their gradients
    summed over the ranks (`shared_weight`)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    H, Hkv = cfg.heads, cfg.kv_heads
    if H % tp or (Hkv % tp and tp % Hkv):
        raise TensorParallelUnsupported(
            f"tp = {tp} must divide the attention's {H} heads, and divide its {Hkv} kv heads or be a multiple "
            "of them (each rank then holds the kv head its query heads use)")
    plan = {"q_proj": ColwiseParallel(), "k_proj": kv_style(Hkv, tp), "v_proj": kv_style(Hkv, tp),
            "o_proj": RowwiseParallel()}
    if cfg.sinks:
        plan[""] = shard_parameters({"sinks": 0})
    if cfg.qk_norm:
        plan |= {"q_norm": mark_tp(), "k_norm": mark_tp()}
    return plan


def kv_style(kv_heads: int, tp: int):
    """How tp splits a Linear whose output rows are the KV heads (k_proj, v_proj, a LoRA adapter's B onto
    them): column-wise while tp divides the heads, else `head_replicas`."""
    from torch.distributed.tensor.parallel import ColwiseParallel

    return ColwiseParallel() if kv_heads % tp == 0 else head_replicas(kv_heads)


def cp_forward(module: Attention, x: torch.Tensor, cp, delta=None) -> torch.Tensor:
    """One context-parallel rank's pieces x [p*B, c, d] (folded chunks, piece q at positions cp.offsets(c)[q] + t):
    the keys and values of every chunk are all-gathered in sequence order (as Megatron-LM's context
    parallelism does) and each piece's queries attend over those up to its last token, causal and windowed
    as configured, exactly as in one process. `delta`: adapters added to the projections, as in `forward`
    (transformer_block)."""
    cfg = module.cfg
    _, T, _ = x.shape
    if not cfg.causal:
        raise ValueError("context parallelism supports causal attention only")
    if not cfg.plain_softmax or cfg.chunk is not None:
        raise ValueError("context parallelism supports plain softmax attention only (no sinks, soft cap or chunks)")
    pieces = [module._qkv(xp, offset, delta) for xp, offset in zip(x.chunk(cp.pieces, dim=0), cp.offsets(T))]
    k_all = cp.gather(torch.cat([p[1] for p in pieces], dim=0))  # [B, T_seq, Hkv, D]: every chunk's keys
    v_all = cp.gather(torch.cat([p[2] for p in pieces], dim=0))  # [B, T_seq, Hkv, D]
    outs = []
    for (q, _, _, _), offset in zip(pieces, cp.offsets(T)):  # q [B, c, H, D]
        end = offset + T  # every key up to this piece's last token
        outs.append(module.kernels.attention(q, k_all[:, :end], v_all[:, :end], causal=True, window=cfg.window,
                                             scale=module.scale))  # [B, c, H, D]
    o = torch.cat(outs, dim=0)  # [p*B, c, H, D]
    gate = None if pieces[0][3] is None else torch.cat([p[3] for p in pieces], dim=0)  # [p*B, c, H*D]
    return module._out(o.reshape(x.shape[0], T, -1), gate)  # [p*B, c, d]


def trace_loops(c, tokens: int, keys: int) -> int:
    """Query blocks `ops_attention.attention` runs `tokens` queries in: a chunk against more cached keys goes
    `mask_rows(keys)` queries at a time, a window `window_rows(W)` at a time; a whole causal sequence in one
    call (ltmdsl.measure.cost counts these to refuse a step too long to trace)."""
    if c.window is not None:
        rows = window_rows(c.window)
        return math.ceil(tokens / rows) if tokens > rows else 0
    return math.ceil(tokens / mask_rows(keys)) if keys > tokens else 0


def cp_inference(cfg: AttentionConfig) -> str:
    """Sharded by position under context-parallel inference (each rank holds 1/cp of the KV cache), for the
    variants whose partial attentions merge by their log-sum-exp: causal plain softmax, not chunked."""
    if not cfg.causal or not cfg.plain_softmax or cfg.chunk is not None:
        raise ContextParallelInferenceUnsupported(
            "context-parallel inference runs causal plain-softmax attention only (no sinks, soft cap or chunks)")
    return "sharded"


KIND = RuntimeKind(
    name="attention",
    module=Attention,
    build=Attention,
    new_cache=new_cache,
    ops={"attention": ops_attention.attention, "attention_decode": ops_attention.attention_decode,
         "attention_variant": ops_attention.attention_variant,
         "attention_variant_decode": ops_attention.attention_variant_decode},
    oracles={"attention": ops_attention.attention_reference},
    state_names=state_names,
    outputs=outputs,
    trace_loops=trace_loops,
    cp_inference=cp_inference,
    tp_plan=tp_plan,
    cp_forward=cp_forward,
)
