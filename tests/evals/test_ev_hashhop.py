"""HashHop: the text parses back into chains, answers follow them, the format is Magic's, sizes are exact."""

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ltmdsl.evals import CharTokenizer, TaskError, accuracy
from ltmdsl.evals.hashhop import TASK, HashHopOptions, minimum_context, n_chains, texts

LINE = re.compile(r"^([a-zA-Z]+) = ('?)([a-zA-Z]+)\2$")


def parse(sample):
    """(links {k: v}, quoted {k}, header, queries [(k, answer)]) re-read from the decoded sample alone."""
    text = CharTokenizer().decode(sample.tokens)
    prompt, completion = text.split("\nCOMPLETION:\n", 1)
    links, quoted = {}, set()
    for line in prompt.split("\n"):
        m = LINE.match(line)
        assert m, f"unparseable line {line!r}"
        assert m.group(1) not in links, "a hash is assigned twice"
        links[m.group(1)] = m.group(3)
        if m.group(2):
            quoted.add(m.group(1))
    header, body = completion.split("\n\n", 2)[:2], completion.split("\n\n", 2)[2]
    queries = []
    for line in body.rstrip("\n").split("\n"):
        m = re.match(r"^([a-zA-Z]+) = '(.*)'$", line)
        assert m, f"unparseable query {line!r}"
        queries.append((m.group(1), m.group(2)))
    return links, quoted, header, queries


def follow(links, quoted, start):
    """The hashes after `start` up to the quoted end of its chain."""
    path, at = [], start
    while True:
        path.append(links[at])
        if at in quoted:
            return path
        at = links[at]


def check_sample(options, seed, index):
    sample = TASK.generate(options, seed, index)
    assert len(sample) == options.context
    links, quoted, header, queries = parse(sample)
    assert header == ["Hops=" + str(options.hops), f"CoT={options.cot}"]
    assert len(queries) == options.queries == len(sample.answers)
    heads = set(links) - set(links.values())
    assert len(heads) == n_chains(options) == len(quoted)
    for head in heads:  # every chain has exactly `hops` links and only its last is quoted
        assert len(follow(links, quoted, head)) == options.hops
    for (key, answer), expected in zip(queries, sample.answers):
        assert key in heads, "a query must start a chain"
        path = follow(links, quoted, key)
        assert answer == (" = ".join(path) if options.cot else path[-1]) == expected
    return sample


@pytest.mark.parametrize("hops,cot,queries", [(1, False, 1), (2, False, 3), (3, True, 2), (6, True, 1)],
                         ids=["1hop", "2hop-3q", "3hop-cot", "6hop-cot"])
def test_lines_parse_back_into_chains_and_answers_follow_them(hops, cot, queries):
    check_sample(HashHopOptions(context=1500, hops=hops, hash_length=8, queries=queries, cot=cot), 3, 5)


def test_magic_format_verbatim():
    options = HashHopOptions(context=200, hops=2, hash_length=4, queries=2, cot=True)
    problem = texts(options, 0, 0)
    assert problem.completion.startswith("COMPLETION:\nHops=2\n\nCoT=True\n\n")
    assert problem.completion.endswith("'\n")
    for key, value in problem.targets.items():
        assert f"{key} = '{value}'\n" in problem.completion
        assert re.fullmatch(r"[a-zA-Z]{4} = [a-zA-Z]{4}", value)  # CoT lists the intermediate hash
    lines = problem.prompt.split("\n")
    assert sum(line.endswith("'") for line in lines) == len(lines) // 2  # one quoted end per 2-hop chain


def test_lines_are_shuffled():
    # In generation order a chain's links are adjacent; after the shuffle they are mostly not.
    options = HashHopOptions(context=4000, hops=2, hash_length=8)
    links, quoted, _, _ = parse(TASK.generate(options, 0, 0))
    lines = list(links)
    adjacent = sum(links[a] == b for a, b in zip(lines, lines[1:]))
    assert adjacent < len(lines) // 8
    # Unshuffled, 2-hop chains put the quoted line at every odd position; shuffled, about half are there.
    odd_quoted = sum(k in quoted for k in lines[1::2]) / len(lines[1::2])
    assert 0.3 < odd_quoted < 0.7


def test_mask_covers_exactly_the_answers():
    options = HashHopOptions(context=900, hops=3, hash_length=6, queries=3, cot=True)
    sample = TASK.generate(options, 1, 1)
    decoded = "".join(CharTokenizer().decode(sample.tokens[a:b]) for a, b in sample.answer_spans)
    assert decoded == "".join(sample.answers)
    assert int(sample.answer_mask.sum()) == sum(len(a) for a in sample.answers)
    assert accuracy(sample.tokens, sample) == 1.0


def test_chain_count_fills_the_context():
    options = HashHopOptions(context=1000, hops=2, hash_length=8)
    sample = TASK.generate(options, 0, 0)
    pads = int((sample.tokens == 0).sum())
    assert pads < options.hops * (2 * 8 + 4) + 2  # less than one more chain would need


def test_hashes_are_letters_and_distinct():
    options = HashHopOptions(context=3000, hops=2, hash_length=2)  # small alphabet space: collisions redrawn
    links, _, _, _ = parse(TASK.generate(options, 0, 0))
    hashes = list(links) + [v for v in links.values() if v not in links]
    assert len(hashes) == len(set(hashes)) == n_chains(options) * 3
    assert all(re.fullmatch("[a-zA-Z]{2}", h) for h in hashes)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(context=100, hops=6), "needs at least"),
    (dict(hops=0), "hops must be at least 1"),
    (dict(queries=0), "queries must be at least 1"),
    (dict(context=5000, hash_length=1), "raise hash_length"),
    (dict(cot="yes"), "cot must be true or false"),
    (dict(mixed_hops=1), "mixed_hops must be true or false"),
    # 2-hop chains fit 52 one-letter hashes, but the 1-hop samples of the mix hold more chains than that
    (dict(context=152, hops=2, hash_length=1, mixed_hops=True),
     "with mixed_hops, the 1-hop samples: 28 distinct hashes of 1 letters"),
], ids=["too-many-hops", "zero-hops", "zero-queries", "hash-space", "cot-type", "mixed-type",
        "mixed-shallow-depth-hash-space"])
def test_bad_options_are_clear_errors(kwargs, needle):
    with pytest.raises(TaskError, match=needle) as info:
        HashHopOptions(**kwargs)
    assert str(info.value).startswith("hashhop: ")


def test_mixed_hops_gives_sample_i_depth_1_plus_i_mod_hops():
    mixed = HashHopOptions(context=300, hops=3, hash_length=3, queries=2, cot=True, mixed_hops=True)
    for index in range(6):
        depth = 1 + index % 3
        fixed = HashHopOptions(context=300, hops=depth, hash_length=3, queries=2, cot=True)
        sample = TASK.generate(mixed, 7, index)
        assert np.array_equal(sample.tokens, TASK.generate(fixed, 7, index).tokens)
        assert sample.metadata["hops"] == depth
        check_sample(fixed, 7, index)  # the header says `Hops={depth}` and the answers follow depth links


def test_mixed_hops_is_training_only():
    assert TASK.train_only == ("mixed_hops",)
    assert HashHopOptions().mixed_hops is False


def test_minimum_context_is_exact():
    options = HashHopOptions(context=4096, hops=3, hash_length=5, queries=2, cot=True)
    need = minimum_context(options)
    check_sample(HashHopOptions(context=need, hops=3, hash_length=5, queries=2, cot=True), 0, 0)
    with pytest.raises(TaskError):
        HashHopOptions(context=need - 1, hops=3, hash_length=5, queries=2, cot=True)


@settings(max_examples=40, deadline=None)
@given(hops=st.integers(1, 5), length=st.integers(3, 10), queries=st.integers(1, 3), cot=st.booleans(),
       extra=st.integers(0, 400), seed=st.integers(0, 2**32), index=st.integers(0, 10**6))
def test_any_valid_options_give_a_derivable_sample(hops, length, queries, cot, extra, seed, index):
    need = minimum_context(HashHopOptions(context=5000, hops=hops, hash_length=length, queries=queries,
                                          cot=cot))
    check_sample(HashHopOptions(context=need + extra, hops=hops, hash_length=length, queries=queries, cot=cot),
                 seed, index)


def test_large_context_is_fast_enough_and_exact():
    sample = TASK.generate(HashHopOptions(context=200_000, hops=2), 0, 0)
    assert len(sample) == 200_000 and sample.tokens.dtype == np.int32
