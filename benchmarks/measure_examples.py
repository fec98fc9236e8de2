"""Predicted against traced for every published example's budgets and a set of training budgets: each budget's step
run at full size on fake tensors (ltmdsl.measure), one rank. Prints a Markdown table (the README's
"Predicted against traced" table) and, with --json FILE, writes every Measurement.

Run: python benchmarks/measure_examples.py [--only NAME ...] [--json out.json]
     python benchmarks/measure_examples.py --kinds   (each mixer kind alone, two sub-layers at its example's width)
     python benchmarks/measure_examples.py --plans   (one rank of parallel plans and fp8 KV at d_model 1024,
                                                      and the tiny examples' training budgets)
     python benchmarks/measure_examples.py --kinds --policies --only mamba   (training under each recompute
                                                                             policy, with the traced peak)
A budget that cannot be traced (a refused plan, a step too large to trace) gets a row saying why.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

#: (spec, budget or None, overrides, label): training budgets and single ranks the examples do not publish
EXTRA = [
    ("llama-3.1-405b.ltm", None, dict(context=131072), "llama-3.1-405b 128K, one rank without tp"),
    ("jamba-v0.1.ltm", None, dict(context=262144), "jamba-v0.1 256K, one rank without tp"),
    ("llama-3.1-8b.ltm", None, dict(mode="training", context=4096, recompute="none"), "8b train 4K none"),
    ("llama-3.1-8b.ltm", None, dict(mode="training", context=4096, recompute="selective"), "8b train 4K selective"),
    ("llama-3.1-8b.ltm", None, dict(mode="training", context=4096, recompute="full"), "8b train 4K full"),
    ("llama-3.1-8b.ltm", None, dict(mode="training", context=2048, recompute="none", flash_attention=False),
     "8b train 2K none, no flash"),
    ("llama-3.1-8b.ltm", None, dict(mode="training", context=4096, pp=4, microbatches=8, gpus=4),
     "8b train 4K pp4 m8 (stage 0)"),
    ("llama-3.1-8b.ltm", None, dict(mode="training", context=4096, zero=1, gpus=8), "8b train 4K zero1 dp8"),
    ("llama-3.1-8b.ltm", None, dict(mode="training", context=4096, chunked_loss=True, chunk=1024),
     "8b train 4K chunked loss"),
    ("gdn-hybrid.ltm", None, dict(mode="training", context=4096, recompute="none"), "gdn-hybrid train 4K none"),
    ("kda-hybrid.ltm", None, dict(mode="training", context=4096, recompute="none"), "kda-hybrid train 4K none"),
    ("lfm2-700m.ltm", None, dict(mode="training", context=4096, recompute="none"), "lfm2-700m train 4K none"),
    ("recurrentgemma-2b.ltm", None, dict(mode="training", context=4096, recompute="none"),
     "recurrentgemma-2b train 4K none"),
    ("xlstm-7b.ltm", None, dict(mode="training", context=4096, recompute="none"), "xlstm-7b train 4K none"),
]


def cases():
    """Every published example's every budget (an example without one: `ltmdsl memory`'s default, inference at
    128Ki tokens, batch 1, chunk 4096, one GPU), then EXTRA."""
    import ltmdsl

    out = []
    for path in sorted(EXAMPLES.glob("*.ltm")):
        budgets = ltmdsl.load(path).budgets
        for b in budgets:
            out.append((path.name, b.name, {}, f"{path.stem} {b.name}"))
        if not budgets:
            out.append((path.name, None, {}, f"{path.stem} default (inference 128Ki)"))
    return out + EXTRA


#: (kind, example, layer name or definition): each mixer kind at its example's width, for `--kinds`
KINDS = [
    ("attention", "llama-3.1-8b.ltm", "attention(heads = 32, kv_heads = 8, rope_theta = 500000)"),
    ("mamba", "mamba-2.8b.ltm", "ssm"),
    ("mamba2", "mamba2-2.7b.ltm", "ssd"),
    ("mla", None, None),
    ("gated_deltanet", "gdn-hybrid.ltm", "gdn"),
    ("kda", "kda-hybrid.ltm", "kda"),
    ("short_conv", "lfm2-700m.ltm", "conv"),
    ("lightning", "minimax-text-01.ltm", "lin"),
    ("rg_lru", "recurrentgemma-2b.ltm", "rec"),
    ("mlstm", "xlstm-7b.ltm", "cell"),
    ("moe", "qwen1.5-moe-a2.7b.ltm", "moe"),
]
#: no example uses MLA: DeepSeek-V2-Lite's attention (d_model 2048)
MLA = "mla(heads = 16, q_lora_rank = 768, kv_lora_rank = 512, qk_nope_head_dim = 128, qk_rope_head_dim = 64, " \
      "v_head_dim = 128)"


def kind_spec(kind: str, example: str | None, layer: str | None):
    """Two sub-layers of one mixer kind, nothing else, at its example's d_model (bf16, vocab 1024): the
    mixer's own workspace and activations decide the comparison."""
    import ltmdsl

    if example is None:
        d, definition = 2048, MLA
    else:
        d = ltmdsl.load(EXAMPLES / example).model.d_model
        text = (EXAMPLES / example).read_text() if "(" not in layer else f"    layer x = {layer}"
        layer = "x" if "(" in layer else layer
        head = f"    layer {layer} = "
        start = text.index(head) + len(head)
        depth, end = 0, start
        for end in range(start, len(text)):  # the definition up to its closing parenthesis
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            if text[end] == ")" and depth == 0:
                break
        definition = text[start:end + 1]
    return ltmdsl.loads(f"model {kind}_only {{\n vocab = 1024\n d_model = {d}\n dtype = bf16\n"
                        f" norm = rmsnorm(eps = 1e-5)\n head = untied\n layer x = {definition}\n"
                        f" stack {{ repeat 2 {{ x }} }}\n}}\n")


def kind_rows(only=None) -> list[str]:
    """Per kind: inference (context 8192, chunk 2048, batch 1) and training (context 2048, batch 1, no
    recompute) of `kind_spec`, predicted against traced."""
    from ltmdsl.measure import measure

    rows = []
    for kind, example, layer in KINDS:
        if only and kind not in only:
            continue
        model = kind_spec(kind, example, layer).model
        serve = measure(model, None, mode="inference", context=8192, batch=1, chunk=2048)
        train = measure(model, None, mode="training", context=2048, batch=1, recompute="none")
        exact = all(m.measured[c] == m.predicted[c] for m in (serve, train) for c in m.predicted if c != "activations")
        rows.append(f"| {kind} ({example or 'DeepSeek-V2-Lite'}) | {'exact' if exact else 'differ'} | "
                    f"{_mib(serve.predicted['activations'])} / {_mib(serve.measured['activations'])} | "
                    f"{_pct(serve.relative['activations'])} | "
                    f"{_mib(train.predicted['activations'])} / {_mib(train.measured['activations'])} | "
                    f"{_pct(train.relative['activations'])} |")
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


#: A Llama-shaped model at d_model 1024 (two attention + SwiGLU blocks) and its MoE twin, for `--plans`
PLAN_SPEC = """
model {name} {{
    vocab = 256
    d_model = 1024
    dtype = bf16
    norm = rmsnorm(eps = 1e-5)
    head = untied
    layer attn = attention(heads = 8, kv_heads = 2, rope_theta = 10000)
    layer ffn = {ffn}
    stack {{ repeat 2 {{ attn ffn }} }}
}}
budget train for {name} {{
    training context = 256, batch = 2
    on 1 x H100
}}
budget serve for {name} {{
    inference context = 512, batch = 2
    on 1 x H100
}}
"""
DENSE_FFN = "mlp(d_ff = 3584, act = swiglu)"
MOE_FFN = "moe(experts = 4, top_k = 2, d_ff = 1024)"

#: (label, "dense" | "moe" | example file, budget, overrides)
PLANS = [
    ("d1024 train, cp 4", "dense", "train", dict(cp=4, gpus=4)),
    ("d1024 train, cp 2, ZeRO-2, dp 2", "dense", "train", dict(cp=2, zero=2, gpus=4)),
    ("d1024 train, ZeRO-3, dp 4", "dense", "train", dict(zero=3, gpus=4)),
    ("d1024 train, tp 2", "dense", "train", dict(tp=2, gpus=2)),
    ("d1024 train, tp 2, ZeRO-3, dp 2", "dense", "train", dict(tp=2, zero=3, gpus=4)),
    ("d1024 MoE train, ep 2", "moe", "train", dict(ep=2, gpus=2)),
    ("d1024 MoE serve, ep 2", "moe", "serve", dict(ep=2, gpus=2)),
    ("d1024 serve 32K, fp8 KV", "dense", "serve", dict(batch=1, context=32768, chunk=256, kv_dtype="fp8_e4m3")),
    ("ltm-tiny cpu_train", "ltm-tiny.ltm", "cpu_train", {}),
    ("tiny-hybrid train 256, batch 2", "tiny-hybrid.ltm", None, dict(mode="training", context=256, batch=2,
                                                                     recompute="none")),
]


def plan_rows(only=None) -> list[str]:
    """`PLANS`, predicted against traced, with the training temporaries (the traced peak beyond what is held)."""
    import ltmdsl
    from ltmdsl.measure import measure
    from ltmdsl.units import format_bytes

    rows = []
    for label, what, budget_name, overrides in PLANS:
        if only and not any(o in label for o in only):
            continue
        if what in ("dense", "moe"):
            spec = ltmdsl.loads(PLAN_SPEC.format(name=what, ffn=DENSE_FFN if what == "dense" else MOE_FFN))
        else:
            spec = ltmdsl.load(EXAMPLES / what)
        budget = next((b for b in spec.budgets if b.name == budget_name), None)
        m = measure(spec.model, budget, **overrides)
        held = [c for c in m.predicted if c not in ("activations", "temporaries")]
        exact = all(m.measured[c] == m.predicted[c] for c in held)
        t = m.predicted.get("temporaries")
        temp = "-" if t is None else f"{format_bytes(t)} / {format_bytes(m.measured['temporaries'])}"
        rows.append(f"| {label} | {'exact' if exact else 'differ'} | {format_bytes(m.predicted['activations'])} / "
                    f"{format_bytes(m.measured['activations'])} | {_pct(m.relative['activations'])} | {temp} | "
                    f"{format_bytes(m.predicted_per_gpu)} | {format_bytes(m.peak_bytes)} "
                    f"({m.peak_phase.split(': ')[-1]}) | {_pct(m.peak_relative)} |")
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def policy_rows(only=None) -> list[str]:
    """Per kind: training (context 2048, batch 1) of `kind_spec` under recompute none, selective and full, and
    inference (context 8192, chunk 2048): activations and the traced peak against the per-GPU total."""
    from ltmdsl.measure import measure

    rows = []
    for kind, example, layer in KINDS:
        if only and kind not in only:
            continue
        model = kind_spec(kind, example, layer).model
        steps = [("inference", dict(mode="inference", context=8192, batch=1, chunk=2048))]
        steps += [(p, dict(mode="training", context=2048, batch=1, recompute=p)) for p in ("none", "selective", "full")]
        for step, overrides in steps:
            m = measure(model, None, **overrides)
            rows.append(f"| {kind} | {step} | {_mib(m.predicted['activations'])} / {_mib(m.measured['activations'])} | "
                        f"{_pct(m.relative['activations'])} | {_mib(m.predicted_per_gpu)} / {_mib(m.peak_bytes)} "
                        f"({m.peak_phase}) | {_pct(m.peak_relative)} |")
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def _mib(x):
    return f"{x / 2**20:.1f} MiB"


def _pct(x):
    return "n/a" if x is None else f"{100 * x:+.2f}%"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="labels (substrings) to run; with --kinds, kind names")
    ap.add_argument("--json", help="write the measurements here")
    ap.add_argument("--kinds", action="store_true", help="per mixer kind at its example's width instead")
    ap.add_argument("--plans", action="store_true", help="one rank of parallel plans (d_model 1024) and the tiny "
                                                         "examples' training budgets instead")
    ap.add_argument("--policies", action="store_true", help="with --kinds: training under each recompute policy")
    ap.add_argument("--list", action="store_true", help="print the labels of the example rows and stop")
    ap.add_argument("--context", type=int, help="trace the example rows at this context instead (a step too "
                                                 "large to trace at the budget's; the row says so)")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(label for *_, label in cases()))
        return 0
    if args.plans:
        rows = plan_rows(args.only)
        print("| budget (one rank) | weights, grads, optimizer, caches, logits | activations predicted / traced | "
              "diff | temporaries predicted / traced | per-GPU predicted | traced peak (phase) | diff |")
        print("|---|---|---|---|---|---|---|---|")
        print("\n".join(rows))
        return 0
    if args.kinds and args.policies:
        rows = policy_rows(args.only)
        print("| kind | step | activations predicted / traced | diff | per-GPU predicted / traced peak (phase) | diff |")
        print("|---|---|---|---|---|---|")
        print("\n".join(rows))
        return 0
    if args.kinds:
        rows = kind_rows(args.only)
        print("| kind (width of) | weights, caches, states | inference activations predicted / traced | diff | "
              "training activations predicted / traced | diff |")
        print("|---|---|---|---|---|---|")
        print("\n".join(rows))
        return 0
    import ltmdsl
    from ltmdsl.measure import NotTraceable, TooLargeToTrace, measure
    from ltmdsl.units import format_bytes

    rows, out = [], []
    for spec_name, budget_name, overrides, label in cases():
        if args.only and not any(o in label for o in args.only):
            continue
        spec = ltmdsl.load(EXAMPLES / spec_name)
        budget = next((b for b in spec.budgets if b.name == budget_name), None)
        model = spec.ir.model(budget.model) if budget else spec.model
        if args.context:
            overrides = {**overrides, "context": args.context}
            label += f", traced at context {args.context:,}"
        try:
            m = measure(model, budget, **overrides)
        except (NotTraceable, TooLargeToTrace) as e:
            rows.append(f"| {label} | not traced: {e} |||||||||")
            print(rows[-1], file=sys.stderr)
            continue
        out.append({"label": label, **m.to_json()})
        cache = m.measured.get("kv_cache", 0) + m.measured.get("recurrent_state", 0)
        cache_p = m.predicted.get("kv_cache", 0) + m.predicted.get("recurrent_state", 0)
        states_ok = all(m.measured[c] == m.predicted[c] for c in ("weights", "gradients", "optimizer") if c in m.predicted)
        rows.append(
            f"| {label} | {'exact' if states_ok else 'differ'} | "
            f"{'exact' if cache == cache_p else _pct((cache - cache_p) / cache_p) if cache_p else '-'} | "
            f"{format_bytes(m.predicted['activations'])} | {format_bytes(m.measured['activations'])} | "
            f"{_pct(m.relative['activations'])} | {format_bytes(m.predicted_per_gpu)} | "
            f"{format_bytes(m.peak_bytes)} ({m.peak_phase}) | {_pct(m.peak_relative)} | {m.seconds:.0f} s |")
        print(rows[-1], file=sys.stderr)
    print("| budget | weights, grads, optimizer | caches | activations predicted | traced | diff | "
          "per-GPU predicted | traced peak (phase) | diff | trace time |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
