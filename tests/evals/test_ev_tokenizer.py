"""Tokenizers: the documented alphabet and special ids, refusal of unknown characters, round trips."""

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ltmdsl.evals import ByteTokenizer, CharTokenizer, TaskVocab, VocabError
from ltmdsl.evals.tokenizer import ALPHABET, BOS, EOS, PAD


def test_documented_ids():
    assert (PAD, BOS, EOS) == (0, 1, 2)
    tok = CharTokenizer()
    assert tok.vocab_size == 99 and len(ALPHABET) == 96
    assert tok.encode("\n a~").tolist() == [3, 4, 3 + 1 + ord("a") - 32, 98]


@given(st.text(alphabet=ALPHABET))
def test_char_round_trip(text):
    assert CharTokenizer().decode(CharTokenizer().encode(text)) == text


@pytest.mark.parametrize("text,char,offset", [("ab\tc", "\t", 2), ("naïve", "ï", 2), ("x😀", "😀", 1)],
                         ids=["tab", "accent", "emoji"])
def test_unknown_characters_are_refused_by_name(text, char, offset):
    message = f"character {char!r} at offset {offset} is not in the niah task's alphabet"
    with pytest.raises(VocabError, match=re.escape(message)):
        CharTokenizer("niah").encode(text)


@given(st.binary())
def test_byte_round_trip(data):
    tok = ByteTokenizer()
    ids = tok.encode(data)
    assert tok.decode(ids) == data and (len(data) == 0 or ids.min() >= 3)


def test_decode_drops_special_ids():
    assert CharTokenizer().decode([BOS, 3 + 1 + ord("A") - 32, PAD, EOS]) == "A"


@pytest.mark.parametrize("tokenizer,need", [(CharTokenizer("vt"), 99), (ByteTokenizer(), 259),
                                            (TaskVocab("copy", 16), 16)], ids=["char", "byte", "task"])
def test_fits(tokenizer, need):
    tokenizer.fits(need)
    with pytest.raises(VocabError, match=f"the spec's vocab is {need - 1} but .* needs {need} token ids; "
                                         f"raise the spec's vocab to at least {need}"):
        tokenizer.fits(need - 1)
