"""Every task by name: what `--task NAME` looks up."""

from __future__ import annotations

from ltmdsl.evals import copying, hashhop, induction, mqar, niah, text, vt
from ltmdsl.evals.task import Task

TASKS: dict[str, Task] = {task.name: task for task in (
    hashhop.TASK, niah.TASK, mqar.TASK, vt.TASK, copying.TASK, induction.TASK, text.TASK)}
