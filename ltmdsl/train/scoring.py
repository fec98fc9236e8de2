"""Exact-match accuracy of a model on a task, through the cache: prefill, then greedy decode each answer.

For each sample, the tokens before an answer span are prefilled into the model's cache (in chunks of at
most `chunk` tokens, so a long context streams through a bounded activation size); the answer is then
decoded greedily, one token per step, each predicted token fed back as the next input, exactly as a
user's generation would. The context between answers is the sample's own; the model's answers stay in the
cache (a later question sees what the model said, not the truth). The score of a sample is the task's
`accuracy` on the decoded answer tokens: the fraction of answers right in every token.

`text` is the exception: its answer is the whole window and its score next-byte accuracy, so there the
sample's own bytes are fed after each guess (teacher forcing) instead of the model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ltmdsl.evals import Sample, Task

#: tasks scored on next-token accuracy with the true context (see the module docstring)
TEACHER_FORCED = ("text",)


@dataclass(frozen=True)
class Score:
    """Mean exact-match accuracy over `samples` samples (and the per-sample scores)."""

    accuracy: float
    samples: int
    per_sample: tuple[float, ...]


@torch.inference_mode()
def decode_answers(model, sample: Sample, chunk: int = 4096, teacher_forced: bool = False) -> np.ndarray:
    """The model's greedy answer tokens for `sample`, concatenated in span order ([n_answer] int64).

    `teacher_forced` feeds the sample's own token after each guess instead of the guess."""
    tokens = torch.from_numpy(sample.tokens.astype(np.int64))[None].to(model.device)  # [1, T]
    last_span_end = sample.answer_spans[-1][1]
    cache = model.new_cache(1, last_span_end)
    answers: list[int] = []
    fed = 0  # positions fed to the cache so far
    for start, end in sample.answer_spans:
        logits = None
        while fed < start:  # prefill the sample's own tokens up to the answer
            upto = min(start, fed + chunk)
            logits = model(tokens[:, fed:upto], cache, output="last")  # [1, 1, V]
            fed = upto
        for t in range(start, end):
            guess = int(logits[0, -1].argmax())
            answers.append(guess)
            if t + 1 < end or end < last_span_end:
                fed_token = tokens[:, t:t + 1] if teacher_forced else torch.tensor([[guess]], device=model.device)
                logits = model(fed_token, cache, output="last")  # [1, 1, V]
                fed += 1
    return np.asarray(answers, dtype=np.int64)


def score(model, task: Task, options: Any, seed: int, samples: int, chunk: int = 4096,
          on_sample: Callable[[], object] | None = None) -> Score:
    """Mean exact-match accuracy of `model` on samples 0..samples-1 of `task` under `options` and `seed`;
    `on_sample` is called after each (a progress bar's update)."""
    was_training = model.training
    model.eval()
    try:
        per = []
        for index in range(samples):
            sample = task.generate(options, seed, index)
            answers = decode_answers(model, sample, chunk, teacher_forced=task.name in TEACHER_FORCED)
            per.append(float(task.accuracy(answers, sample)))
            if on_sample is not None:
                on_sample()
    finally:
        model.train(was_training)
    return Score(accuracy=float(np.mean(per)), samples=samples, per_sample=tuple(per))
