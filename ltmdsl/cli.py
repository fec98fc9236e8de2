"""The `ltmdsl` command line: one sub-command per module in `ltmdsl/commands`, imported only when used.

Each command module exposes `add_arguments(parser)` and `run(args) -> int`. Exit codes: 0 success,
1 invalid spec or failed operation, 2 usage error (a missing optional extra included), 3 a declared budget
does not hold.

`pip install ltmdsl` gives check, show, fmt, memory and import-hf (lark, sympy, jinja2); the rest comes with
extras (pyproject.toml). A command that reaches for a package of a missing extra stops with one line naming
the extra to install (`missing_extra`), exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from ltmdsl import __version__

#: name -> (module under ltmdsl.commands, one-line help). Importing is deferred so that `check` stays fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "check": ("check", "validate specs and evaluate their budgets"),
    "show": ("show", "print the resolved layer stack with parameter counts"),
    "fmt": ("fmt", "print a spec in canonical form"),
    "memory": ("memory", "memory and compute report: will it fit, on how many GPUs"),
    "stream": ("stream", "stream synthetic tokens through a model built from a spec"),
    "compile": ("compile", "write the generated Triton kernels of a spec to a directory"),
    "emit": ("emit", "print one generated Triton kernel"),
    "import-hf": ("import_hf", "write a spec from a Hugging Face config.json"),
    "export-hf": ("export_hf", "write a Hugging Face folder (config + safetensors) from a spec or checkpoint"),
    "train": ("train", "train a spec's model on an eval task (checkpoints, metrics, plot)"),
    "eval": ("eval", "exact-match accuracy of trained checkpoints on the eval tasks, through the cache"),
}


#: optional package (top-level import name) -> the extra that installs it, as pyproject.toml declares.
EXTRAS: dict[str, str] = {"torch": "runtime", "safetensors": "runtime", "numpy": "runtime", "tqdm": "runtime",
                          "triton": "triton", "matplotlib": "plot"}


def missing_extra(error: ImportError) -> str | None:
    """The message for an import of an optional package that is not installed; None for any other error."""
    name = getattr(error, "name", None) or ""
    root = name.split(".")[0]
    if not isinstance(error, ModuleNotFoundError) or root not in EXTRAS:
        return None
    extra = EXTRAS[root]
    return (f"this needs {root}, which is not installed; install the '{extra}' extra: "
            f"pip install 'ltmdsl[{extra}]'")


def _chosen(argv: list[str]) -> str | None:
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ltmdsl",
        description="ltmdsl: define long-context hybrid models, check their memory, compile and run them.",
        epilog="Run 'ltmdsl COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"ltmdsl {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = _chosen(argv)
    for name, (module, help_text) in COMMANDS.items():
        sub = subs.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(f"ltmdsl.commands.{module}").add_arguments(sub)
            sub.set_defaults(_module=module)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Library warnings (NaN weights, ...) as one line on stderr, not Python's two-line format."""
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        if not getattr(args, "command", None):
            parser.print_help(sys.stderr)
            return 2
        module = importlib.import_module(f"ltmdsl.commands.{args._module}")
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return int(module.run(args) or 0)
    except ModuleNotFoundError as e:
        message = missing_extra(e)
        if message is None:
            raise
        command = _chosen(argv)
        print(f"ltmdsl {command}: error: {message}" if command else f"ltmdsl: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ltmdsl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `ltmdsl show big.ltm | head`
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
