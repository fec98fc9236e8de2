"""`ltmdsl import-hf PATH -o OUT.ltm`: a spec from a Hugging Face config.json (a folder or the file itself).

The config is validated key by key (type, range, the relations between keys; the file's size and
nesting) before anything is built, and the spec is checked by loading it before anything is written, then
written atomically (temp file + os.replace), so on any error nothing appears at OUT and the error names the
config key. Exit codes: 0 written, 1 the config cannot be
imported (unsupported family or field, bad value), 2 usage (missing file, unwritable output).
"""

from __future__ import annotations

import os
import sys

from ltmdsl.commands.common import EXIT_OK, EXIT_SPEC, EXIT_USAGE, atomic_write_text


def add_arguments(p) -> None:
    p.add_argument("path", metavar="PATH", help="checkpoint folder with config.json, or a config .json file")
    p.add_argument("-o", "--output", metavar="OUT.ltm", help="spec file to write (default: print to stdout)")
    p.add_argument("--name", help="model name in the spec (default: from the config's name or the folder)")
    p.add_argument("--ignore", action="append", default=[], metavar="KEY",
                   help="drop this config key knowingly (e.g. a rope_scaling of type yarn); recorded as a NOTE "
                        "in the spec; repeatable")


def run(args) -> int:
    from ltmdsl.hf import HFError
    from ltmdsl.hf.configs import checked_spec_text, plan_from_config, read_config

    path = os.fspath(args.path)
    if not os.path.exists(path):
        print(f"{path}: error: no such file or folder", file=sys.stderr)
        return EXIT_USAGE
    try:
        cfg, cfg_path = read_config(path)
        plan = plan_from_config(cfg, name=args.name, source=cfg_path, ignore=args.ignore)
        text = checked_spec_text(plan, cfg)  # a value the language refuses names its config key
    except HFError as e:
        print(e.render(path), file=sys.stderr)
        return EXIT_USAGE if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")) \
            else EXIT_SPEC
    if not args.output:
        sys.stdout.write(text)
        return EXIT_OK
    try:
        atomic_write_text(args.output, text)
    except OSError as e:
        print(f"{args.output}: error: cannot write: {e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE
    for note in plan.notes:
        print(f"{args.output}: warning: {note}", file=sys.stderr)
    return EXIT_OK
