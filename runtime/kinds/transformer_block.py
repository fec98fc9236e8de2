"""A transformer block as one branch with per-use LoRA adapters (Zamba's shared block), as transformers'
Zamba2AttentionDecoderLayer and the `linear` of Zamba2HybridLayer compute it.

    u [B,T,d_in]  (the sub-layer's normed input: norm(cat[x, embeddings]) under input = concat_embed)
    a = attn(u)             q/k/v = proj(u) + B_use(A_use u)             [B,T,d]
    m = mid_norm(a)                                                      [B,T,d]
    f = ffn(m)              gate|up = proj(m) + B_use(A_use m)           [B,T,d]
    out = out_proj_use(f)                                                [B,T,d]

The attention, mid norm and MLP are the shared module (tied across the uses of a `shared block`); the
adapters and out_proj are `Use` modules, one per sub-layer, which the model passes as `use=` (RuntimeKind.
new_use). The attention's KV cache is its own per sub-layer, so per use. Adapters add to the projection's
output unscaled, as Zamba2's `linear_q_adapter_list` and `gate_up_proj_adapter_list` do.

Parameter names (relative to `layers.{i}.mixer.`): `attn.*` (attention's), `mid_norm.weight` (+ `.bias`),
`ffn.*` (mlp's); per use (relative to `uses.{i}.`): `adapters.{q,k,v,gate_up}.0.weight` [r, in] and
`.1.weight` [out, r], `out_proj.weight` [d, d]. The MLP's adapter rows are gate's F then up's F.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ltmdsl.kinds.transformer_block import TransformerBlockConfig
from ltmdsl.runtime import initializers as init
from ltmdsl.runtime.cache import CacheRequest
from ltmdsl.runtime.kinds import RuntimeKind, TensorParallelUnsupported
from ltmdsl.runtime.kinds import attention as attention_kind
from ltmdsl.runtime.kinds import mlp as mlp_kind
from ltmdsl.runtime.norm import HAS_BIAS, Norm

if TYPE_CHECKING:
    from ltmdsl.runtime.kernels import Kernels


class Use(nn.Module):
    """The parameters one use owns: LoRA adapters (A then B, no bias) and the output projection."""

    def __init__(self, cfg: TransformerBlockConfig, d: int):
        super().__init__()
        r = cfg.adapter_rank
        self.adapters = nn.ModuleDict({
            name: nn.Sequential(nn.Linear(n_in, r, bias=False), nn.Linear(r, n_out, bias=False))
            for name, n_in, n_out in cfg.adapters(d)
        })
        self.out_proj = nn.Linear(d, d, bias=False) if cfg.out_proj else None

    def init_weights(self, gen: torch.Generator, branches: int) -> None:
        """Adapters as Linear layers; the out_proj, which writes the stream, scaled for a stack of `branches`
        residual branches (runtime.initializers.residual_outputs)."""
        outputs = {"out_proj.weight": False} if self.out_proj is not None else {}  # its input: the MLP's output
        with init.residual_outputs(self, outputs, branches):
            for seq in self.adapters.values():
                for lin in seq:
                    init.linear_(lin, gen)
            if self.out_proj is not None:
                init.linear_(self.out_proj, gen)

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        """B(A x) [..., out] of adapter `name`, or None when the use has none there."""
        seq = self.adapters[name] if name in self.adapters else None
        return None if seq is None else seq(x)

    def qkv(self, x: torch.Tensor):
        """The q, k and v adapters' outputs on the attention's input x [B,T,d_in] (each [B,T,rows] or None)."""
        return tuple(self.delta(n, x) for n in ("q", "k", "v"))


def new_use(cfg: TransformerBlockConfig, d: int) -> Use:
    return Use(cfg, d)


def use_names(cfg: TransformerBlockConfig, d: int) -> tuple[str, ...]:
    """The parameters a `Use` owns (relative to `uses.{i}.`)."""
    names = [f"adapters.{n}.{j}.weight" for n, _, _ in cfg.adapters(d) for j in (0, 1)]
    return tuple(names + (["out_proj.weight"] if cfg.out_proj else []))


class TransformerBlock(nn.Module):
    """forward(u [B,T,d_in], state: KVCache | None, pos0, use) -> [B,T,d]; step(u [B,d_in], ...) -> [B,d]."""

    def __init__(self, cfg: TransformerBlockConfig, d: int, eps: float, kernels: "Kernels"):
        super().__init__()
        self.cfg = cfg
        self.attn = attention_kind.Attention(cfg.attn, d, eps, kernels, d_in=cfg.d_in)
        self.mid_norm = Norm(cfg.mid_norm, d, kernels)
        self.ffn = mlp_kind.MLP(cfg.ffn, d)

    def init_weights(self, gen: torch.Generator) -> None:
        self.attn.init_weights(gen)
        self.mid_norm.init_weights(gen)
        self.ffn.init_weights(gen)

    def _ffn(self, m: torch.Tensor, use: Use) -> torch.Tensor:
        """The MLP on m [..., d] with the use's gate|up adapter added -> [..., d]."""
        ffn = self.ffn
        # inference: at most two [..., F] tensors live, as the MLP's own path (one process: a tp rank's
        # DTensor weights, which carry a device_mesh, take the graph path below)
        if not torch.is_grad_enabled() and not hasattr(ffn.up_proj.weight, "device_mesh"):
            return ffn.down_proj(self._hidden_inplace(m, use))
        gate = ffn.gate_proj(m) if ffn.gate_proj is not None else None  # [..., F]
        up = ffn.up_proj(m)  # [..., F] (F/t on a tp rank)
        F = up.shape[-1]
        dgu = use.delta("gate_up", m)  # [..., 2F] (gated: this rank's gate rows, then its up rows) or [..., F]
        if dgu is not None:
            if gate is not None:
                gate, up = gate + dgu[..., :F], up + dgu[..., F:]
            else:
                up = up + dgu
        return ffn.down_proj(mlp_kind.activate(self.cfg.ffn.activation, gate, up))

    def _hidden_inplace(self, m: torch.Tensor, use: Use) -> torch.Tensor:
        """Without autograd: the MLP's hidden activation [..., F] on m [..., d], each projection's adapter rows
        B[rows] (A m) added into it in place (the rank-r A m computed once), by the MLP's in-place path
        (`mlp.hidden_inplace`): the same values as `_ffn`'s graph, without its [..., 2F] adapter output and
        the out-of-place sums beside gate and up."""
        ffn, F = self.ffn, self.cfg.ffn.d_ff
        seq = use.adapters["gate_up"] if "gate_up" in use.adapters else None
        low = None if seq is None else seq[0](m).reshape(-1, self.cfg.adapter_rank)  # [N, r]

        def adapted(lin: nn.Linear, rows: slice):
            def project(x: torch.Tensor) -> torch.Tensor:
                h = lin(x)  # [..., F]
                if low is not None:
                    h.view(-1, F).addmm_(low, seq[1].weight[rows].t())  # [N, F] += [N, r] @ [r, F]
                return h
            return project

        gated = ffn.gate_proj is not None
        gate = adapted(ffn.gate_proj, slice(0, F)) if gated else None
        up = adapted(ffn.up_proj, slice(F, 2 * F) if gated else slice(0, F))
        return mlp_kind.hidden_inplace(self.cfg.ffn.activation, gate, up, m)  # [..., F]

    def _finish(self, a: torch.Tensor, use: Use) -> torch.Tensor:
        """Attention output a [..., d] -> mid norm, MLP, the use's out_proj -> [..., d]."""
        f = self._ffn(self.mid_norm(a, None)[0], use)  # [..., d]
        return f if use.out_proj is None else use.out_proj(f)

    def forward(self, u: torch.Tensor, state=None, pos0: int = 0, use: Use | None = None) -> torch.Tensor:
        if use is None:
            raise ValueError("a transformer_block runs with its use's parameters (use=...); LTModel passes them")
        return self._finish(self.attn(u, state, pos0, delta=use.qkv), use)  # [B, T, d]

    def step(self, u: torch.Tensor, state, pos0: int, use: Use | None = None) -> torch.Tensor:
        if use is None:
            raise ValueError("a transformer_block runs with its use's parameters (use=...); LTModel passes them")
        return self._finish(self.attn.step(u, state, pos0, delta=use.qkv), use)  # [B, d]


def cp_forward(module: TransformerBlock, u: torch.Tensor, cp, use: Use | None = None) -> torch.Tensor:
    """One context-parallel rank's tokens u [B, T/cp, d_in]: the attention's own context-parallel form (every
    rank's keys and values gathered) with the use's adapters; the mid norm, MLP and out_proj are token-local."""
    if use is None:
        raise ValueError("a transformer_block runs with its use's parameters (use=...); LTModel passes them")
    return module._finish(attention_kind.cp_forward(module.attn, u, cp, delta=use.qkv), use)  # [B, T/cp, d]


def build(cfg: TransformerBlockConfig, d: int, eps: float, kernels: "Kernels") -> TransformerBlock:
    return TransformerBlock(cfg, d, eps, kernels)


def new_cache(cfg: TransformerBlockConfig, req: CacheRequest):
    """The attention's KV cache (one per sub-layer: per use)."""
    return attention_kind.new_cache(cfg.attn, req)


def state_names(cfg: TransformerBlockConfig) -> tuple[str, ...]:
    """The shared parameters a `TransformerBlock` owns (per-use ones: `use_names`)."""
    norm = ["mid_norm.weight"] + (["mid_norm.bias"] if HAS_BIAS[cfg.mid_norm.kind] else [])
    return (tuple(f"attn.{n}" for n in attention_kind.state_names(cfg.attn)) + tuple(norm)
            + tuple(f"ffn.{n}" for n in mlp_kind.state_names(cfg.ffn)))


def outputs(cfg: TransformerBlockConfig) -> dict[str, bool]:
    """Output projections for the init (runtime.initializers): the MLP's down_proj writes the branch when the
    uses have no out_proj; otherwise each use's out_proj does (`Use.init_weights`), and nothing shared is rescaled."""
    return {} if cfg.out_proj else {"ffn.down_proj.weight": False}


def tp_plan(cfg: TransformerBlockConfig, tp: int) -> dict:
    """The shared attention and MLP split as their own kinds split them (heads; d_ff), under `attn.` and
    `ffn.`; the mid norm replicated (it reads the attention's all-reduced output, so its gradient agrees on
    every rank)."""
    attn = attention_kind.tp_plan(cfg.attn, tp)
    plan = {f"attn.{k}" if k else "attn": v for k, v in attn.items()}
    return plan | {f"ffn.{k}": v for k, v in mlp_kind.tp_plan(cfg.ffn, tp).items()}


def use_tp_plan(cfg: TransformerBlockConfig, tp: int) -> dict:
    """Each use's parameters split with what they feed. An adapter's B adds to a split projection's output,
    so it is split as that projection is (q by heads, k and v by KV heads or replicated with them, gate|up by
    segments: each rank its F/t of gate and of up); its A [r, in] by rank r, its output gathered (NeMo's LoRA
    under tp: A column-parallel with a gathered output, B column-parallel). out_proj [d, d] column-wise, its
    output gathered: every rank's out is the whole [.., d] again."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel

    from ltmdsl.runtime.tensor_parallel import segmented

    r = cfg.adapter_rank
    if r and r % tp:
        raise TensorParallelUnsupported(f"tp = {tp} must divide the transformer_block's adapter rank {r}")
    plan = {}
    for name, _, _ in cfg.adapters(1):  # the adapters' names (their widths do not matter here)
        if name == "gate_up":
            F = cfg.ffn.d_ff
            b = segmented(ColwiseParallel(), {"weight": (F, F)}) if cfg.ffn_rows == 2 * F else ColwiseParallel()
        elif name in ("k", "v"):
            b = attention_kind.kv_style(cfg.attn.kv_heads, tp)
        else:
            b = ColwiseParallel()
        plan |= {f"adapters.{name}.0": ColwiseParallel(output_layouts=Replicate()), f"adapters.{name}.1": b}
    if cfg.out_proj:
        plan["out_proj"] = ColwiseParallel(output_layouts=Replicate())
    return plan


def trace_loops(c, tokens: int, keys: int) -> int:
    """Its attention's and its MLP's loops (ltmdsl.measure.cost)."""
    return attention_kind.KIND.trace_loops(c.attn, tokens, keys) + mlp_kind.KIND.trace_loops(c.ffn, tokens, keys)


KIND = RuntimeKind(
    name="transformer_block",
    module=TransformerBlock,
    build=build,
    new_cache=new_cache,
    ops={},
    oracles={},
    state_names=state_names,
    cp_forward=cp_forward,
    new_use=new_use,
    outputs=outputs,
    trace_loops=trace_loops,
    cp_inference=None,
    tp_plan=tp_plan,
    use_tp_plan=use_tp_plan,
)
