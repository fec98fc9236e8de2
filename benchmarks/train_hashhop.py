"""HashHop (Magic.dev) on the tiny hybrid against a pure-SSM model of (nearly) equal parameters.

Each model trains --steps AdamW steps of --batch samples on HashHop at --context tokens, once for 1 hop and
once for 2 hops (a fresh model each time, same seed and data), then is scored by exact match of the answer
hash, decoded greedily through the cache, at the trained context and at 4x it. The pure-SSM twin keeps
ltm-tiny's width and depth with every attention layer replaced by Mamba-2 and its MLP width chosen so the
parameter counts are as close as the sizes allow (both counts are printed). Numbers go to the
`train_hashhop` section of benchmarks/RESULTS.md with the machine's load.

    python benchmarks/train_hashhop.py [--context 256] [--hash-length 4] [--steps 300] [--batch 16]
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import tempfile
from pathlib import Path

import torch

import ltmdsl
from ltmdsl.evals import get_task
from ltmdsl.train.data import EVAL_SEED
from ltmdsl.train.loop import TrainConfig, train
from ltmdsl.train.scoring import score
from train_report import machine, timed_training, write_section

ROOT = Path(__file__).resolve().parent.parent


def ssm_twin(hybrid_text: str, target: int):
    """ltm-tiny with attention replaced by Mamba-2, its MLP width tuned to `target` parameters."""
    text = hybrid_text.replace("model ltm_tiny", "model ssm_tiny")
    text = re.sub(r"\n    layer swa = .*\n", "\n", text)
    text = re.sub(r"\n    layer full = .*\n", "\n", text)
    text = text.replace("ssm ffn swa ffn", "ssm ffn ssm ffn").replace("ssm ffn full ffn", "ssm ffn ssm ffn")
    text = re.sub(r"budget .*", "", text, flags=re.S)
    best = None
    for d_ff in range(8, 257, 8):
        spec = ltmdsl.loads(re.sub(r"d_ff = \d+", f"d_ff = {d_ff}", text))
        gap = abs(spec.model.params_total - target)
        if best is None or gap < best[0]:
            best = (gap, spec)
    return best[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--hash-length", type=int, default=4)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--hops", type=int, nargs="+", default=[1, 2])
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    hybrid = ltmdsl.load(ROOT / "examples" / "ltm-tiny.ltm")
    ssm = ssm_twin(hybrid.text, hybrid.model.params_total)
    task = get_task("hashhop")
    rows = []
    work = Path(tempfile.mkdtemp())
    for spec in (hybrid, ssm):
        for hops in args.hops:
            options = {"context": args.context, "hops": hops, "hash_length": args.hash_length}
            config = TrainConfig(task="hashhop", out=str(work / f"{spec.model.name}-{hops}"), steps=args.steps,
                                 batch=args.batch, options=options, lr=args.lr, warmup=min(30, args.steps // 10))
            records, wall, cpu = timed_training(train(spec.model, config))
            model = ltmdsl.load_checkpoint(Path(config.out) / "checkpoints" / f"step-{args.steps:08d}" / "model.safetensors")
            acc = {}
            for scale in (1, 4):
                opts = task.make_options(**dict(options, context=args.context * scale))
                acc[scale] = score(model, task, opts, EVAL_SEED, args.samples).accuracy
            row = {"model": spec.model.name, "params": spec.model.params_total, "hops": hops,
                   "train_wall_s": round(wall, 1), "train_cpu_s": round(cpu, 1), "final_loss": records[-1]["loss"],
                   "final_answer_token_acc": records[-1]["answer_token_acc"],
                   "accuracy_trained": acc[1], "accuracy_4x": acc[4]}
            print(json.dumps(row), flush=True)
            rows.append(row)
    shutil.rmtree(work, ignore_errors=True)
    if args.no_write:
        return
    table = "\n".join(f"| {r['model']} | {r['params']:,} | {r['hops']} | {r['final_loss']:.3f} | "
                      f"{r['accuracy_trained']:.3f} | {r['accuracy_4x']:.3f} | {r['train_wall_s']:.0f} s / "
                      f"{r['train_cpu_s']:.0f} s |" for r in rows)
    body = f"""### {datetime.date.today()}: HashHop, hybrid against pure SSM (`python benchmarks/train_hashhop.py --context {args.context} --hash-length {args.hash_length} --steps {args.steps} --batch {args.batch}`)

Each row a fresh model trained {args.steps} AdamW steps of {args.batch} samples at context {args.context}
({args.hash_length}-letter hashes, one query, no chain of thought), then scored by exact match of the
answer hash through the cache on {args.samples} evaluation samples, at {args.context} and {4 * args.context} tokens.
Machine: {machine()}.

| model | parameters | hops | final train loss | accuracy @ {args.context} | accuracy @ {4 * args.context} | train wall / CPU |
|---|---|---|---|---|---|---|
{table}

Targets (hybrid, at the trained context): 1-hop >= 0.95, 2-hop >= 0.8.
"""
    write_section("train_hashhop", body)


if __name__ == "__main__":
    main()
