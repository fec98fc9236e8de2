"""What the training benchmarks share: machine load, timing of a training run, and their RESULTS.md section.

Each benchmark owns one section of benchmarks/RESULTS.md between `<!-- NAME -->` and `<!-- /NAME -->`,
replaced whole (the file written atomically) each time it runs, so reruns never pile up stale numbers.
"""

from __future__ import annotations

import os
import platform
import re
import time
from pathlib import Path

import torch

from ltmdsl import atomic

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return (f"{os.cpu_count()} CPUs, load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min), "
            f"torch {torch.__version__} with {torch.get_num_threads()} thread(s), Python {platform.python_version()}")


def timed_training(records_iter):
    """Run a training iterator to the end; (records, wall seconds, process CPU seconds)."""
    wall, cpu = time.perf_counter(), time.process_time()
    records = list(records_iter)
    return records, time.perf_counter() - wall, time.process_time() - cpu


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section `name` of RESULTS.md with `body`."""
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmark results\n"
    block = f"<!-- {name} -->\n{body.rstrip()}\n<!-- /{name} -->\n"
    pattern = re.compile(rf"<!-- {re.escape(name)} -->\n.*?<!-- /{re.escape(name)} -->\n", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    atomic.write_text(RESULTS, text)
