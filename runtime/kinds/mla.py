"""Multi-head latent attention sub-layer (DeepSeek-V2/V3, Kimi-Linear), as transformers' DeepseekV3Attention.

    q = q_proj(x) or q_b_proj(q_a_layernorm(q_a_proj(x)))  [B,T,H,Dn+Dr] -> q_nope [B,T,H,Dn], q_rot [B,T,H,Dr]
    c, kr = kv_a_proj_with_mqa(x) [B,T,Rkv], [B,T,Dr];  c = kv_a_layernorm(c)
    RoPE on q_rot and the one shared kr (DeepSeek's interleaved pairs; yarn's cos/sin factor included); none
    with rope_theta none (Kimi-Linear's NoPE MLA, KimiLinearAttention)
    prefill: k_nope, v = kv_b_proj(c) [B,Tk,H,Dn], [B,Tk,H,Dv]; k = [k_nope ; kr]; attention; o_proj
    decode:  absorbed (`ops_mla.mla_decode`) over the cached latent, no keys or values materialised

The cache holds the latent c [B, S, Rkv] and the rotated shared key kr [B, S, Dr] per layer, in the KV dtype:
(Rkv + Dr) values per token, what `ltmdsl.kinds.mla.cache` counts. Chunked prefill writes the new latents and
up-projects [cached ; new] to attend over them. Parameter names are transformers' (DeepseekV3Attention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from ltmdsl.kinds.attention import mask_rows
from ltmdsl.kinds.mla import MLAConfig
from ltmdsl.runtime import initializers as init
from ltmdsl.runtime import ops_attention, ops_mla
from ltmdsl.runtime.cache import CacheRequest, LayerCache
from ltmdsl.runtime.kinds import RuntimeKind, TensorParallelUnsupported
from ltmdsl.runtime.norm import RMSNorm
from ltmdsl.runtime.tensor_parallel import copy_to_tp, local, mark_tp
from ltmdsl.runtime.ops_attention import rope_cos_sin
from ltmdsl.runtime.ops_mla import rope_interleaved

if TYPE_CHECKING:
    from ltmdsl.runtime.kernels import Kernels


@dataclass
class LatentCache(LayerCache):
    """The latent of one MLA sub-layer: c [B, S, Rkv] (normalised) and the rotated key kr [B, S, Dr]; slot =
    position, S = max_context."""

    component: ClassVar[str] = "kv_cache"
    latent: torch.Tensor
    rope_key: torch.Tensor

    @property
    def slots(self) -> int:
        return self.latent.shape[1]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.latent, self.rope_key)


def new_cache(cfg: MLAConfig, req: CacheRequest) -> LatentCache:
    """Zeroed latents in the KV dtype, max_context slots; whole on every tensor-parallel rank (the tp plan
    replicates the latent and the shared RoPE key, which every head reads)."""
    B, S = req.batch_size, req.max_context
    c = torch.zeros(B, S, cfg.kv_lora_rank, dtype=req.kv_dtype, device=req.device)  # [B, S, Rkv]
    kr = torch.zeros(B, S, cfg.qk_rope_head_dim, dtype=req.kv_dtype, device=req.device)  # [B, S, Dr]
    return LatentCache(c, kr)


def outputs(cfg: MLAConfig) -> dict[str, bool]:
    """Output projections for the init (runtime.initializers): o_proj reads the attention output, no norm."""
    return {"o_proj.weight": False}


def state_names(cfg: MLAConfig) -> tuple[str, ...]:
    """The parameters an `MLA` owns, with transformers' DeepseekV3Attention names."""
    if cfg.q_lora_rank is None:
        names = ["q_proj.weight"]
    else:
        names = ["q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight"] + (["q_a_proj.bias"] if cfg.bias else [])
    names += ["kv_a_proj_with_mqa.weight", "kv_a_layernorm.weight", "kv_b_proj.weight", "o_proj.weight"]
    if cfg.bias:
        names += ["kv_a_proj_with_mqa.bias", "o_proj.bias"]
    return tuple(names)


class MLA(nn.Module):
    """forward(x [B,T,d], state: LatentCache | None, pos0) -> [B,T,d]; step(x [B,d], state, pos0) -> [B,d]."""

    def __init__(self, cfg: MLAConfig, d: int, eps: float, kernels: "Kernels"):
        super().__init__()
        self.cfg, self.kernels = cfg, kernels
        H, Dqk, Dv, Rkv, Rq = cfg.heads, cfg.qk_head_dim, cfg.v_head_dim, cfg.kv_lora_rank, cfg.q_lora_rank
        if cfg.qk_rope_head_dim % 2:  # IRs built by hand skip the front end
            raise ValueError(f"qk_rope_head_dim must be even, got {cfg.qk_rope_head_dim}")
        if Rq is None:
            self.q_proj = nn.Linear(d, H * Dqk, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, Rq, bias=cfg.bias)
            self.q_a_layernorm = RMSNorm(Rq, cfg.latent_eps)
            self.q_b_proj = nn.Linear(Rq, H * Dqk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, Rkv + cfg.qk_rope_head_dim, bias=cfg.bias)
        self.kv_a_layernorm = RMSNorm(Rkv, cfg.latent_eps)
        self.kv_b_proj = nn.Linear(Rkv, H * (cfg.qk_nope_head_dim + Dv), bias=False)
        self.o_proj = nn.Linear(H * Dv, d, bias=cfg.bias)

    def init_weights(self, gen: torch.Generator) -> None:
        for name in ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
            if hasattr(self, name):
                init.linear_(getattr(self, name), gen)
        for name in ("q_a_layernorm", "kv_a_layernorm"):
            if hasattr(self, name):
                getattr(self, name).init_weights(gen)

    def _rope(self, T: int, pos0: int, dtype: torch.dtype, device):
        positions = torch.arange(pos0, pos0 + T, device=device)  # [T]
        cfg = self.cfg
        return rope_cos_sin(positions, cfg.qk_rope_head_dim, cfg.rope_theta, dtype, cfg.rope_scaling,
                            seq_len=pos0 + T)  # [T, Dr] x2

    def _q_and_latent(self, x: torch.Tensor, pos0: int):
        """x [B,T,d] -> q_nope [B,T,H,Dn], q_rot [B,T,H,Dr] (rotated), c [B,T,Rkv] (normalised), kr [B,T,Dr]."""
        cfg = self.cfg
        B, T, _ = x.shape
        q = self.q_proj(x) if cfg.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, q.shape[-1] // cfg.qk_head_dim, cfg.qk_head_dim)  # [B, T, H, Dqk] (H/t under tp)
        q_nope, q_rot = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        c, kr = self.kv_a_proj_with_mqa(x).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        mesh = getattr(self.kv_a_proj_with_mqa, "tp_mesh", None)
        if mesh is not None:  # every rank's heads use the shared RoPE key: sum its gradient over the ranks
            kr = copy_to_tp(kr, mesh.get_group())
        c = self.kv_a_layernorm(c)  # [B, T, Rkv]
        if cfg.rope_theta is not None:  # NoPE (Kimi-Linear): the "rope" channels stay as they are
            cos, sin = self._rope(T, pos0, x.dtype, x.device)
            q_rot = rope_interleaved(q_rot, cos, sin)  # [B, T, H, Dr]
            kr = rope_interleaved(kr[:, :, None], cos, sin)[:, :, 0]  # [B, T, Dr]
        return q_nope, q_rot, c, kr

    def _up(self):
        """kv_b_proj's weight as W_uk [H, Dn, Rkv] and W_uv [H, Dv, Rkv] (this rank's H/t heads under tp)."""
        cfg = self.cfg
        w = local(self.kv_b_proj.weight).view(-1, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
        return w[:, : cfg.qk_nope_head_dim], w[:, cfg.qk_nope_head_dim :]

    def forward(self, x: torch.Tensor, state: LatentCache | None = None, pos0: int = 0) -> torch.Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        q_nope, q_rot, c, kr = self._q_and_latent(x, pos0)
        if state is not None:
            end = pos0 + T
            if end > state.slots:
                raise ValueError(f"cache holds {state.slots} tokens; this call would reach position {end}")
            state.latent[:, pos0:end] = c.to(state.latent.dtype)
            state.rope_key[:, pos0:end] = kr.to(state.rope_key.dtype)
            c, kr = state.latent[:, :end].to(x.dtype), state.rope_key[:, :end].to(x.dtype)  # [B, Tk, ...]
        Tk = c.shape[1]
        kv = self.kv_b_proj(c)  # [B, Tk, H*(Dn+Dv)]
        width = cfg.qk_nope_head_dim + cfg.v_head_dim
        kv = kv.view(B, Tk, kv.shape[-1] // width, width)  # [B, Tk, H, Dn+Dv]
        k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)  # views of kv
        k = torch.cat([k_nope, kr[:, :, None].expand(-1, -1, k_nope.shape[2], -1)], dim=-1)  # [B, Tk, H, Dqk]
        q = torch.cat([q_nope, q_rot], dim=-1)  # [B, T, H, Dqk]
        del k_nope, q_nope, q_rot, c, kr  # only q, k and kv (holding v) stay live through the attention
        o = self.kernels.attention(q, k, v, causal=True, window=None, scale=cfg.scale)  # [B, T, H, Dv]
        return self.o_proj(o.flatten(2))  # [B, T, d]

    def step(self, x: torch.Tensor, state: LatentCache, pos0: int) -> torch.Tensor:
        """One token per sequence at position pos0: x [B,d] -> [B,d]; writes its latent into the cache."""
        cfg = self.cfg
        B = x.shape[0]
        if pos0 >= state.slots:
            raise ValueError(f"cache holds {state.slots} tokens; this step is at position {pos0}")
        q_nope, q_rot, c, kr = self._q_and_latent(x[:, None], pos0)  # [B, 1, ...]
        state.latent[:, pos0] = c[:, 0].to(state.latent.dtype)
        state.rope_key[:, pos0] = kr[:, 0].to(state.rope_key.dtype)
        w_uk, w_uv = self._up()
        o = self.kernels.mla_decode(q_nope[:, 0], q_rot[:, 0], state.latent.to(x.dtype), state.rope_key.to(x.dtype),
                                    w_uk, w_uv, n_valid=pos0 + 1, scale=cfg.scale)  # [B, H, Dv]
        return self.o_proj(o.reshape(B, -1))  # [B, H*Dv] (H/t heads per tp rank) -> [B, d]


def cp_forward(module: MLA, x: torch.Tensor, cp) -> torch.Tensor:
    """One context-parallel rank's pieces x [p*B, c, d] (folded chunks at positions cp.offsets(c)): the latent
    and the RoPE key of every chunk are all-gathered in sequence order (the cache MLA keeps is what travels)
    and each piece's queries attend over them up to its last token, exactly as in one process."""
    cfg = module.cfg
    _, T, _ = x.shape
    pieces = [module._q_and_latent(xp, offset) for xp, offset in zip(x.chunk(cp.pieces, dim=0), cp.offsets(T))]
    c_all = cp.gather(torch.cat([p[2] for p in pieces], dim=0))  # [B, T_seq, ...]: every chunk's latent
    kr_all = cp.gather(torch.cat([p[3] for p in pieces], dim=0))  # [B, T_seq, Dr]
    width = cfg.qk_nope_head_dim + cfg.v_head_dim
    outs = []
    for (q_nope, q_rot, _, _), offset in zip(pieces, cp.offsets(T)):
        end = offset + T  # every token up to this piece's last
        kv = module.kv_b_proj(c_all[:, :end])  # [B, end, H*(Dn+Dv)]
        B = kv.shape[0]
        kv = kv.view(B, end, kv.shape[-1] // width, width)  # [B, end, H, Dn+Dv]
        k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
        kr = kr_all[:, :end, None].expand(-1, -1, k_nope.shape[2], -1)  # [B, end, H, Dr]
        k = torch.cat([k_nope, kr], dim=-1)  # [B, end, H, Dqk]
        q = torch.cat([q_nope, q_rot], dim=-1)  # [B, c, H, Dqk]
        outs.append(module.kernels.attention(q, k, v.contiguous(), causal=True, window=None,
                                             scale=cfg.scale))  # [B, c, H, Dv]
    return module.o_proj(torch.cat(outs, dim=0).flatten(2))  # [p*B, c, d]

def tp_plan(cfg: MLAConfig, tp: int) -> dict:
    """Megatron-LM's MLA split: heads over tp, the up-projections (q_proj or q_b_proj, kv_b_proj) column-wise
    and o_proj row-wise; the down-projections, their norms and the latent (what the cache keeps) replicated,
    their gradients summed over the ranks (the latent through the column-wise kv_b_proj, the shared RoPE key
    through `copy_to_tp`)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    if cfg.heads % tp:
        raise TensorParallelUnsupported(f"tp = {tp} must divide the mla's {cfg.heads} heads")
    q = "q_proj" if cfg.q_lora_rank is None else "q_b_proj"
    return {q: ColwiseParallel(), "kv_b_proj": ColwiseParallel(), "o_proj": RowwiseParallel(),
            "kv_a_proj_with_mqa": mark_tp()}


def trace_loops(c, tokens: int, keys: int) -> int:
    """Query blocks of `mask_rows(keys)` queries when a chunk runs against more cached keys, as attention's
    (ltmdsl.measure.cost counts these to refuse a step too long to trace)."""
    return math.ceil(tokens / mask_rows(keys)) if keys > tokens else 0


KIND = RuntimeKind(
    name="mla",
    module=MLA,
    build=MLA,
    new_cache=new_cache,
    ops={"attention": ops_attention.attention, "mla_decode": ops_mla.mla_decode},
    oracles={"attention": ops_attention.attention_reference, "mla_decode": ops_mla.mla_decode_reference},
    state_names=state_names,
    outputs=outputs,
    trace_loops=trace_loops,
    cp_inference=None,
    cp_forward=cp_forward,
    tp_plan=tp_plan,
)
