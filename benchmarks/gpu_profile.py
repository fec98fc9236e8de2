"""Per-kernel GPU times of one generated op (torch.profiler), to see which kernel of a family is slow.

    python benchmarks/gpu_profile.py ssd|ssd-sweep|selective|selective-sweep     (after gpu_check.sh's staging)
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import gpu_check  # noqa: E402,F401  (installs the loader stand-in when lark is missing)

from ltmdsl.codegen import ops  # noqa: E402


def ssd(chunk=256):
    B, T, Hs, P, G, N = 2, 16384, 80, 64, 1, 128
    bf = torch.bfloat16
    x = torch.randn(B, T, Hs, P, device="cuda", dtype=bf)
    dt = F.softplus(torch.randn(B, T, Hs, device="cuda") - 4).to(bf)
    A = -torch.rand(Hs, device="cuda") - 0.5
    Bm, Cm = torch.randn(B, T, G, N, device="cuda", dtype=bf), torch.randn(B, T, G, N, device="cuda", dtype=bf)
    return lambda: ops.ssd_scan(x, dt, A, Bm, Cm, chunk=chunk, state=None)


def selective():
    B, T, Di, N = 1, 2048, 5120, 16
    bf = torch.bfloat16
    u = torch.randn(B, T, Di, device="cuda", dtype=bf)
    dl = F.softplus(torch.randn(B, T, Di, device="cuda") - 1).to(bf)
    A = -torch.rand(Di, N, device="cuda") - 0.5
    Bm, Cm = torch.randn(B, T, N, device="cuda", dtype=bf), torch.randn(B, T, N, device="cuda", dtype=bf)
    return lambda: ops.selective_scan(u, dl, A, Bm, Cm, state=None)


def ssd_sweep() -> None:
    """Time the SSD scan under a few (block_m, num_warps, num_stages) choices of its KernelSpec."""
    import triton.testing

    from ltmdsl.codegen import kernelspec

    fn = ssd()
    base = kernelspec.ssd_spec
    for block_m, warps, stages in [(64, 4, 3), (64, 4, 2), (128, 4, 2), (64, 8, 3)]:
        def spec(**kw):
            p = dict(base(**kw).params, block_m=block_m, num_warps=warps, num_stages=stages)
            return kernelspec.KernelSpec.make("ssd", **p)
        ops.ssd_spec = spec
        try:
            ms = triton.testing.do_bench(fn, warmup=5, rep=30)
            print(f"ssd block_m={block_m} warps={warps} stages={stages}: {ms:.3f} ms")
        except Exception as e:  # a config that does not compile: say so, try the next
            print(f"ssd block_m={block_m} warps={warps} stages={stages}: failed {type(e).__name__}: {e}"[:300])
    ops.ssd_spec = base


def selective_sweep() -> None:
    """Time the Mamba-1 scan under a few (block_d, num_warps, num_stages) choices."""
    import triton.testing

    from ltmdsl.codegen import kernelspec

    fn = selective()
    base = kernelspec.selective_scan_spec
    for block_d, warps, stages in [(32, 4, 3), (32, 4, 1), (16, 2, 3), (16, 4, 3), (64, 4, 3)]:
        def spec(**kw):
            p = dict(base(**kw).params, block_d=block_d, num_warps=warps, num_stages=stages)
            return kernelspec.KernelSpec.make("selective_scan", **p)
        ops.selective_scan_spec = spec
        try:
            ms = triton.testing.do_bench(fn, warmup=5, rep=30)
            print(f"selective block_d={block_d} warps={warps} stages={stages}: {ms:.3f} ms")
        except Exception as e:
            print(f"selective block_d={block_d} warps={warps} stages={stages}: failed {type(e).__name__}: {e}"[:300])
    ops.selective_scan_spec = base


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else "ssd"
    if which == "ssd-sweep":
        return ssd_sweep()
    if which == "selective-sweep":
        return selective_sweep()
    fn = {"ssd": ssd, "selective": selective}[which]()
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))


if __name__ == "__main__":
    main()
