"""`ltmdsl fmt FILE...`: print specs in canonical form, rewrite them in place (--write) or check them (--check)."""

from __future__ import annotations

import os
import stat
import sys

from ltmdsl import atomic
from ltmdsl.commands.common import EXIT_OK, EXIT_SPEC, EXIT_USAGE
from ltmdsl.errors import SpecError, escape
from ltmdsl.fmt import format_spec
from ltmdsl.loader import read_spec_file
from ltmdsl.parser import parse


def add_arguments(p) -> None:
    p.add_argument("files", nargs="+", metavar="FILE", help="spec files (.ltm)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("-w", "--write", action="store_true", help="rewrite the file in place (atomically)")
    mode.add_argument("--check", action="store_true", help="exit 1 if the file is not in canonical form")


def _rewrite(path: str, text: str) -> int:
    """Replace the file's content atomically, as the file it is: through a symlink to its target, keeping
    its permission bits; a read-only file is refused rather than silently replaced."""
    target = os.path.realpath(path)
    st = os.stat(target)
    if not os.access(target, os.W_OK) or not st.st_mode & 0o222:
        print(f"{escape(path)}: error: the file is read-only; not rewriting it", file=sys.stderr)
        return EXIT_USAGE
    try:
        atomic.write_text(target, text, mode=stat.S_IMODE(st.st_mode))
    except OSError as e:
        print(f"{escape(path)}: error: cannot write: {e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def run(args) -> int:
    """Every file in turn; the exit code is the worst of them (a usage problem over a spec error)."""
    return max(_one(path, args) for path in args.files)


def _one(path: str, args) -> int:
    try:
        text = read_spec_file(path)
        out = format_spec(parse(text, path))
    except SpecError as e:
        print(e.render(), file=sys.stderr)
        return EXIT_USAGE if all(d.line == 0 for d in e.diagnostics) else EXIT_SPEC
    if args.check:
        if out != text:
            print(f"{escape(path)}: not in canonical form (run 'ltmdsl fmt -w {escape(path)}')", file=sys.stderr)
            return EXIT_SPEC
        return EXIT_OK
    if args.write:
        return _rewrite(path, out) if out != text else EXIT_OK
    sys.stdout.write(out)
    return EXIT_OK
