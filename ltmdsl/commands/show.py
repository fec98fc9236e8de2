"""`ltmdsl show FILE [--json]`: the resolved stack as a table, one row per sub-layer, with totals."""

from __future__ import annotations

import json

from ltmdsl.commands.common import load_model
from ltmdsl.ir import AttentionConfig, Mamba2Config, MambaConfig, MLPConfig, MoEConfig, ModelIR
from ltmdsl.units import format_count


def add_arguments(p) -> None:
    p.add_argument("file", metavar="FILE", help="spec file (.ltm)")
    p.add_argument("--model", help="which model of the file (default: the last one)")
    p.add_argument("--json", action="store_true", help="print the resolved IR as JSON")


def dims(m) -> str:
    """The key dimensions of a mixer, in glossary names."""
    if isinstance(m, AttentionConfig):
        text = f"H={m.heads} Hkv={m.kv_heads} D={m.head_dim}"
        text += f" Dv={m.v_head_dim}" if m.v_head_dim != m.head_dim else ""
        text += f" W={m.window}" if m.window else " global"
        text += f" rope={m.rope_theta:g}" if m.rope_theta else " nope"
        if m.rope_scaling is not None:  # e.g. "llama3x8@8192": frequencies scaled for 8x the 8192-token context
            s = m.rope_scaling
            text += f" {s.kind}x{s.factor:g}@{s.original_context}"
        if m.rope_dim is not None:  # partial rotary embeddings: only the first rope_dim channels of D rotate
            text += f" rope_dim={m.rope_dim}"
        return text
    if isinstance(m, MambaConfig):
        return f"N={m.d_state} K={m.d_conv} d_inner={m.d_inner} dt_rank={m.dt_rank}" + (" +norms" if m.inner_norms else "")
    if isinstance(m, Mamba2Config):
        return f"N={m.d_state} P={m.head_dim} heads={m.heads} G={m.n_groups} K={m.d_conv} C={m.chunk}"
    if isinstance(m, MLPConfig):
        return f"d_ff={m.d_ff} {m.activation}"
    if isinstance(m, MoEConfig):
        return f"E={m.experts} k={m.top_k} d_ff={m.d_ff} {m.activation} {m.routing}"
    return ""


def table(model: ModelIR) -> str:
    rows = [("#", "kind", "layer", "dims", "params")]
    rows.append(("", "embed", "", f"V={model.vocab} d={model.d_model}", f"{model.embedding_params:,}"))
    for layer in model.layers:
        tied = f" (tied: {layer.tie_group})" if layer.tie_group and layer not in model.unique_layers() else ""
        rows.append((str(layer.index), layer.kind, layer.definition, dims(layer.mixer) + tied, f"{layer.params:,}"))
    rows.append(("", "norm", "final", model.final_norm.kind, f"{model.final_norm_params:,}"))
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
                 + ", ".join(f"{n} {k}" for k, n in kinds.items()) + f"), dtype {model.dtype}")
    lines.append(f"params_total  {model.params_total:>18,}  ({format_count(model.params_total)})")
    if model.params_active != model.params_total:
        lines.append(f"params_active {model.params_active:>18,}  ({format_count(model.params_active)}, per token)")
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
