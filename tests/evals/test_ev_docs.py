"""docs/EVALS.md shows real generator output: its examples are regenerated and compared."""

import re

import pytest

from ltmdsl.evals import TASKS

from paths import ROOT

DOC = (ROOT / "docs" / "EVALS.md").read_text()


def unwrapped(text):
    return re.sub(r"\s+", " ", text)


@pytest.mark.parametrize("name,options", [
    ("hashhop", dict(context=170, hops=2, hash_length=4, queries=2)),
    ("niah", dict(context=330, depth=0.5)),
    ("vt", dict(context=520, hops=2)),
], ids=["hashhop", "niah", "vt"])
def test_character_examples_are_generator_output(name, options):
    task = TASKS[name]
    opts = task.make_options(**options)
    text = task.tokenizer(opts).decode(task.generate(opts, 0, 0).tokens)
    assert unwrapped(text).strip() in unwrapped(DOC)


@pytest.mark.parametrize("name,options", [
    ("mqar", dict(context=24, num_kv_pairs=3, vocab_size=32)),
    ("copy", dict(context=11, vocab_size=10)),
    ("induction", dict(context=12, vocab_size=10)),
], ids=["mqar", "copy", "induction"])
def test_id_examples_are_generator_output(name, options):
    tokens = TASKS[name].generate(TASKS[name].make_options(**options), 0, 0).tokens.tolist()
    assert unwrapped(str(tokens)) in unwrapped(DOC).replace(",  ", ", ")


def test_every_task_is_documented():
    for name in TASKS:
        assert f"### `{name}`" in DOC
