"""An independent check of `ltmdsl train` on MQAR: a plain-PyTorch model and loop on the very same batches.

Nothing here comes from ltmdsl but the data (`ltmdsl.evals.make_batch`, the samples `ltmdsl train` draws
for step s: indices s*B .. s*B + B - 1 of seed 0): a 2-layer pre-norm transformer with RoPE attention
(Zoology's MQAR baseline size), written out in full; the loss is cross-entropy on the answer positions
only, taken from the logits one position earlier; AdamW (decay on matrices only), linear warmup and cosine
decay, gradient clipping at 1. If this learns MQAR and `ltmdsl train` on an equal model does not, the
difference is in ltmdsl's model or loop, not in the task.

    python benchmarks/mqar_reference.py [--steps 600] [--batch 64] [--lr 3e-3] [--d 64] [--layers 2]
"""

from __future__ import annotations

import argparse
import math
import resource
import time

import torch
from torch import nn
from torch.nn import functional as F

from ltmdsl.evals import get_task, make_batch

OPTIONS = {"context": 64, "num_kv_pairs": 4, "vocab_size": 256}


def rope(x: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotate channel i with channel i + D/2 by position * theta^(-2i/D); x [B, H, T, D]."""
    D, T = x.shape[-1], x.shape[-2]
    inv = theta ** (-torch.arange(0, D, 2, dtype=torch.float32) / D)  # [D/2]
    ang = torch.arange(T, dtype=torch.float32)[:, None] * inv[None]  # [T, D/2]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)  # [T, D]
    x1, x2 = x[..., :D // 2], x[..., D // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.n1, self.n2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv, self.o = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.up, self.down = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, T, d]
        B, T, d = x.shape
        q, k, v = self.qkv(self.n1(x)).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)  # [B, H, T, D]
        x = x + self.o(a.transpose(1, 2).reshape(B, T, d))
        return x + self.down(F.gelu(self.up(self.n2(x))))


class Reference(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        for p in self.parameters():
            if p.ndim == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, V]
        x = self.emb(tokens)
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--every", type=int, default=50)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    task = get_task("mqar")
    options = task.make_options(**OPTIONS)
    model = Reference(OPTIONS["vocab_size"], args.d, args.layers, args.heads)
    decay = [q for q in model.parameters() if q.ndim == 2]
    rest = [q for q in model.parameters() if q.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))

    def factor(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - args.warmup) / max(args.steps - args.warmup, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    wall, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_utime
    for step in range(args.steps):
        b = make_batch(task, options, 0, range(step * args.batch, (step + 1) * args.batch))
        tokens = torch.from_numpy(b.tokens)  # [B, T]
        mask = torch.from_numpy(b.answer_mask.copy())[:, 1:]  # [B, T-1]: answer at t predicted at t - 1
        logits = model(tokens)[:, :-1][mask]  # [N, V]
        targets = tokens[:, 1:][mask]  # [N]
        loss = F.cross_entropy(logits, targets)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % args.every == 0:
            acc = (logits.argmax(-1) == targets).float().mean().item()
            used = resource.getrusage(resource.RUSAGE_SELF).ru_utime - cpu
            print(f"step {step + 1}: loss {loss.item():.4f} answer acc {acc:.3f} "
                  f"({time.perf_counter() - wall:.1f} s wall, {used:.1f} s CPU)", flush=True)


if __name__ == "__main__":
    main()
