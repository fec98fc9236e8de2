"""The training loss: cross-entropy on answer tokens only, computed in chunks of rows.

Only the positions that predict an answer token are kept (`answer_rows`): the hidden state at t - 1 for
every t with `answer_mask[t]`. Their logits are then computed `chunk` rows at a time, in fp32, and the
gradient of each chunk with respect to the hidden rows and the head weight is formed right away
(softmax - one_hot), so neither the forward nor the backward ever holds more than [chunk, V] logits:
never [B, T, V] in fp32, whatever the task marks as answers (every byte, for `text`).

The result equals `F.cross_entropy(head(hidden)[rows].float(), targets)` and its gradients (tested to
1e-12 in float64), the model's logit scale and soft cap included (logits = cap * tanh(scale * h.w / cap)). Under bf16 autocast the head matmul runs in the hidden states' dtype and the softmax in
fp32, as autocast would do for the plain loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
    def forward(ctx, rows, weight, targets, chunk: int, cap):  # rows [N, d], weight [V, d], targets [N]
        work = rows.dtype
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
                logits = (h @ w.t()).to(total.dtype)  # [c, V] fp32 (fp64 for fp64 rows)
                if cap is not None:
                    squashed = torch.tanh(logits / cap)  # [c, V]
                    logits = cap * squashed
                lse = torch.logsumexp(logits, dim=-1)  # [c]
                picked = logits.gather(1, t[:, None])[:, 0]  # [c]
                total += (lse - picked).sum()
                correct += (logits.argmax(-1) == t).sum()
                probs = torch.exp(logits - lse[:, None])  # [c, V]: d loss / d logits = softmax - one_hot
                probs.scatter_add_(1, t[:, None], torch.full_like(picked[:, None], -1.0))
                if cap is not None:
                    probs *= 1 - squashed * squashed  # through the cap: d(cap tanh(x / cap)) / dx
                grad_rows[start:start + chunk] = (probs.to(work) @ w).to(rows.dtype)  # [c, d]
                grad_w += probs.t() @ h.to(acc)  # [V, d]
        ctx.save_for_backward(grad_rows, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(correct)
        return total, correct

    @staticmethod
    def backward(ctx, grad_total, _grad_correct):
        grad_rows, grad_w = ctx.saved_tensors
        return ((grad_rows * grad_total).to(grad_rows.dtype),
                (grad_w * grad_total).to(ctx.weight_dtype), None, None, None)


def chunked_cross_entropy(rows: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk: int = 1024, cap: float | None = None) -> LossResult:
    """Mean cross-entropy of `rows @ weight.T` [N, V] (soft-capped to cap * tanh(x / cap) when `cap` is given)
    against `targets` [N], never more than [chunk, V]."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1 (got {chunk})")
    n = rows.shape[0]
    if n == 0:
        raise ValueError("no answer tokens in the batch: nothing to train on")
    total, correct = _ChunkedCrossEntropy.apply(rows, weight, targets, chunk, cap)
    return LossResult(loss=total / n, correct=int(correct), count=n)


def answer_loss(model, tokens: torch.Tensor, answer_mask: torch.Tensor, chunk: int = 1024) -> LossResult:
    """The answer-only loss of `model` (an LTModel) on tokens [B, T] with answer_mask [B, T]."""
    hidden = model(tokens, output="hidden")  # [B, T, d], normalised
    rows, targets = answer_rows(hidden, tokens, answer_mask)
    if model.ir.logit_scale != 1.0:
        rows = rows * model.ir.logit_scale  # (scale * h) . w = scale * (h . w)
    return chunked_cross_entropy(rows, model.head_weight(), targets, chunk, model.ir.logit_cap)
