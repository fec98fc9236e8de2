"""Test-wide setup: Triton's interpreter must be chosen before any kernel module is imported."""

import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).parent))
