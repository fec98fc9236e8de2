"""The PyTorch runtime: layers, caches and the model that `ltmdsl.build` returns.

ops_* hold the reference kernels beside their oracles, `kernels` the shared interface, the layer modules
(attention, mamba, mamba2, ffn, norm) build on them, `model` assembles the stack, `cache` allocates what
inference keeps, `checkpoint` saves self-describing safetensors. Importing this package imports torch.
"""
