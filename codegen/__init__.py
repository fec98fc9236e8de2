"""ltmdsl.codegen: Triton kernels generated from Jinja templates for each layer configuration of a spec.

    IR (ltmdsl/ir.py) -> KernelSpec (kernelspec.py, validated; `KIND_SPECS` by layer kind name)
    -> Jinja2 template (templates/*.jinja, render.py) -> source with a header -> lint (lint.py)
    -> key, atomic file, import, memo (cache.py)
    -> host wrappers with the Kernel interface (ops.py) -> `triton_kernels(model)` (backend.py)

Kernel families, one template each: attention (prefill / chunked prefill, GQA-packed, causal, sliding
window), attention_decode (split-KV over an unordered cache), conv (causal depthwise conv and step),
selective_scan (Mamba-1 scan and step), ssd (Mamba-2 chunked scan in four kernels and step), rmsnorm
(with the residual add fused), gated_delta (the delta rule of Gated DeltaNet and KDA: the chunked WY form
in two kernels and the step). Each kernel's oracle is the PyTorch op of ltmdsl.runtime it replaces.
Importing this package does not import triton or torch; ops.py and backend.py do.
"""
