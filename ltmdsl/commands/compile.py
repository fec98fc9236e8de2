"""`ltmdsl compile FILE -o DIR`: write a model's generated Triton kernels and a manifest for inspection.

Every distinct layer configuration of the model becomes one kernel module (codegen/kernelspec.py); each
is rendered, linted (codegen/lint.py) and written as DIR/<name>.py, and DIR/manifest.json lists them with
their spec hash, cache key, parameters, launch META and the lint's shared-memory estimate. The output is
built in a temporary directory beside DIR and swapped into place (ltmdsl/atomic.py), so DIR holds the old
complete output or the new one, never a part. An existing DIR is replaced only if it is empty or provably
an earlier ltmdsl output (its record lists exactly the files it holds); anything else is refused untouched.
Nothing here imports triton: compiling works on machines without it.
"""

from __future__ import annotations

import json
import os
import sys

from ltmdsl import atomic
from ltmdsl.commands.common import EXIT_OK, EXIT_SPEC, EXIT_USAGE, load_model


def add_arguments(p) -> None:
    p.add_argument("file", metavar="FILE", help="spec file (.ltm)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="directory to write the kernels into")
    p.add_argument("--model", help="which model of the file (default: the last one)")
    add_target_arguments(p)


def add_target_arguments(p) -> None:
    """--dtype and --target, shared with `ltmdsl emit`."""
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"),
                   help="activation dtype of the kernels (default: the model's dtype, fp32 if it has none)")
    p.add_argument("--target", choices=("gpu", "interpreter"), default="gpu",
                   help="gpu: native dtypes in tl.dot; interpreter: upcast to fp32 (TRITON_INTERPRET=1)")


def rendered_kernels(model, dtype: str | None, target: str) -> list[dict]:
    """[{spec, source, key, reports}] for every kernel module of `model`, linted."""
    from ltmdsl.codegen.cache import kernel_key
    from ltmdsl.codegen.kernelspec import specs_for_model
    from ltmdsl.codegen.lint import lint_or_raise
    from ltmdsl.codegen.render import render

    out = []
    for spec in specs_for_model(model, dtype=dtype, upcast=target == "interpreter"):
        source = render(spec)
        reports = lint_or_raise(source, spec)
        out.append({"spec": spec, "source": source, "key": kernel_key(source), "reports": reports})
    return out


def manifest(model, items: list[dict], dtype: str | None, target: str) -> dict:
    from ltmdsl import __version__
    from ltmdsl.codegen.cache import _triton_version

    return {
        "ltmdsl_version": __version__,
        "triton_version": _triton_version(),
        "model": model.name,
        "source_hash": model.source_hash,
        "dtype": items[0]["spec"]["dtype"] if items else dtype,
        "target": target,
        "kernels": [
            {
                "name": it["spec"].name,
                "file": it["spec"].name + ".py",
                "family": it["spec"].family,
                "spec_hash": it["spec"].spec_hash,
                "key": it["key"],
                "params": dict(it["spec"].params),
                "functions": {fn: {"smem_bytes_estimate": r.smem_bytes} for fn, r in it["reports"].items()},
            }
            for it in items
        ],
    }


def run(args) -> int:
    _, model, code = load_model(args.file, args.model)
    if model is None:
        return code
    dest = os.path.abspath(args.output)
    try:
        atomic.check_replaceable(dest)
    except OSError as e:
        print(f"{args.output}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        items = rendered_kernels(model, args.dtype, args.target)
    except Exception as e:  # a lint or spec failure: report, write nothing
        print(f"error: code generation failed: {e}", file=sys.stderr)
        return EXIT_SPEC
    try:
        with atomic.directory(dest) as tmp:
            for it in items:
                (tmp / f"{it['spec'].name}.py").write_text(it["source"], encoding="utf-8")
            (tmp / "manifest.json").write_text(
                json.dumps(manifest(model, items, args.dtype, args.target), indent=2, sort_keys=True) + "\n",
                encoding="utf-8")
    except atomic.NotOwnOutput as e:
        print(f"{args.output}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"{args.output}: error: cannot write: {e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE
    for it in items:
        print(f"{it['spec'].name}.py  ({it['spec'].family}, key {it['key'][:16]})")
    print(f"wrote {len(items)} kernel modules and manifest.json to {args.output}")
    return EXIT_OK
