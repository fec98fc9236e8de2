"""Fixtures of the memory tests: hand-built models (see memory_zoo.py)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from memory_zoo import zoo  # noqa: E402


@pytest.fixture(scope="session")
def models():
    return zoo()
