"""The PyTorch runtime: layers, caches and the model that `ltmdsl.build` returns.

`kinds/` holds one module per layer kind (`kinds/<kind>.py`: its nn.Module, its cache allocation, the
kernel ops it calls and the parameter names it owns) and the runtime registry that maps kind names to them.
ops_* hold the reference kernels beside their oracles, `kernels` the op bundle the kinds declare (and back
ends override), `norm` the pre-norms, `model` assembles the stack through the registry, `cache` holds the
per-layer cache list, `checkpoint` saves self-describing safetensors.
Importing this package imports torch.
"""
