"""`ltmdsl export-hf SPEC_OR_CHECKPOINT OUT/`: a Hugging Face folder (config.json + model.safetensors).

From a runtime checkpoint, the weights are the checkpoint's; from a spec, they are the ones
`ltmdsl.build(spec, seed=SEED)` draws (useful to test a Hugging Face pipeline on an ltmdsl design).
The folder is written under a temporary name and renamed into place: on error nothing appears at OUT.
Exit codes: 0 written, 1 the model has no Hugging Face counterpart or the input is invalid, 2 usage.
"""

from __future__ import annotations

import os
import sys

from ltmdsl.commands.common import EXIT_OK, EXIT_SPEC, EXIT_USAGE


def add_arguments(p) -> None:
    p.add_argument("source", metavar="SPEC_OR_CHECKPOINT", help="spec file (.ltm) or runtime checkpoint")
    p.add_argument("out", metavar="OUT", help="folder to create")
    p.add_argument("--fused-experts", action="store_true",
                   help="write MoE experts in transformers 5's fused layout (default: one tensor per expert)")
    p.add_argument("--seed", type=int, default=0, help="weight seed when SOURCE is a spec (default 0)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")
    p.add_argument("--family", metavar="MODEL_TYPE", default=None,
                   help="the family to write where several hold the model: qwen3_5 or qwen3_5_moe for a stack "
                        "that is also Qwen3-Next's (default: the one export picks)")


def run(args) -> int:
    from ltmdsl.errors import SpecError
    from ltmdsl.hf import HFError
    from ltmdsl.hf.export import export_hf

    src = os.fspath(args.source)
    if not os.path.exists(src):
        print(f"{src}: error: no such file or folder", file=sys.stderr)
        return EXIT_USAGE
    try:
        export_hf(src, args.out, fused=args.fused_experts, seed=args.seed, overwrite=args.force, family=args.family)
    except SpecError as e:
        print(e.render(), file=sys.stderr)
        return EXIT_SPEC
    except HFError as e:
        usage = e.path is not None and os.path.abspath(e.path) == os.path.abspath(args.out)
        print(e.render(src), file=sys.stderr)
        return EXIT_USAGE if usage else EXIT_SPEC
    except OSError as e:
        print(f"{args.out}: error: cannot write: {e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {os.path.join(args.out, 'config.json')} and model.safetensors", file=sys.stderr)
    return EXIT_OK
