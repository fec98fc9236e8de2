"""MQAR: disjoint key/value vocabularies, every key asked once at power-law gaps, answers only at queries."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ltmdsl.evals import TaskError, VocabError
from ltmdsl.evals.mqar import TASK, MqarOptions, gap_probabilities, query_slots


def derive(sample, options):
    """Answers re-derived from the token stream alone: the pairs define key -> value; queries re-use keys."""
    n, half = options.num_kv_pairs, options.vocab_size // 2
    pairs = dict(zip(sample.tokens[0:2 * n:2].tolist(), sample.tokens[1:2 * n:2].tolist()))
    return [str(pairs[int(sample.tokens[start - 1])]) for start, _ in sample.answer_spans], pairs, half


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 8), extra=st.integers(0, 64), vocab=st.integers(20, 300), seed=st.integers(0, 2**32),
       index=st.integers(0, 10**6), noise=st.booleans())
def test_any_valid_options_give_a_derivable_sample(n, extra, vocab, seed, index, noise):
    options = MqarOptions(context=4 * n + extra, num_kv_pairs=n, vocab_size=vocab, random_non_queries=noise)
    sample = TASK.generate(options, seed, index)
    assert len(sample) == options.context
    answers, pairs, half = derive(sample, options)
    assert list(sample.answers) == answers
    assert len(pairs) == n and all(1 <= k < half for k in pairs) and all(half <= v < vocab for v in pairs.values())
    assert len(set(pairs.values())) == n
    queried = [int(sample.tokens[start - 1]) for start, _ in sample.answer_spans]
    assert sorted(queried) == sorted(pairs)  # each key asked exactly once, after the pairs
    assert all(start > 2 * n for start, _ in sample.answer_spans)
    assert sample.answer_mask.sum() == n and all(end - start == 1 for start, end in sample.answer_spans)
    assert sample.tokens.min() >= 0 and sample.tokens.max() < vocab


def test_key_and_value_vocabularies_are_disjoint_halves():
    options = MqarOptions(context=64, num_kv_pairs=8, vocab_size=256)
    keys, values = set(), set()
    for i in range(200):
        meta = TASK.generate(options, 0, i).metadata
        keys |= set(meta["keys"])
        values |= set(meta["values"])
    assert not keys & values
    assert max(keys) < 128 <= min(values) and min(keys) >= 1 and max(values) < 256
    assert len(keys) > 100 and len(values) > 100  # both halves are used, not a fixed few ids


def test_query_gaps_follow_the_power_law():
    # One pair per sample, so each gap is one draw from p(g) ∝ (g + 1) ** (a - 1): compare with p.
    options = MqarOptions(context=130, num_kv_pairs=1, vocab_size=256, power_a=0.01)
    slots = query_slots(options)
    gaps = np.array([TASK.generate(options, 7, i).metadata["gaps"][0] for i in range(4000)])
    p = gap_probabilities(options)
    edges = [0, 1, 2, 4, 8, 16, 32, slots]
    observed = np.array([((gaps >= a) & (gaps < b)).sum() for a, b in zip(edges, edges[1:])])
    expected = np.array([p[a:b].sum() for a, b in zip(edges, edges[1:])]) * len(gaps)
    chi2 = float((((observed - expected) ** 2) / expected).sum())
    assert chi2 < 22.5, f"chi-square {chi2:.1f} on 6 degrees of freedom (p < 0.001 above 22.5)"
    assert observed[0] > observed[-1] / 2  # the first slot alone rivals the far half: a power law, not uniform
    uniform = np.full(len(observed), 0.0)
    uniform[:] = [(b - a) / slots * len(gaps) for a, b in zip(edges, edges[1:])]
    assert float((((observed - uniform) ** 2) / uniform).sum()) > 200  # and it is far from uniform


def test_noise_is_zero_without_random_non_queries():
    options = MqarOptions(context=64, num_kv_pairs=4, random_non_queries=False)
    sample = TASK.generate(options, 0, 0)
    starts = [start for start, _ in sample.answer_spans]
    used = set(range(8)) | set(starts) | {s - 1 for s in starts}
    assert all(sample.tokens[t] == 0 for t in range(64) if t not in used)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(num_kv_pairs=20, vocab_size=32), "raise vocab_size to at least 42"),
    (dict(context=15, num_kv_pairs=4), "needs at least 16 tokens"),
    (dict(power_a=0.0), "power_a must be in"),
    (dict(vocab_size=2), "vocab_size must be at least 4"),
], ids=["vocab-too-small", "context-too-small", "power-a", "tiny-vocab"])
def test_bad_options_are_clear_errors(kwargs, needle):
    with pytest.raises(TaskError, match=needle):
        MqarOptions(**kwargs)


def test_spec_vocab_must_hold_the_task_vocab():
    tokenizer = TASK.tokenizer(MqarOptions(vocab_size=256))
    tokenizer.fits(256)
    with pytest.raises(VocabError, match="the spec's vocab is 128 but the mqar task .* needs 256"):
        tokenizer.fits(128)
