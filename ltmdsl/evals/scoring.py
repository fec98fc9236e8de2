"""Exact-match scoring of a model's predictions against a sample's answers, by the sample's own task."""

from __future__ import annotations

import difflib
from typing import Sequence

from ltmdsl.evals.registry import TASKS
from ltmdsl.evals.sample import Sample
from ltmdsl.evals.task import Task, TaskError


def get_task(name: str) -> Task:
    """The registered task `name`, or a `TaskError` that lists the tasks and suggests the closest."""
    if name in TASKS:
        return TASKS[name]
    close = difflib.get_close_matches(name, TASKS, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise TaskError(f"unknown task '{name}'{hint} (tasks: {', '.join(TASKS)})")


def accuracy(predicted_ids: Sequence[int], sample: Sample) -> float:
    """The sample's task's score of `predicted_ids` in [0, 1] (see `span_accuracy`), answer tokens only."""
    return get_task(sample.task).accuracy(predicted_ids, sample)
