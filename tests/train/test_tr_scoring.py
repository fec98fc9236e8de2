"""Scoring through the cache decodes what a full recompute without a cache would.

Oracle: for each answer token, run the model on the whole prefix (no cache) in float64 and take the argmax,
writing the model's own answers into the prefix as decoding does. Exact equality of token ids.
"""

import numpy as np
import pytest
import torch

import ltmdsl
from ltmdsl.evals import get_task
from ltmdsl.train.scoring import decode_answers, score
from train_specs import MQAR, tiny_spec

WIDE = tiny_spec().text.replace("vocab = 32", "vocab = 100")


def recompute(model, sample):
    tokens = sample.tokens.astype(np.int64).copy()
    out = []
    with torch.no_grad():
        for start, end in sample.answer_spans:
            for t in range(start, end):
                logits = model(torch.from_numpy(tokens[:t])[None])  # [1, t, V], no cache
                guess = int(logits[0, -1].argmax())
                out.append(guess)
                tokens[t] = guess
    return np.asarray(out)


@pytest.mark.parametrize("task,options,text", [
    ("mqar", MQAR, None),
    ("hashhop", {"context": 120, "hops": 2, "hash_length": 3, "queries": 2}, WIDE),
], ids=["mqar", "hashhop-2-queries"])
def test_cache_decode_equals_recompute(task, options, text):
    model = ltmdsl.build(tiny_spec(text) if text else tiny_spec(), dtype=torch.float64, seed=3)
    t = get_task(task)
    sample = t.generate(t.make_options(**options), 5, 0)
    np.testing.assert_array_equal(decode_answers(model, sample, chunk=5), recompute(model, sample))


def test_score_is_mean_exact_match():
    model = ltmdsl.build(tiny_spec(), seed=0)
    t = get_task("mqar")
    options = t.make_options(**MQAR)
    result = score(model, t, options, seed=1, samples=3)
    expected = [t.accuracy(decode_answers(model, t.generate(options, 1, i)), t.generate(options, 1, i))
                for i in range(3)]
    assert result.per_sample == tuple(expected) and result.accuracy == pytest.approx(np.mean(expected))


def test_teacher_forced_decoding_equals_argmax_of_one_forward():
    model = ltmdsl.build(tiny_spec(), dtype=torch.float64, seed=2)
    t = get_task("copy")
    sample = t.generate(t.make_options(context=24, vocab_size=16), 0, 0)
    with torch.no_grad():
        logits = model(torch.from_numpy(sample.tokens.astype(np.int64))[None])  # [1, T, V]
    start, end = sample.answer_spans[0]
    expected = logits[0, start - 1:end - 1].argmax(-1).numpy()
    np.testing.assert_array_equal(decode_answers(model, sample, chunk=7, teacher_forced=True), expected)
