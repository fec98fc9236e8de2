"""Long-context eval tasks (HashHop, needle in a haystack, MQAR, variable tracking, copy, induction, text).

Pure Python and numpy, no torch: each task turns typed frozen options and `(seed, index)` into a `Sample`
of exactly `options.context` tokens whose answer mask marks only the answer tokens. `TASKS` maps names to
tasks; `make_batch` stacks samples; `accuracy` scores predictions by exact match of the answers.

    task = get_task("hashhop")
    options = task.make_options(context=4096, hops=2)
    task.tokenizer(options).fits(spec_vocab)          # VocabError when the spec's vocab is too small
    sample = task.generate(options, seed=0, index=17)
"""

from ltmdsl.evals.batch import Batch, make_batch
from ltmdsl.evals.registry import TASKS
from ltmdsl.evals.sample import Sample
from ltmdsl.evals.scoring import accuracy, get_task
from ltmdsl.evals.task import Task, TaskError
from ltmdsl.evals.tokenizer import ByteTokenizer, CharTokenizer, TaskVocab, VocabError

__all__ = ["TASKS", "Batch", "ByteTokenizer", "CharTokenizer", "Sample", "Task", "TaskError", "TaskVocab",
           "VocabError", "accuracy", "get_task", "make_batch"]
