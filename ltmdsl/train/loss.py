"""The training loss: cross-entropy on answer tokens only, computed in chunks of rows.

Only the positions that predict an answer token are kept (`answer_rows`): the hidden state at t - 1 for
every t with `answer_mask[t]`. Their logits are then computed `chunk` rows at a time, in fp32, and the
gradient of each chunk with respect to the hidden rows and the head weight is formed right away
(softmax - one_hot), so neither the forward nor the backward ever holds more than [chunk, V] logits:
never [B, T, V] in fp32, whatever the task marks as answers (every byte, for `text`).

The result equals `F.cross_entropy(head(hidden)[rows].float(), targets)` and its gradients (tested to
1e-12 in float64), the model's logit scale and soft cap included (logits = cap * tanh(scale * h.w / cap)). Under bf16 autocast the head matmul runs in the hidden states' dtype and the softmax in
fp32, as autocast would do for the plain loss.

Vocab-parallel (`VocabShard`, Megatron-LM's parallel cross-entropy, torch's loss_parallel): under tensor
parallelism each rank holds V/t rows of the head weight and computes only its [chunk, V/t] logits; the
row max, the softmax denominator, the target's logit and the argmax are reduced over the tp ranks (a few
numbers per row), and the rows' gradient (softmax - one_hot) @ w is summed over them. No rank ever holds
[chunk, V] logits or the whole head weight; loss and gradients equal the single-process ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VocabShard:
    """This rank's rows [start, start + V/t) of a head weight split by vocabulary over a tp process group."""

    group: object  # torch.distributed ProcessGroup of the tp ranks
    start: int  # the first vocabulary id of this rank's rows
    vocab: int  # the whole vocabulary V


class _Reduce:
    """The row-wise reductions of the softmax, over the whole vocabulary: local, or over a VocabShard's ranks."""

    def __init__(self, shard: VocabShard | None):
        self.shard = shard

    def _all(self, t: torch.Tensor, op: str) -> torch.Tensor:
        if self.shard is None:
            return t
        import torch.distributed as dist

        dist.all_reduce(t, op=getattr(dist.ReduceOp, op), group=self.shard.group)
        return t

    def lse(self, logits: torch.Tensor) -> torch.Tensor:
        """log sum exp over the whole vocabulary of logits [c, V/t] -> [c]."""
        if self.shard is None:
            return torch.logsumexp(logits, dim=-1)
        top = self._all(logits.max(-1).values, "MAX")  # [c]
        return top + torch.log(self._all(torch.exp(logits - top[:, None]).sum(-1), "SUM"))  # [c]

    def targets(self, t: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(column of each target in this rank's logits [c], whether this rank holds it [c])."""
        if self.shard is None:
            return t, torch.ones_like(t, dtype=torch.bool)
        col = t - self.shard.start  # [c]
        mine = (col >= 0) & (col < width)  # [c]
        return col.clamp(0, width - 1), mine

    def picked(self, logits: torch.Tensor, col: torch.Tensor, mine: torch.Tensor) -> torch.Tensor:
        """The target's logit of each row [c] (summed over the ranks: exactly one holds it)."""
        return self._all(logits.gather(1, col[:, None])[:, 0] * mine, "SUM")  # [c]

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """The first index of each row's maximum over the whole vocabulary [c] (as torch.argmax)."""
        idx = logits.argmax(-1)  # [c]
        if self.shard is None:
            return idx
        best = logits.gather(1, idx[:, None])[:, 0]  # [c]
        top = self._all(best.clone(), "MAX")  # [c]
        ids = torch.where(best == top, idx + self.shard.start, torch.full_like(idx, self.shard.vocab))  # [c]
        return self._all(ids, "MIN")  # [c]: the lowest id among the ranks holding the maximum

    def rows_grad(self, partial: torch.Tensor) -> torch.Tensor:
        """d loss / d rows [c, d]: each rank's (softmax - one_hot) @ w over its vocabulary rows, summed."""
        return self._all(partial, "SUM")


@dataclass(frozen=True)
class LossResult:
    """Mean loss over the answer tokens, and how many of them the argmax predicts right."""

    loss: torch.Tensor  # [] differentiable
    correct: int
    count: int


def answer_rows(hidden: torch.Tensor, tokens: torch.Tensor, answer_mask: torch.Tensor):
    """(rows [N, d], targets [N]): the hidden states that predict each answer token, and those tokens."""
    targets_at = answer_mask[:, 1:]  # [B, T-1]: answer at t is predicted from position t - 1
    rows = hidden[:, :-1][targets_at]  # [N, d]
    targets = tokens[:, 1:][targets_at]  # [N]
    return rows, targets


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropies of rows @ weight.T against targets, with gradients formed chunk by chunk."""

    @staticmethod
    def forward(ctx, rows, weight, targets, chunk: int, cap, shard):  # rows [N, d], weight [V(/t), d], targets [N]
        work = rows.dtype
        reduce = _Reduce(shard)
        with torch.autocast(device_type=rows.device.type, enabled=False):
            w = weight.to(work)  # [V, d]
            acc = torch.float64 if work == torch.float64 else torch.float32  # the softmax's dtype
            grad_rows = torch.empty_like(rows)  # [N, d]
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)  # [V, d] fp32 (fp64)
            total = torch.zeros((), dtype=acc, device=rows.device)
            correct = torch.zeros((), dtype=torch.int64, device=rows.device)
            for start in range(0, rows.shape[0], chunk):
                h = rows[start:start + chunk]  # [c, d]
                t = targets[start:start + chunk]  # [c]
                logits = (h @ w.t()).to(total.dtype)  # [c, V] fp32 (fp64 for fp64 rows); [c, V/t] on a shard
                if cap is not None:
                    squashed = torch.tanh(logits / cap)  # [c, V]
                    logits = cap * squashed
                lse = reduce.lse(logits)  # [c]
                col, mine = reduce.targets(t, logits.shape[1])  # [c] each
                picked = reduce.picked(logits, col, mine)  # [c]
                total += (lse - picked).sum()
                correct += (reduce.argmax(logits) == t).sum()
                probs = torch.exp(logits - lse[:, None])  # [c, V]: d loss / d logits = softmax - one_hot
                probs.scatter_add_(1, col[:, None], -mine[:, None].to(probs.dtype))
                if cap is not None:
                    probs *= 1 - squashed * squashed  # through the cap: d(cap tanh(x / cap)) / dx
                grad_rows[start:start + chunk] = reduce.rows_grad(probs.to(work) @ w).to(rows.dtype)  # [c, d]
                grad_w += probs.t() @ h.to(acc)  # [V, d]
                del logits, probs  # this chunk's [c, V] buffers go before the next chunk's are made
                squashed = None
        ctx.save_for_backward(grad_rows, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(correct)
        return total, correct

    @staticmethod
    def backward(ctx, grad_total, _grad_correct):
        grad_rows, grad_w = ctx.saved_tensors
        return ((grad_rows * grad_total).to(grad_rows.dtype),
                (grad_w * grad_total).to(ctx.weight_dtype), None, None, None, None)


def chunked_cross_entropy(rows: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk: int = 1024, cap: float | None = None, shard: VocabShard | None = None) -> LossResult:
    """Mean cross-entropy of `rows @ weight.T` [N, V] (soft-capped to cap * tanh(x / cap) when `cap` is given)
    against `targets` [N], never more than [chunk, V]. With `shard`, `weight` is this rank's [V/t, d] rows of
    the head (a collective over shard.group: every tp rank calls it with the same rows and targets), and the
    gradient of `weight` is that of its rows."""
    n = rows.shape[0]
    if n == 0:
        raise ValueError("no answer tokens in the batch: nothing to train on")
    total, correct = summed_cross_entropy(rows, weight, targets, chunk, cap, shard)
    return LossResult(loss=total / n, correct=int(correct), count=n)


def summed_cross_entropy(rows: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 1024,
                         cap: float | None = None, shard: VocabShard | None = None):
    """(summed cross-entropy [] differentiable, correct predictions [] int64 tensor) of `rows @ weight.T`
    against `targets` [N], as `chunked_cross_entropy` computes it, without reading any value back to the host
    (so it also runs on fake tensors, as `ltmdsl memory --measure` traces it).

    What it keeps for the backward is the gradients it formed in the forward: d loss / d rows [N, d] in the
    rows' dtype and d loss / d weight [V(/t), d] in fp32; no logits. While it runs, one chunk's fp32 logits
    and softmax [chunk, V(/t)] and their element-wise temporaries exist at a time."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1 (got {chunk})")
    return _ChunkedCrossEntropy.apply(rows, weight, targets, chunk, cap, shard)


def summed_target_loss(model, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 1024,
                       ignore: int = -100) -> tuple[torch.Tensor, int, int]:
    """(summed cross-entropy [] differentiable, correct, count) of the model's head on hidden [..., d] (the
    final norm's output) against per-position targets [...], positions whose target is `ignore` skipped:
    chunked, with the model's logit scale and cap, and vocab-parallel when the head is split over tp (its
    V/t rows; a collective over the tp ranks). With no targets, a zero loss still in hidden's graph, so
    backward (and every collective it runs) still happens."""
    keep = targets != ignore
    rows, picked = hidden[keep], targets[keep]  # [n, d], [n]
    if not rows.shape[0]:
        return hidden.sum() * 0.0, 0, 0
    if model.ir.logit_scale != 1.0:
        rows = rows * model.ir.logit_scale  # (scale * h) . w = scale * (h . w)
    weight, shard = model.head_weight(), None  # [V, d]
    if hasattr(weight, "device_mesh"):  # vocab-parallel under tp: this rank's [V/t, d] rows
        from ltmdsl.distributed.tensor_parallel import vocab_shard

        weight, shard = vocab_shard(weight)
    result = chunked_cross_entropy(rows, weight, picked, chunk, model.ir.logit_cap, shard)
    return result.loss * result.count, result.correct, result.count


def answer_loss(model, tokens: torch.Tensor, answer_mask: torch.Tensor, chunk: int = 1024) -> LossResult:
    """The answer-only loss of `model` (an LTModel) on tokens [B, T] with answer_mask [B, T]."""
    hidden = model(tokens, output="hidden")  # [B, T, d], normalised
    rows, targets = answer_rows(hidden, tokens, answer_mask)
    if model.ir.logit_scale != 1.0:
        rows = rows * model.ir.logit_scale  # (scale * h) . w = scale * (h . w)
    return chunked_cross_entropy(rows, model.head_weight(), targets, chunk, model.ir.logit_cap)
