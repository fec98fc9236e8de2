"""Hugging Face `config.json` -> `Plan` (see spec.py): the shared machinery around one reader per model family.

A family's reader (ltmdsl/hf/families/<model_type>.py, `read(Reader) -> dict`) owns its stack layout (which HF
layer holds which kind) and its model-level fields (vocab, width, norm, tying); each layer kind reads its own
keys and writes its spec text through its HF facet (ltmdsl/kinds/<kind>_hf.py, `read` and `call`), all through
one `reader.Reader`. This module holds the tables (`SUPPORTED_FAMILIES`, `_READERS`), reading the file
(`read_config`) and turning a config into a plan and checked spec text (`plan_from_config`, `spec_from_config`).

We read the JSON ourselves (no `transformers` needed) with the defaults of the transformers 5 config classes,
and account for every key: a key is either mapped, known not to change the forward pass (metadata, token ids,
initialisation and training-only settings: `reader.HARMLESS_KEYS`), or an error that lists what is supported.
`ignore=` names keys the caller explicitly accepts to drop (e.g. a `rope_scaling` of type yarn, to count a
model's parameters); each dropped key is recorded as a NOTE comment in the spec. RoPE is plain or scaled as
Llama 3.1 does (`rope_type: llama3`, written `rope_scaling = llama3(...)` in the spec), over the whole head or,
where transformers honours `partial_rotary_factor` (Bamba, Qwen3-Next), over its first head_dim * factor channels
(`rope_dim`). Each family's layer pattern convention is in its module's docstring.
"""

from __future__ import annotations

import json
import os
import re
import stat

from ltmdsl.hf import HFError
from ltmdsl.hf.families import (bamba, deepseek_v2, deepseek_v3, falcon_h1, gemma3, gpt_oss, granitemoehybrid, jamba,
                                kimi_linear, lfm2, llama, llama4, mamba, mamba2, minimax, nemotron_h, qwen3_5,
                                qwen3_moe, qwen3_next, recurrent_gemma, xlstm)
from ltmdsl.hf.reader import MAX_CONFIG_BYTES, MAX_JSON_DEPTH, Reader, bf16  # noqa: F401  (bf16: re-exported)
from ltmdsl.hf.spec import Plan, safe_text, sanitize_name, show_value

SUPPORTED_FAMILIES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "mamba", "mamba2", "jamba", "nemotron_h",
                      "bamba", "qwen3_next", "lfm2", "recurrent_gemma", "xlstm",
                      "deepseek_v2", "deepseek_v3", *qwen3_5.MODEL_TYPES, "kimi_linear",
                      "qwen3_moe", "gpt_oss", "gemma3_text", "gemma3", "llama4_text", "granitemoehybrid", minimax.MODEL_TYPE,
                      "falcon_h1", "llama4")

#: Families we know of but cannot express exactly, and why (shown in the error).
UNSUPPORTED_REASONS = {
    "zamba2": "its shared transformer blocks take the concatenation of the hidden state and the embeddings "
              "and carry per-use LoRA adapters",
}

_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "bf16": "bf16", "fp16": "fp16",
           "fp32": "fp32", "half": "fp16", "float": "fp32"}


def _dtype(cfg: dict, family: str, source: str) -> str:
    """The spec dtype of `torch_dtype` (transformers 4) or `dtype` (transformers 5); float32 when neither is set."""
    key = "torch_dtype" if cfg.get("torch_dtype") is not None else "dtype"
    value = cfg.get(key)
    if value is None:
        return "fp32"
    if not isinstance(value, str) or value not in _DTYPES:
        raise HFError(f"{family}: '{key}' = {show_value(value)} is not supported (supported: "
                      f"{', '.join(sorted(_DTYPES))})", source or None)
    return _DTYPES[value]


_READERS = {**dict.fromkeys(llama.MODEL_TYPES, llama.read), "mamba": mamba.read, "mamba2": mamba2.read,
            "jamba": jamba.read, "nemotron_h": nemotron_h.read, "bamba": bamba.read, "qwen3_next": qwen3_next.read,
            "lfm2": lfm2.read, "recurrent_gemma": recurrent_gemma.read, "xlstm": xlstm.read,
            "deepseek_v2": deepseek_v2.read, "deepseek_v3": deepseek_v3.read,
            **dict.fromkeys(qwen3_5.MODEL_TYPES, qwen3_5.read), "kimi_linear": kimi_linear.read,
            "qwen3_moe": qwen3_moe.read, "gpt_oss": gpt_oss.read, "gemma3_text": gemma3.read,
            "gemma3": gemma3.read_multimodal, "llama4_text": llama4.read, "granitemoehybrid": granitemoehybrid.read,
            minimax.MODEL_TYPE: minimax.read, "falcon_h1": falcon_h1.read,
            "llama4": llama4.read_multimodal}


# ---------------------------------------------------------------------------------------------------------
# Entry points.
# ---------------------------------------------------------------------------------------------------------


def read_config(path) -> tuple[dict, str]:
    """The config dict of a checkpoint folder (its config.json) or of a config file, and the file's path."""
    path = os.fspath(path)
    cfg_path = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; only a regular file is read
        fd = os.open(cfg_path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise HFError("cannot read config: not a regular file", cfg_path)
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise HFError(f"cannot read config: {e.strerror or e}", cfg_path) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise HFError(f"config file larger than {MAX_CONFIG_BYTES // 2**20} MiB", cfg_path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HFError(f"not a JSON config: not UTF-8 text ({e.reason} at byte {e.start})", cfg_path) from None
    if json_depth(text, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise HFError(f"not a JSON config: arrays and objects nested more than {MAX_JSON_DEPTH} levels deep",
                      cfg_path)
    try:
        cfg = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, an integer of over 4300 digits
        raise HFError(f"not a JSON config: {safe_text(e, 200)}", cfg_path) from None
    if not isinstance(cfg, dict):
        raise HFError("config.json must hold a JSON object", cfg_path)
    return cfg, cfg_path


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def json_depth(text: str, limit: int) -> int:
    """How deeply the arrays and objects of a JSON text nest (brackets inside strings do not count), found
    without parsing, so that hostile nesting is refused before `json.loads` recurses; stops past `limit`."""
    depth = deepest = 0
    for c in _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)):
        depth += 1 if c in "[{" else -1
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                break
    return deepest


def plan_from_config(cfg: dict, *, name: str | None = None, source: str = "",
                     ignore=()) -> Plan:
    """Resolve an HF config dict into a `Plan`; raises HFError naming every unsupported setting."""
    family = cfg.get("model_type")
    if not isinstance(family, str):
        raise HFError(f"'model_type' must be a string naming the model family (supported: "
                      f"{', '.join(SUPPORTED_FAMILIES)}), got {show_value(family)}", source or None)
    if family in UNSUPPORTED_REASONS:
        raise HFError(f"model_type '{family}' is not supported: {UNSUPPORTED_REASONS[family]} "
                      f"(supported: {', '.join(SUPPORTED_FAMILIES)})", source or None)
    if family not in _READERS:
        raise HFError(f"model_type {show_value(family)} is not supported (supported: {', '.join(SUPPORTED_FAMILIES)})",
                      source or None)
    r = Reader(cfg, family, source or "<config>", frozenset(ignore))
    fields = _READERS[family](r)
    notes = r.finish()
    if name is None:
        name = default_name(cfg, source)
    hf = fields.pop("hf", {})
    family = fields.pop("family", family)  # one family for several model types (qwen3_5_text is qwen3_5)
    return Plan(family=family, name=sanitize_name(name), dtype=_dtype(cfg, family, source), notes=notes, source=source,
                hf=hf, **fields)


def default_name(cfg: dict, source: str = "") -> str:
    """The model's name: `_name_or_path`'s last part, else the checkpoint folder's or the JSON file's name."""
    base = cfg.get("_name_or_path")
    if not isinstance(base, str) or not base.strip("/"):
        if source and os.path.basename(source) == "config.json":
            base = os.path.basename(os.path.dirname(os.path.abspath(source)))
        elif source:
            base = os.path.splitext(os.path.basename(source))[0]
        else:
            base = str(cfg.get("model_type") or "model")
    return base.rstrip("/").split("/")[-1]


def spec_from_config(cfg: dict, *, name: str | None = None, source: str = "", ignore=()) -> str:
    """Spec text for an HF config dict (see `plan_from_config`), checked to load (see `checked_spec_text`)."""
    return checked_spec_text(plan_from_config(cfg, name=name, source=source, ignore=ignore), cfg)


def checked_spec_text(plan: Plan, cfg: dict) -> str:
    """The plan's spec text, loaded once to be sure that it is a valid model.

    The readers check every key's type and range and the relations between keys that they know of; a value
    the language still refuses (one of its own ranges or divisibility rules) is an HFError that names the spec
    parameter, the config key(s) that hold its value, and the language's reason, never a spec that does not load.
    """
    from ltmdsl.errors import SpecError
    from ltmdsl.loader import loads

    text = plan.spec_text()
    try:
        loads(text, name="<import-hf>")
    except SpecError as e:
        errors = [d for d in e.diagnostics if d.severity == "error"] or list(e.diagnostics)
        raise HFError(f"{plan.family}: {_explain(errors[0], text, cfg)}", plan.source or None) from None
    return text


_ARGUMENT = re.compile(r"([A-Za-z_]\w*)\s*=\s*([^,(){}\s]*)")


def _explain(diagnostic, text: str, cfg: dict) -> str:
    """A load error of generated spec text in the config's terms: the spec parameter at the error's column,
    the config keys (top level or one level down, `rope_scaling.factor`) whose value it is, and the reason."""
    lines = text.splitlines()
    line = lines[diagnostic.line - 1] if 0 < diagnostic.line <= len(lines) else ""
    args = [m for m in _ARGUMENT.finditer(line) if m.start() < max(diagnostic.col, 1)]
    if not args:
        return f"the config does not describe a valid model: {diagnostic.message}"
    param, literal = args[-1].group(1), args[-1].group(2)
    keys = _keys_holding(cfg, literal)
    source = (f"from config key {', '.join(repr(k) for k in keys)}" if keys
              else "derived from several config keys")
    return f"the config sets the model's {param} = {safe_text(literal, 40)} ({source}), which is invalid: " \
           f"{diagnostic.message}"


def _keys_holding(cfg: dict, literal: str) -> list[str]:
    """Config keys whose numeric value equals a spec literal (`32`, `1e-05`), nested dicts one level down."""
    try:
        target = float(literal)
    except ValueError:
        return []
    found = []
    for key, value in cfg.items():
        inner = value.items() if isinstance(value, dict) else ()
        for name, v in [(str(key), value), *((f"{key}.{k}", w) for k, w in inner)]:
            if isinstance(v, (int, float)) and not isinstance(v, bool) and float(v) == target:
                found.append(safe_text(name, 60))
    return found[:4]
