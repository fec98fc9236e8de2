"""`ltmdsl show FILE [--json]`: the resolved stack as a table, one row per sub-layer, with totals."""

from __future__ import annotations

import json

from ltmdsl.commands.common import load_model
from ltmdsl.ir import ModelIR
from ltmdsl.kinds import kind_of
from ltmdsl.units import format_count


def add_arguments(p) -> None:
    p.add_argument("file", metavar="FILE", help="spec file (.ltm)")
    p.add_argument("--model", help="which model of the file (default: the last one)")
    p.add_argument("--json", action="store_true", help="print the resolved IR as JSON")


def dims(m) -> str:
    """The key dimensions of a mixer, in glossary names (its kind's `dims` facet)."""
    return kind_of(m).dims(m)


def norm_text(n) -> str:
    """A norm as the table shows it: its kind, `(1+w)` when zero-centred."""
    return n.kind + (" (1+w)" if n.zero_centred else "")


def residual_text(r) -> str:
    """A sub-layer's residual settings that differ from the plain x + f(norm(x)), e.g. ` skip=normed skip*3.56`."""
    return ((" skip=normed" if r.skip == "normed" else "") + (f" skip*{r.skip_scale:g}" if r.skip_scale != 1.0 else "")
            + (f" branch*{r.branch_scale:g}" if r.branch_scale != 1.0 else ""))


def scalars(model: ModelIR) -> str:
    """The model-level scalars that differ from their defaults, e.g. `embed_scale=8 logit_cap=30`."""
    given = [(n, getattr(model, n)) for n in ("embed_scale", "residual_scale", "logit_scale")
             if getattr(model, n) != 1.0] + ([("logit_cap", model.logit_cap)] if model.logit_cap is not None else [])
    return " ".join(f"{n}={v:g}" for n, v in given)


def table(model: ModelIR) -> str:
    rows = [("#", "kind", "layer", "dims", "params")]
    rows.append(("", "embed", "", f"V={model.vocab} d={model.d_model}", f"{model.embedding_params:,}"))
    for layer in model.layers:
        tied = f" (tied: {layer.tie_group})" if layer.tie_group and layer not in model.unique_layers() else ""
        post = f" post_norm={norm_text(layer.post_norm)}" if layer.post_norm is not None else ""
        post += residual_text(layer.residual)
        rows.append((str(layer.index), layer.kind, layer.definition, dims(layer.mixer) + post + tied,
                     f"{layer.params:,}"))
    rows.append(("", "norm", "final", norm_text(model.final_norm), f"{model.final_norm_params:,}"))
    rows.append(("", "head", "tied" if model.tie_embeddings else "untied", "", f"{model.head_params:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = []
    for n, r in enumerate(rows):
        cells = [r[i].ljust(widths[i]) if i < 4 else r[i].rjust(widths[i]) for i in range(5)]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    kinds: dict[str, int] = {}
    for layer in model.layers:
        kinds[layer.kind] = kinds.get(layer.kind, 0) + 1
    lines.append("")
    lines.append(f"model {model.name}: {len(model.layers)} sub-layers ("
                 + ", ".join(f"{n} {k}" for k, n in kinds.items()) + f"), dtype {model.dtype}"
                 + (f", {scalars(model)}" if scalars(model) else ""))
    lines.append(f"params_total  {model.params_total:>18,}  ({format_count(model.params_total)})")
    if model.params_active != model.params_total:
        lines.append(f"params_active {model.params_active:>18,}  ({format_count(model.params_active)}, per token)")
    if model.mtp is not None:
        lines.append(f"params_mtp    {model.params_mtp:>18,}  ({format_count(model.params_mtp)}, multi-token "
                     f"prediction depth {model.mtp.depth}, besides params_total)")
    return "\n".join(lines)


def run(args) -> int:
    _, model, code = load_model(args.file, args.model, show_warnings=not args.json)
    if model is None:
        return code
    if args.json:
        data = model.to_json()
        data["layers"] = [{**layer, "params": layer["params"]} for layer in data["layers"]]
        print(json.dumps(data, indent=2))
    else:
        print(table(model))
    return 0
