"""Every registered task: deterministic per (seed, index), exact lengths, masks on answers only, no torch."""

import subprocess
import sys

import numpy as np
import pytest

from ltmdsl.evals import TASKS, TaskError, accuracy, get_task, make_batch

# Small options per task; `text` needs a file and gets one from the fixture.
SMALL = {
    "hashhop": dict(context=300, hops=2, hash_length=6, queries=2),
    "niah": dict(context=400, needles=2, queries=2, depth=None),
    "mqar": dict(context=64, num_kv_pairs=4),
    "vt": dict(context=600, hops=3),
    "copy": dict(context=33, vocab_size=10),
    "induction": dict(context=40, vocab_size=10),
    "text": dict(context=100),
}


@pytest.fixture
def options_for(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(bytes(range(256)) * 8)

    def make(name):
        extra = {"data": str(corpus)} if name == "text" else {}
        return TASKS[name].make_options(**SMALL[name], **extra)
    return make


def test_every_task_has_small_options():
    assert set(SMALL) == set(TASKS)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_same_seed_and_index_give_the_same_sample(name, options_for):
    task, options = TASKS[name], options_for(name)
    a, b = task.generate(options, 5, 9), task.generate(options, 5, 9)
    assert a == b and a.tokens.tobytes() == b.tokens.tobytes()
    assert task.generate(options, 5, 10) != a
    assert task.generate(options, 6, 9) != a


@pytest.mark.parametrize("name", sorted(SMALL))
def test_batch_composition_and_order_do_not_change_a_sample(name, options_for):
    task, options = TASKS[name], options_for(name)
    forward = make_batch(task, options, 1, [3, 4, 5, 6])
    shuffled = make_batch(task, options, 1, [6, 0, 4])
    assert np.array_equal(forward.tokens[3], shuffled.tokens[0])
    assert np.array_equal(forward.tokens[1], shuffled.tokens[2])
    assert np.array_equal(forward.answer_mask[3], shuffled.answer_mask[0])
    assert forward.tokens.shape == (4, options.context) and forward.tokens.dtype == np.int64
    tokens, mask = forward.to_lists()
    assert isinstance(tokens[0][0], int) and isinstance(mask[0][0], bool)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_exact_length_vocab_and_mask_on_answers_only(name, options_for):
    task, options = TASKS[name], options_for(name)
    tokenizer = task.tokenizer(options)
    for index in range(10):
        sample = task.generate(options, 0, index)
        assert len(sample) == options.context
        assert 0 <= sample.tokens.min() and sample.tokens.max() < tokenizer.vocab_size
        expected = np.zeros(options.context, dtype=bool)
        for start, end in sample.answer_spans:
            expected[start:end] = True
        assert np.array_equal(sample.answer_mask, expected)
        assert not sample.answer_mask[0]


@pytest.mark.parametrize("name", sorted(SMALL))
def test_accuracy_is_one_for_the_truth_and_drops_for_a_wrong_answer(name, options_for):
    task, options = TASKS[name], options_for(name)
    sample = task.generate(options, 2, 0)
    assert accuracy(sample.tokens, sample) == 1.0
    answer_only = sample.tokens[sample.answer_mask]
    assert accuracy(answer_only, sample) == 1.0
    wrong = sample.tokens.copy()
    start, end = sample.answer_spans[0]
    wrong[end - 1] = (wrong[end - 1] + 1) % task.tokenizer(options).vocab_size
    assert accuracy(wrong, sample) < 1.0
    wrong_elsewhere = sample.tokens.copy()
    wrong_elsewhere[~sample.answer_mask] = 0  # only answer tokens are scored
    assert accuracy(wrong_elsewhere, sample) == 1.0


def test_spec_vocab_too_small_names_both_numbers(options_for):
    with pytest.raises(ValueError, match="the spec's vocab is 64 but the hashhop task's character tokenizer "
                                         "needs 99 token ids"):
        TASKS["hashhop"].tokenizer(options_for("hashhop")).fits(64)
    with pytest.raises(ValueError, match="the spec's vocab is 256 but the text task's byte tokenizer needs 259"):
        TASKS["text"].tokenizer(options_for("text")).fits(256)


@pytest.mark.parametrize("call,needle", [
    (lambda: get_task("hashop"), "unknown task 'hashop'; did you mean 'hashhop'"),
    (lambda: TASKS["hashhop"].make_options(hop=2), "hashhop: unknown option 'hop'; did you mean 'hops'"),
    (lambda: TASKS["hashhop"].make_options(hops="two"), "hashhop: option 'hops' must be int"),
    (lambda: TASKS["niah"].make_options(depth="deep"), "niah: option 'depth' must be float or none"),
    (lambda: TASKS["mqar"].make_options(num_kv_pairs=None), "mqar: option 'num_kv_pairs' needs a value"),
    (lambda: TASKS["vt"].generate(TASKS["vt"].defaults(), -1, 0), "seed must be a non-negative integer"),
], ids=["task", "option-name", "option-type", "float-option", "none", "seed"])
def test_bad_task_input_is_a_clear_error(call, needle):
    with pytest.raises(TaskError, match=needle):
        call()


def test_options_from_command_line_strings():
    options = TASKS["hashhop"].make_options(context="4_096", hops="3", cot="true")
    assert (options.context, options.hops, options.cot) == (4096, 3, True)
    assert TASKS["niah"].make_options(depth="none").depth is None
    assert TASKS["niah"].make_options(depth="0.25").depth == 0.25
    assert TASKS["copy"].make_options(length="5").length == 5


def test_options_are_frozen():
    options = TASKS["mqar"].defaults()
    with pytest.raises(AttributeError):
        options.context = 5


def test_evals_never_import_torch():
    code = ("import sys, ltmdsl.evals as e\n"
            "for n, t in e.TASKS.items():\n"
            "    n == 'text' or e.make_batch(t, t.defaults(), 0, [0, 1])\n"
            "assert 'torch' not in sys.modules and 'triton' not in sys.modules, 'torch imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)
