"""CPU throughput of the ltmdsl torch runtime against transformers on the same tiny architectures.

For Llama, Mamba, Mamba2 and Jamba, a tiny random transformers model (configs built here, nothing is
downloaded) and the equivalent ltmdsl spec are timed on the same machine:
    prefill  tokens/s: one forward over B x T tokens (no cache), logits for every position
    decode   tokens/s: greedy generation of M new tokens after a short prompt, with each side's cache
and printed with the ratio ours / transformers (> 1 means ltmdsl is faster). Best of --repeats runs.

    python benchmarks/cpu_runtime.py [--prefill 512] [--decode 64] [--batch 1] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import ltmdsl

V, D = 256, 64

SPECS = {
    "llama": """model bench_llama {
        vocab = 256
        d_model = 64
        dtype = fp32
        norm = rmsnorm(eps = 1e-5)
        head = untied
        layer attn = attention(heads = 4, kv_heads = 2, rope_theta = 10000)
        layer ffn = mlp(d_ff = 128, act = swiglu)
        stack { repeat 2 { attn ffn } }
    }""",
    "mamba": """model bench_mamba {
        vocab = 256
        d_model = 64
        dtype = fp32
        norm = rmsnorm(eps = 1e-5)
        head = tied
        layer ssm = mamba(d_state = 16, d_conv = 4, expand = 2)
        stack { repeat 2 { ssm } }
    }""",
    "mamba2": """model bench_mamba2 {
        vocab = 256
        d_model = 64
        dtype = fp32
        norm = rmsnorm(eps = 1e-5)
        head = tied
        layer ssm = mamba2(d_state = 16, head_dim = 16, expand = 2, chunk = 64)
        stack { repeat 2 { ssm } }
    }""",
    "jamba": """model bench_jamba {
        vocab = 256
        d_model = 64
        dtype = fp32
        norm = rmsnorm(eps = 1e-6)
        head = untied
        layer ssm = mamba(d_state = 16, d_conv = 4, expand = 2, dt_rank = 4, inner_norms = true)
        layer attn = attention(heads = 4, kv_heads = 2, rope_theta = none)
        layer ffn = mlp(d_ff = 128, act = swiglu)
        layer moe = moe(experts = 4, top_k = 2, d_ff = 128, routing = softmax_topk)
        stack { ssm ffn attn moe }
    }""",
}


def hf_model(arch: str):
    """The transformers model of the same architecture, random weights."""
    import transformers as tf

    common = dict(vocab_size=V, hidden_size=D, num_hidden_layers=2, pad_token_id=0, eos_token_id=None,
                  bos_token_id=None)
    if arch == "llama":
        cfg = tf.LlamaConfig(intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, **common)
        return tf.LlamaForCausalLM(cfg)
    if arch == "mamba":
        return tf.MambaForCausalLM(tf.MambaConfig(state_size=16, conv_kernel=4, expand=2, **common))
    if arch == "mamba2":
        cfg = tf.Mamba2Config(state_size=16, head_dim=16, num_heads=8, n_groups=1, expand=2, chunk_size=64, tie_word_embeddings=True,
                              **common)
        return tf.Mamba2ForCausalLM(cfg)
    cfg = tf.JambaConfig(intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                         num_experts_per_tok=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                         expert_layer_offset=1, mamba_d_state=16, mamba_dt_rank=4, **common)
    return tf.JambaForCausalLM(cfg)


def best(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure(arch: str, T: int, M: int, B: int, repeats: int) -> dict:
    ours = ltmdsl.build(ltmdsl.loads(SPECS[arch], name=f"<{arch}>"), dtype=torch.float32).eval()
    hf = hf_model(arch).eval()
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    prompt = ids[:, :16]
    with torch.inference_mode():
        out = {
            "arch": arch,
            "params_ours": ours.num_parameters(),
            "params_hf": sum(p.numel() for p in hf.parameters()),
            "prefill_ours": B * T / best(lambda: ours(ids), repeats),
            "prefill_hf": B * T / best(lambda: hf(ids, use_cache=False).logits, repeats),
            "decode_ours": B * M / best(lambda: ours.generate(prompt, M), repeats),
            "decode_hf": B * M / best(
                lambda: hf.generate(prompt, max_new_tokens=M, min_new_tokens=M, do_sample=False), repeats
            ),
        }
    out["prefill_ratio"] = out["prefill_ours"] / out["prefill_hf"]
    out["decode_ratio"] = out["decode_ours"] / out["decode_hf"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefill", type=int, default=512, help="prefill tokens per sequence T")
    ap.add_argument("--decode", type=int, default=64, help="generated tokens M")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--arch", nargs="*", default=list(SPECS), choices=list(SPECS))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    rows = [measure(a, args.prefill, args.decode, args.batch, args.repeats) for a in args.arch]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"CPU, torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"B={args.batch}, prefill T={args.prefill}, decode M={args.decode} (tokens/s, best of {args.repeats})")
    print(f"{'arch':8} {'params':>9} {'=hf':>4} {'prefill ours':>13} {'prefill hf':>11} {'ratio':>6} "
          f"{'decode ours':>12} {'decode hf':>10} {'ratio':>6}")
    for r in rows:
        same = "yes" if r["params_ours"] == r["params_hf"] else "NO"
        print(f"{r['arch']:8} {r['params_ours']:>9,} {same:>4} {r['prefill_ours']:>13,.0f} {r['prefill_hf']:>11,.0f} "
              f"{r['prefill_ratio']:>6.2f} {r['decode_ours']:>12,.0f} {r['decode_hf']:>10,.0f} {r['decode_ratio']:>6.2f}")


if __name__ == "__main__":
    main()
