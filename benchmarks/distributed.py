"""Training throughput and per-rank memory of each runnable parallel plan, on forked local gloo workers.

    python benchmarks/distributed.py [--steps 5] [--batch 8] [--seq 256] [--only TEXT] [--json]

For every plan: the global tokens per second of full training steps (forward, backward, gradient
averaging, AdamW) after one warm-up step, and the bytes of weights, gradients and optimizer state held by the
rank the memory model predicts (ltmdsl.distributed.memory on the first rank of its most loaded pipeline
stage) beside that per-GPU prediction ("=" when all three are equal), plus the largest peak resident memory
of a rank. tiny-hybrid (every mixer kind) runs the data-, context-, expert- and
pipeline-parallel plans (pp with dp, ZeRO 1/3, cp and ep) and ep carved out of dp with ZeRO 1 and 3 and with
cp; tensor parallelism runs on an attention + MLP + MoE model (the kinds with a tensor-parallel plan), with ZeRO
1 and 3 and inside pipeline stages, and with ep (ZeRO 1 and 3) and MoE parallel folding (etp 1 and 2 under tp,
etp 2 above tp = 1); tiny-jamba (a
MoE in every pipeline stage) runs ep and pp x dp x ep.
On a CPU the numbers measure overheads, not speed-ups: ranks share the cores.

Where the runtime and the memory model differ by design, the row says so by not showing "=": ZeRO 2 (FSDP2
keeps only the weight shard between steps, P*w/N, where the model counts P*w) and ZeRO 3 (between steps
FSDP2 holds the shard; the model adds the root it gathers for the step), and interleaved pipelines (a rank
holds v non-contiguous virtual stages; the model counts one contiguous stage).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

TP_SPEC = """
model tp_bench {
    vocab = 512
    d_model = 128
    dtype = fp32
    norm = rmsnorm(eps = 1e-5)
    head = untied
    layer attn = attention(heads = 8, kv_heads = 4, rope_theta = 10000)
    layer ffn = mlp(d_ff = 512, act = swiglu)
    layer moe = moe(experts = 4, top_k = 2, d_ff = 256, shared_d_ff = 256)
    stack { attn ffn attn moe }
}
"""

PLANS = [  # (model, world, degrees)
    ("tiny-hybrid", 1, {}),
    ("tiny-hybrid", 2, {"zero": 0}),
    ("tiny-hybrid", 2, {"zero": 1}),
    ("tiny-hybrid", 2, {"zero": 2}),
    ("tiny-hybrid", 2, {"zero": 3}),
    ("tiny-hybrid", 2, {"cp": 2}),
    ("tiny-hybrid", 2, {"cp": 2, "cp_split": "contiguous"}),
    ("tiny-hybrid", 2, {"ep": 2}),
    ("tiny-hybrid", 2, {"pp": 2, "microbatches": 2}),
    ("tiny-hybrid", 2, {"pp": 2, "microbatches": 2, "interleave": 2}),
    ("tiny-hybrid", 4, {"pp": 2, "dp": 2, "zero": 3, "microbatches": 2}),
    ("tiny-hybrid", 4, {"pp": 2, "cp": 2, "microbatches": 2}),
    ("tiny-hybrid", 4, {"pp": 2, "dp": 2, "zero": 1, "microbatches": 2}),
    ("tiny-hybrid", 4, {"pp": 2, "dp": 2, "ep": 2, "microbatches": 2}),
    ("tiny-hybrid", 4, {"ep": 2, "zero": 1}),
    ("tiny-hybrid", 4, {"ep": 2, "zero": 3}),
    ("tiny-hybrid", 4, {"cp": 2, "ep": 2, "zero": 2}),
    ("tp-bench", 1, {}),
    ("tp-bench", 2, {"tp": 2}),
    ("tp-bench", 2, {"tp": 2, "sequence_parallel": True}),
    ("tp-bench", 2, {"zero": 3}),
    ("tp-bench", 4, {"tp": 2, "zero": 1}),
    ("tp-bench", 4, {"tp": 2, "zero": 3}),
    ("tp-bench", 4, {"pp": 2, "tp": 2, "microbatches": 2}),
    ("tp-bench", 4, {"pp": 2, "tp": 2, "microbatches": 2, "sequence_parallel": True}),
    ("tiny-jamba", 2, {"ep": 2}),
    ("tiny-jamba", 4, {"pp": 2, "dp": 2, "ep": 2, "microbatches": 2}),
    ("tp-bench", 4, {"tp": 2, "ep": 2, "zero": 1}),
    ("tp-bench", 4, {"tp": 2, "ep": 2, "zero": 3}),
    ("tp-bench", 4, {"tp": 2, "ep": 4, "etp": 1, "zero": 1}),
    ("tp-bench", 4, {"tp": 4, "ep": 2, "etp": 2, "zero": 1}),
    ("tp-bench", 4, {"tp": 1, "ep": 2, "etp": 2, "zero": 1}),  # etp > tp: each expert's width over 2 dp ranks
]


def _model(name: str):
    import ltmdsl

    if name in ("tiny-hybrid", "tiny-jamba"):
        return ltmdsl.load(ROOT / "examples" / f"{name}.ltm").ir.model()
    return ltmdsl.loads(TP_SPEC).ir.model()


def _rank(ir, plan, steps: int, batch: int, seq: int):
    from ltmdsl.distributed import parallelize, shard_batch, train_step
    from ltmdsl.distributed.memory import rank_state_bytes

    ranked = parallelize(ir, plan, seed=0)
    opt = ranked.optimizer(lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, ir.vocab, (batch, seq + 1), generator=gen)
    ids, tgt = shard_batch(data[:, :-1], ranked), shard_batch(data[:, 1:], ranked)  # rows (dp), tokens (cp)
    train_step(ranked, opt, ids, tgt)  # warm-up
    torch.distributed.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        train_step(ranked, opt, ids, tgt)
    torch.distributed.barrier()
    seconds = time.perf_counter() - start
    return seconds, rank_state_bytes(ranked.model, opt), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _predicted(ir, plan, seq: int, batch: int) -> tuple[dict[str, int], int]:
    """The memory model's per-GPU model states for the plan, and the global rank they describe: the first rank
    of its most loaded pipeline stage (the mesh is (pp, dp, cp, tp), so stage s holds ranks s*N/pp, ...)."""
    from ltmdsl.memory import report

    r = report(ir, None, mode="training", gpus=plan.world, dp=plan.dp, tp=plan.tp, cp=plan.cp, ep=plan.ep,
               etp=plan.etp, pp=plan.pp, microbatches=plan.microbatches, zero=plan.zero,
               sequence_parallel=plan.sequence_parallel,
               weight_dtype="fp32", grad_dtype="fp32", optimizer_bytes_per_param=8, context=seq, batch=batch)
    return {c: r.per_gpu_components[c] for c in COMPONENTS}, r.most_loaded_stage * (plan.world // plan.pp)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--only", default="", help="run only the plans whose row ('model N plan') contains this text")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from ltmdsl.distributed import launch, plan_from
    from ltmdsl.distributed.plan import describe

    rows = []
    for name, world, degrees in PLANS:
        ir = _model(name)
        plan = plan_from(world=world, **degrees)
        extra = "".join(f" {k}={getattr(plan, k)}" for k in ("interleave",) if getattr(plan, k) > 1)
        if args.only not in f"{name} {world} {describe(plan)}{extra}":
            continue
        results = launch(_rank, world, (ir, plan, args.steps, args.batch, args.seq), timeout_s=600)
        seconds = max(r[0] for r in results)
        predicted, rank = _predicted(ir, plan, args.seq, args.batch)
        rows.append({
            "model": name, "world": world, "plan": describe(plan) + extra,
            "tokens_per_s": args.steps * args.batch * args.seq / seconds,
            "rank_bytes": [r[1] for r in results], "predicted_bytes": predicted, "predicted_rank": rank,
            "peak_rss": [r[2] for r in results],
        })
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    mib = 2**20
    print(f"{'model':12} {'N':>2} {'plan':56} {'tok/s':>8}  most loaded rank's weights/grads/optim MiB "
          "(memory model)  peak RSS MiB")
    for r in rows:
        b, p = r["rank_bytes"][r["predicted_rank"]], r["predicted_bytes"]
        held = "/".join(f"{b[c] / mib:.3f}" for c in COMPONENTS)
        pred = "/".join(f"{p[c] / mib:.3f}" for c in COMPONENTS)
        same = "=" if all(b[c] == p[c] for c in COMPONENTS) else " "
        print(f"{r['model']:12} {r['world']:>2} {r['plan']:56} {r['tokens_per_s']:8.0f}  {held:>20} {same} ({pred})"
              f"  {max(r['peak_rss']) / mib:.0f}")
    return 0


COMPONENTS = ("weights", "gradients", "optimizer")


if __name__ == "__main__":
    sys.exit(main())
