"""Task options on the command line: `--hops 2`, `--num-kv-pairs 8`, `--data FILE`, ... for `train` and `eval`.

Every field of every registered task's options becomes one `--field-name` argument (so `--help` lists them
and argparse refuses a misspelt one); values stay strings until the chosen task parses them, which refuses
an option that task does not have by name (`mqar: unknown option 'hops'`). Torch-free.
"""

from __future__ import annotations

import dataclasses

from ltmdsl.evals import TASKS

#: option fields named by their own command-line flags elsewhere (--context is the commands' own)
OWN = ("context",)


def task_fields() -> dict[str, list[str]]:
    """field name -> the tasks that have it, over every registered task."""
    fields: dict[str, list[str]] = {}
    for task in TASKS.values():
        for f in dataclasses.fields(task.options):
            fields.setdefault(f.name, []).append(task.name)
    return fields


def add_task_arguments(p, multi: tuple[str, ...] = ()) -> None:
    """One `--name` per task option field; the fields in `multi` take one or more values."""
    group = p.add_argument_group("task options (each for the tasks named)")
    for name, tasks in sorted(task_fields().items()):
        if name in OWN:
            continue
        flag = "--" + name.replace("_", "-")
        group.add_argument(flag, dest=f"task_{name}", metavar="V",
                           nargs="+" if name in multi else None, help=", ".join(tasks))


def given_options(args) -> dict:
    """The task options given on the command line, by field name (values as typed)."""
    out = {}
    for name in task_fields():
        value = getattr(args, f"task_{name}", None)
        if value is not None:
            out[name] = value
    return out
