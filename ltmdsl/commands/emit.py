"""`ltmdsl emit FILE [--kernel NAME]`: print one generated kernel module of a model, or list them.

NAME is a module name as `ltmdsl compile` writes it (attention_g2_d16_causal_fp32, ...); without --kernel
the names are printed to stdout (exit 0); a wrong NAME prints them to stderr and exits 2. A model whose
kernels cannot be generated (a head_dim beyond the code generator's limits, say) is a clear error, exit 1.
The source is rendered and linted, not run.
"""

from __future__ import annotations

import sys

from ltmdsl.commands.common import EXIT_OK, EXIT_SPEC, EXIT_USAGE, load_model
from ltmdsl.commands.compile import add_target_arguments


def add_arguments(p) -> None:
    p.add_argument("file", metavar="FILE", help="spec file (.ltm)")
    p.add_argument("--kernel", metavar="NAME", help="kernel module to print (default: list the model's kernels)")
    p.add_argument("--model", help="which model of the file (default: the last one)")
    add_target_arguments(p)


def run(args) -> int:
    from ltmdsl.codegen.kernelspec import KernelSpecError, specs_for_model
    from ltmdsl.codegen.lint import lint_or_raise
    from ltmdsl.codegen.render import render

    _, model, code = load_model(args.file, args.model)
    if model is None:
        return code
    try:
        specs = {s.name: s for s in specs_for_model(model, dtype=args.dtype, upcast=args.target == "interpreter")}
    except KernelSpecError as e:
        print(f"{args.file}: error: code generation failed for model {model.name}: {e}", file=sys.stderr)
        return EXIT_SPEC
    if args.kernel is None:
        for name in specs:
            print(name)
        return EXIT_OK
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
