"""The haystack's filler: the repeated "grass is green" sentences of the passkey test.

Mohtashami and Jaggi's passkey retrieval (Landmark Attention, 2023), and RULER after it, hide facts in
this repeated noise: it carries no information a model could confuse with a fact, and it is the same for
every sample, so only the hidden facts vary. Sentences cycle in a fixed order and always end in a space.
"""

from __future__ import annotations

SENTENCES = (
    "The grass is green. ",
    "The sky is blue. ",
    "The sun is yellow. ",
    "Here we go. ",
    "There and back again. ",
)
LONGEST = max(len(s) for s in SENTENCES)


def filler(n_chars: int) -> list[str]:
    """As many whole filler sentences as fit in `n_chars` characters, in cycle order."""
    cycle = sum(len(s) for s in SENTENCES)
    out = list(SENTENCES) * max(n_chars // cycle, 0)
    used = cycle * len(out) // len(SENTENCES)
    for sentence in SENTENCES:
        if used + len(sentence) > n_chars:
            break
        out.append(sentence)
        used += len(sentence)
    return out
