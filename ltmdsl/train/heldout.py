"""A fast held-out exact match, teacher forced, for deciding during training when a target is reached.

`ltmdsl eval` (ltmdsl.train.scoring) decodes every answer through the cache, one token at a time, which
is what a user's generation does and what results report; it costs a few model calls per answer. Asking
that every few steps would cost more than the training it watches. This scorer runs the held-out samples
through one batched forward pass instead and counts an answer span right when the model's greedy guess
is right at every one of its tokens given the true tokens before it (teacher forcing). For single-token
answers (MQAR) that is the same guess the cache decode makes for the first answer of a sample; later
answers differ only where an earlier wrong guess, which decoding feeds back, would change them. It is
a stopping rule, not a result: a benchmark confirms the stopped checkpoint with `ltmdsl eval`.
"""

from __future__ import annotations

from typing import Any

import torch

from ltmdsl.evals import Task, make_batch


@torch.no_grad()
def teacher_forced_exact_match(model, task: Task, options: Any, seed: int, samples: int,
                               batch: int = 256) -> float:
    """Fraction of the answer spans of samples 0..samples-1 (of `task` under `options` and `seed`) whose
    every token is the model's greedy next-token guess after the true tokens before it."""
    was_training = model.training
    model.eval()
    right = total = 0
    try:
        for first in range(0, samples, batch):
            b = make_batch(task, options, seed, range(first, min(first + batch, samples)))
            tokens = torch.from_numpy(b.tokens).to(model.device)  # [N, T]
            guess = model(tokens).argmax(-1)  # [N, T]: the guess for position t + 1
            hit = torch.ones_like(tokens, dtype=torch.bool)  # [N, T]
            hit[:, 1:] = guess[:, :-1] == tokens[:, 1:]  # [N, T - 1]: position t guessed right
            for row, sample in enumerate(b.samples):
                for start, end in sample.answer_spans:
                    right += int(hit[row, start:end].all())
                    total += 1
    finally:
        model.train(was_training)
    return right / max(total, 1)
