"""Inference caches: what a model keeps between calls, allocated once up front.

One entry per sub-layer of the stack (tied sub-layers share weights, never caches):
- global attention: `KVCache` with S = max_context slots, written at positions [0, S).
- sliding-window attention: `KVCache` as a ring buffer of S = min(max_context, W) slots; position p lives in
  slot p % S, so memory stays flat however many tokens stream through.
- Mamba-1 / Mamba-2: `SSMState` with the conv taps ([B, C, K] for conv_taps="full" as in state-spaces/mamba,
  [B, C, K-1] for "minus_one" as in vLLM) and the SSM state ([B, Di, N] or [B, Hs, P, N]).
- MLP / MoE: nothing.

`Cache.nbytes()` is exactly `ltmdsl.memory.cache_bytes(...)` kv_cache + recurrent_state (docs/CONTRACTS.md),
because both follow the same formulas. The cache advances in place: `seen` counts the tokens consumed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ltmdsl.ir import ModelIR
from ltmdsl.kinds.attention import AttentionConfig
from ltmdsl.kinds.mamba import MambaConfig
from ltmdsl.kinds.mamba2 import Mamba2Config

CONV_TAPS = ("full", "minus_one")


@dataclass
class KVCache:
    """Keys and values of one attention sub-layer: k [B, S, Hkv, D], v [B, S, Hkv, Dv].

    `window` None: slot = position (global attention, S = max_context). Otherwise a ring: slot = position % S.
    """

    k: torch.Tensor
    v: torch.Tensor
    window: int | None

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.k, self.v)


@dataclass
class SSMState:
    """Conv taps conv [B, C, K or K-1] and the SSM state ssm [B, Di, N] (Mamba-1) or [B, Hs, P, N] (Mamba-2)."""

    conv: torch.Tensor
    ssm: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.conv, self.ssm)


class Cache:
    """Per-sub-layer cache entries plus the number of tokens already consumed (`seen`)."""

    def __init__(self, entries: list, batch_size: int, max_context: int):
        self.layers = entries  # one KVCache | SSMState | None per sub-layer
        self.batch_size = batch_size
        self.max_context = max_context
        self.seen = 0

    def nbytes(self) -> int:
        """Bytes held by every cache tensor."""
        return sum(t.numel() * t.element_size() for e in self.layers if e is not None for t in e.tensors())

    def breakdown(self) -> dict[str, int]:
        """Bytes as the memory model names them: {"kv_cache": ..., "recurrent_state": ...}."""
        out = {"kv_cache": 0, "recurrent_state": 0}
        for e in self.layers:
            if e is not None:
                key = "kv_cache" if isinstance(e, KVCache) else "recurrent_state"
                out[key] += sum(t.numel() * t.element_size() for t in e.tensors())
        return out

    def reset(self) -> None:
        """Forget every token: zero the tensors and the position counter."""
        for e in self.layers:
            if e is not None:
                for t in e.tensors():
                    t.zero_()
        self.seen = 0

    def clone(self) -> "Cache":
        """A deep copy (used to branch a prefix, and by the tests)."""
        entries = []
        for e in self.layers:
            if isinstance(e, KVCache):
                entries.append(KVCache(e.k.clone(), e.v.clone(), e.window))
            elif isinstance(e, SSMState):
                entries.append(SSMState(e.conv.clone(), e.ssm.clone()))
            else:
                entries.append(None)
        out = Cache(entries, self.batch_size, self.max_context)
        out.seen = self.seen
        return out

    def __repr__(self) -> str:
        return f"Cache(batch={self.batch_size}, max_context={self.max_context}, seen={self.seen}, bytes={self.nbytes()})"


def allocate(
    model: ModelIR,
    *,
    batch_size: int,
    max_context: int,
    kv_dtype: torch.dtype,
    state_dtype: torch.dtype,
    conv_taps: str = "full",
    device: torch.device | str = "cpu",
) -> Cache:
    """Allocate a zeroed cache for `batch_size` sequences of at most `max_context` tokens."""
    if conv_taps not in CONV_TAPS:
        raise ValueError(f"conv_taps must be one of {CONV_TAPS}, not {conv_taps!r}")
    if batch_size < 1 or max_context < 1:
        raise ValueError("batch_size and max_context must be positive")
    B = batch_size
    entries: list = []
    for layer in model.layers:
        m = layer.mixer
        if isinstance(m, AttentionConfig):
            S = max_context if m.window is None else min(max_context, m.window)
            k = torch.zeros(B, S, m.kv_heads, m.head_dim, dtype=kv_dtype, device=device)
            v = torch.zeros(B, S, m.kv_heads, m.v_head_dim, dtype=kv_dtype, device=device)
            entries.append(KVCache(k, v, m.window))
        elif isinstance(m, (MambaConfig, Mamba2Config)):
            taps = m.d_conv if conv_taps == "full" else m.d_conv - 1
            if isinstance(m, MambaConfig):
                conv = torch.zeros(B, m.d_inner, taps, dtype=state_dtype, device=device)
                ssm = torch.zeros(B, m.d_inner, m.d_state, dtype=state_dtype, device=device)
            else:
                conv = torch.zeros(B, m.conv_dim, taps, dtype=state_dtype, device=device)
                ssm = torch.zeros(B, m.heads, m.head_dim, m.d_state, dtype=state_dtype, device=device)
            entries.append(SSMState(conv, ssm))
        else:
            entries.append(None)
    return Cache(entries, batch_size, max_context)
