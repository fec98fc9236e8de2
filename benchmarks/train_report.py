"""What the training benchmarks share: machine load, `ltmdsl train` / `ltmdsl eval` run as a user runs them,
and their RESULTS.md section.

Each benchmark owns one section of benchmarks/RESULTS.md between `<!-- NAME -->` and `<!-- /NAME -->`,
replaced whole (the file written atomically) each time it runs, so reruns never pile up stale numbers.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import ltmdsl
from ltmdsl import atomic

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine(threads: int | None = None) -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    threads = torch.get_num_threads() if threads is None else threads
    return (f"{os.cpu_count()} CPUs, load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min), "
            f"torch {torch.__version__} with {threads} thread(s), Python {platform.python_version()}")


def _run_cli(argv: list[str], threads: int) -> tuple[str, float, float]:
    """`ltmdsl ARGV` in a fresh interpreter with `threads` torch threads -> (stdout, wall s, its CPU s);
    SystemExit naming the command when it fails. The CPU seconds are that child's own (os.wait4), so runs
    started side by side from threads of one benchmark are each timed alone."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        wall = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-m", "ltmdsl.cli", *argv], env=env, stdout=out, stderr=err,
                                 text=True)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait for it
        wall = time.perf_counter() - wall
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if child.returncode != 0:
        raise SystemExit(f"ltmdsl {' '.join(argv)} failed ({child.returncode}):\n{stderr[-2000:]}")
    return stdout, wall, usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class TrainRun:
    """A finished `ltmdsl train` run: its folder, per-step metrics and what it cost."""

    out: Path
    model: str
    params: int
    records: list
    wall_s: float
    cpu_s: float

    @property
    def steps(self) -> int:
        return self.records[-1]["step"]

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.records[-1]["seconds"]

    def step_at(self, seconds: float) -> int:
        """The last step finished within `seconds` of training (the run's own clock), 0 for none."""
        return max((r["step"] for r in self.records if r["seconds"] <= seconds), default=0)

    def checkpoint(self, step: int) -> Path:
        return self.out / "checkpoints" / f"step-{step:08d}"

    def last_checkpoint_within(self, seconds: float) -> Path | None:
        """The checkpoint of the last saved step finished within `seconds` of training, None for none."""
        steps = [r["step"] for r in self.records if r["seconds"] <= seconds and self.checkpoint(r["step"]).is_dir()]
        return self.checkpoint(max(steps)) if steps else None


def cli_train(spec: str, task: str, flags: list[str], out: Path, threads: int) -> TrainRun:
    """`ltmdsl train SPEC --task TASK FLAGS --out OUT --json`, timed; its metrics read back from OUT."""
    _, wall, cpu = _run_cli(["train", str(spec), "--task", task, *flags, "--out", str(out), "--json"], threads)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    model = ltmdsl.load(spec).model
    return TrainRun(out, model.name, model.params_total, records, wall, cpu)


def cli_eval(run: Path, flags: list[str], samples: int, threads: int) -> dict:
    """`ltmdsl eval RUN FLAGS --samples N --json` -> {context: accuracy}, or {(context, hops): accuracy}
    when the task has hops."""
    stdout, _, _ = _run_cli(["eval", str(run), *flags, "--samples", str(samples), "--json"], threads)
    rows = json.loads(stdout)["results"]
    return {(r["context"] if r["hops"] is None else (r["context"], r["hops"])): r["accuracy"] for r in rows}


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section `name` of RESULTS.md with `body`."""
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmark results\n"
    block = f"<!-- {name} -->\n{body.rstrip()}\n<!-- /{name} -->\n"
    pattern = re.compile(rf"<!-- {re.escape(name)} -->\n.*?<!-- /{re.escape(name)} -->\n", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    atomic.write_text(RESULTS, text)
