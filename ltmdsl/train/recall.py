"""Whether a model can serve a task's recall at a context: sliding windows versus global attention.

Every task but `text` asks for something stated anywhere earlier in the context (a hash, a needle, a key).
A model whose attention layers are all sliding windows shorter than the context can only carry that
through its recurrent layers' fixed-size state, so `ltmdsl eval` warns before scoring it there.
"""

from __future__ import annotations

from ltmdsl.ir import ModelIR

#: tasks whose answers depend only on nearby tokens (next-byte prediction)
LOCAL_TASKS = ("text",)


def windows(ir: ModelIR) -> tuple[list[int], bool]:
    """(the sliding windows of the model's attention layers, whether any attention layer is global)."""
    found, global_attention = [], False
    for layer in ir.layers:
        if not hasattr(layer.mixer, "window"):
            continue  # not attention: no window to speak of
        if layer.mixer.window is None:
            global_attention = True
        else:
            found.append(int(layer.mixer.window))
    return found, global_attention


def recall_warning(ir: ModelIR, task: str, context: int) -> str | None:
    """A one-line warning when `task` at `context` needs recall beyond every sliding window of `ir`."""
    if task in LOCAL_TASKS:
        return None
    found, global_attention = windows(ir)
    if global_attention or not found or context <= max(found):
        return None
    return (f"{task} at context {context:,} needs recall across the whole context, but every attention layer "
            f"of {ir.name} is a sliding window (at most {max(found):,} tokens); only its recurrent state "
            f"can carry older tokens")
