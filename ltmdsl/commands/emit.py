"""`ltmdsl emit FILE --kernel NAME`: print one generated kernel module of a model.

NAME is a module name as `ltmdsl compile` writes it (attention_g2_d16_causal_fp32, ...); a wrong NAME
prints the available names to stderr and exits 2. The source is rendered and linted, not run.
"""

from __future__ import annotations

import sys

from ltmdsl.commands.common import EXIT_OK, EXIT_SPEC, EXIT_USAGE, load_model
from ltmdsl.commands.compile import add_target_arguments


def add_arguments(p) -> None:
    p.add_argument("file", metavar="FILE", help="spec file (.ltm)")
    p.add_argument("--kernel", required=True, metavar="NAME", help="kernel module to print")
    p.add_argument("--model", help="which model of the file (default: the last one)")
    add_target_arguments(p)


def run(args) -> int:
    from ltmdsl.codegen.kernelspec import specs_for_model
    from ltmdsl.codegen.lint import lint_or_raise
    from ltmdsl.codegen.render import render

    _, model, code = load_model(args.file, args.model)
    if model is None:
        return code
    specs = {s.name: s for s in specs_for_model(model, dtype=args.dtype, upcast=args.target == "interpreter")}
    chosen = specs.get(args.kernel)
    if chosen is None:
        print(f"error: model {model.name} has no kernel {args.kernel!r}; available:", file=sys.stderr)
        for name in specs:
            print(f"  {name}", file=sys.stderr)
        return EXIT_USAGE
    source = render(chosen)
    try:
        lint_or_raise(source, chosen)
    except Exception as e:
        print(source, end="")
        print(f"error: {e}", file=sys.stderr)
        return EXIT_SPEC
    print(source, end="")
    return EXIT_OK
