"""`ltmdsl fmt FILE`: print a spec in canonical form (or rewrite it in place with --write)."""

from __future__ import annotations

import sys

from ltmdsl.commands.common import EXIT_OK, EXIT_SPEC, EXIT_USAGE, atomic_write_text
from ltmdsl.errors import SpecError
from ltmdsl.fmt import format_spec
from ltmdsl.loader import read_spec_file
from ltmdsl.parser import parse


def add_arguments(p) -> None:
    p.add_argument("file", metavar="FILE", help="spec file (.ltm)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("-w", "--write", action="store_true", help="rewrite the file in place (atomically)")
    mode.add_argument("--check", action="store_true", help="exit 1 if the file is not in canonical form")


def run(args) -> int:
    try:
        text = read_spec_file(args.file)
        out = format_spec(parse(text, args.file))
    except SpecError as e:
        print(e.render(), file=sys.stderr)
        return EXIT_USAGE if all(d.line == 0 for d in e.diagnostics) else EXIT_SPEC
    if args.check:
        if out != text:
            print(f"{args.file}: not in canonical form (run 'ltmdsl fmt -w {args.file}')", file=sys.stderr)
            return EXIT_SPEC
        return EXIT_OK
    if args.write:
        if out != text:
            atomic_write_text(args.file, out)
        return EXIT_OK
    sys.stdout.write(out)
    return EXIT_OK
