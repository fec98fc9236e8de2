"""The text decoder of a multimodal Hugging Face config (gemma3, llama4): its `text_config`, read by the text
family's reader through a Reader of its own (every key accounted for, messages naming `text_config`), the
top-level `tie_word_embeddings` (the multimodal config's own) honoured, and the vision part (`vision_config`,
the projector's and the image tokens' settings) left out with a NOTE: the imported model is the text decoder.
import-hf (and so the memory model) takes such configs; from_hf refuses their checkpoints by name
(`weights.TEXT_ONLY`), whose tensors hold the vision part under the multimodal model's names."""

from __future__ import annotations

from typing import Callable

from ltmdsl.hf.reader import Reader
from ltmdsl.hf.spec import show_value


def text_decoder(r: Reader, read_text: Callable[[Reader], dict], text_type: str, vision_keys: tuple[str, ...]) -> dict:
    """The plan fields of `text_config` (model_type `text_type`, read by `read_text`); `vision_keys` are the
    top-level keys of the vision part and the image tokens, left out with one NOTE."""
    text = r.raw("text_config", None) or {}
    if not isinstance(text, dict):
        raise r.fail(f"'text_config' must be an object, got {show_value(text)}")
    if text.get("model_type", text_type) != text_type:
        raise r.fail(f"'text_config.model_type' must be '{text_type}', got {show_value(text.get('model_type'))}")
    inner = Reader(text, f"{r.family} text_config", r.source, r.ignore)  # its messages say where the key is
    fields = read_text(inner)
    if r.present("tie_word_embeddings"):  # the multimodal config's own, which its language model head follows
        fields["tied"] = r.bool("tie_word_embeddings", fields["tied"])
    r.notes.extend(inner.finish())
    present = [k for k in vision_keys if k in r.cfg]
    for key in vision_keys:
        r.raw(key, None)
    r.notes.append(f"the vision part ({', '.join(map(repr, present)) or 'none stated'}) is left out: this model is "
                   f"the text decoder of the {r.family} config ('text_config')")
    return fields
