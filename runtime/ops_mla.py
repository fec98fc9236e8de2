"""Multi-head latent attention ops: interleaved decoupled RoPE and the absorbed one-token decode.

`mla_decode` scores a query against the cached latent without materialising keys or values (DeepSeek-V2,
section 2.1.2: W_uk is absorbed into the query, W_uv applied after the weighted sum). Its oracle,
`mla_decode_reference`, up-projects every cached latent into per-head keys and values and runs the explicit-
softmax `attention_reference`; tests/runtime/test_rt_mla.py checks the two against each other.
"""

from __future__ import annotations

import torch

from ltmdsl.runtime.ops_attention import apply_rope, attention_reference


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """[..., Dr] channel pairs (x0, x1), (x2, x3), ... -> [x0, x2, ... ; x1, x3, ...] [..., Dr].

    DeepSeek's checkpoints rotate adjacent channel pairs; after this permutation the rotate_half RoPE of
    `apply_rope` rotates the same pairs by the same angles (transformers' apply_rotary_pos_emb_interleave). The
    permuted order is kept: q and k are permuted alike, so their dot products are unchanged.
    """
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


def rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, Dr], cos/sin [T, Dr] -> RoPE over DeepSeek's interleaved pairs, [B, T, H, Dr] (de-interleaved)."""
    return apply_rope(deinterleave(x), cos, sin)


def mla_decode(q_nope: torch.Tensor, q_rot: torch.Tensor, latent: torch.Tensor, rope_key: torch.Tensor,
               w_uk: torch.Tensor, w_uv: torch.Tensor, *, n_valid: int, scale: float) -> torch.Tensor:
    """One query per sequence over cache slots [0, n_valid), absorbed:
    q_nope [B,H,Dn], q_rot [B,H,Dr], latent [B,S,Rkv], rope_key [B,S,Dr], w_uk [H,Dn,Rkv], w_uv [H,Dv,Rkv]
    -> [B,H,Dv].

        score_j = (W_uk^T q_nope) . c_j + q_rot . kr_j,   o = W_uv (sum_j softmax(scale * score)_j c_j)
    In fp32 (fp64 for fp64 inputs). Oracle: `mla_decode_reference`.
    """
    work = torch.float64 if q_nope.dtype == torch.float64 else torch.float32
    c = latent[:, :n_valid].to(work)  # [B, S', Rkv]
    kr = rope_key[:, :n_valid].to(work)  # [B, S', Dr]
    q_lat = torch.einsum("bhn,hnr->bhr", q_nope.to(work), w_uk.to(work))  # [B, H, Rkv]
    s = (torch.einsum("bhr,bsr->bhs", q_lat, c) + torch.einsum("bhd,bsd->bhs", q_rot.to(work), kr)) * scale
    p = torch.softmax(s, dim=-1)  # [B, H, S']
    o_lat = torch.einsum("bhs,bsr->bhr", p, c)  # [B, H, Rkv]
    return torch.einsum("bhr,hvr->bhv", o_lat, w_uv.to(work)).to(q_nope.dtype)  # [B, H, Dv]


def mla_decode_reference(q_nope: torch.Tensor, q_rot: torch.Tensor, latent: torch.Tensor, rope_key: torch.Tensor,
                         w_uk: torch.Tensor, w_uv: torch.Tensor, *, n_valid: int, scale: float) -> torch.Tensor:
    """The oracle of `mla_decode` (same signature): up-project keys and values, then explicit softmax."""
    c, kr = latent[:, :n_valid], rope_key[:, :n_valid]  # [B, S', Rkv], [B, S', Dr]
    H = q_nope.shape[1]
    k_nope = torch.einsum("bsr,hnr->bshn", c, w_uk)  # [B, S', H, Dn]
    v = torch.einsum("bsr,hvr->bshv", c, w_uv)  # [B, S', H, Dv]
    k = torch.cat([k_nope, kr[:, :, None].expand(-1, -1, H, -1)], dim=-1)  # [B, S', H, Dqk]
    q = torch.cat([q_nope, q_rot], dim=-1)[:, None]  # [B, 1, H, Dqk]
    return attention_reference(q, k, v, causal=False, window=None, scale=scale)[:, 0]  # [B, H, Dv]
