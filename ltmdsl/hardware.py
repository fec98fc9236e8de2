"""The built-in GPU catalogue and its capacity convention.

Capacity convention: a GPU's usable memory is its marketed capacity in decimal bytes (H100 80GB =
80 * 10**9 B). nvidia-smi reports 81,559 MiB for an H100 SXM, but the CUDA context, NCCL buffers and
fragmentation take several GiB, so the marketed figure is a fair usable figure. Under this convention
Llama-3.1-405B's 51.61 TB KV cache at 100M tokens needs 646 H100s (Magic.dev: "638", using 81 GB).
"""

from __future__ import annotations

from ltmdsl.ir import GpuSpec

GB = 10**9
TB = 10**12

#: name -> GpuSpec; names are case-sensitive in specs but looked up case-insensitively.
CATALOGUE: dict[str, GpuSpec] = {
    g.name: g
    for g in (
        GpuSpec("H100", memory_bytes=80 * GB, bf16_flops=989e12, hbm_bytes_per_s=3.35e12),
        GpuSpec("H200", memory_bytes=141 * GB, bf16_flops=989e12, hbm_bytes_per_s=4.8e12),
        GpuSpec("A100_80GB", memory_bytes=80 * GB, bf16_flops=312e12, hbm_bytes_per_s=2.039e12),
        GpuSpec("A100_40GB", memory_bytes=40 * GB, bf16_flops=312e12, hbm_bytes_per_s=1.555e12),
        GpuSpec("B200", memory_bytes=192 * GB, bf16_flops=2250e12, hbm_bytes_per_s=8e12),
    )
}

DEFAULT_GPU = "H100"

#: Names that look like a catalogue GPU but are refused because they are ambiguous, with what to write.
AMBIGUOUS = {"A100": "A100_80GB or A100_40GB (the A100 comes with 40 GB and with 80 GB)"}


def lookup(name: str, user_defined: dict[str, GpuSpec] | None = None) -> GpuSpec | None:
    """A GPU by its exact name: user-defined ones first, then the catalogue; else None.

    Names are case-sensitive and have one spelling each, like every other name in a spec: `h100` and
    `A100` are refused (with a suggestion) rather than guessed, so a spec means one thing to every reader.
    """
    if user_defined and name in user_defined:
        return user_defined[name]
    return CATALOGUE.get(name)


def names() -> list[str]:
    return list(CATALOGUE)
